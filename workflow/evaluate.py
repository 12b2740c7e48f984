"""`nndet_eval` as an API: box metrics of a fold's validation cases or of the test predictions, with plots.

* :func:`evaluate_fold`: the fold's validation cases with the swept parameters -> ``fold<X>/val_results/
  results_boxes.json`` (nnDetection's keys, preprocessed space) + FROC/PR/score/size plots + examples.
* :func:`evaluate_test`: ``<bundle>/test_predictions`` against ``raw_splitted/labelsTs`` (original voxels)
  -> ``<bundle>/test_results/``.
* ``analyze_boxes=True`` (``--analyze_boxes``) adds the per-object and false-positive tables of
  :mod:`workflow.analysis`.

Metrics and plots are the bundle's own code (``scripts/evaluation.py``, ``scripts/eval_plots.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from planner import paths
from planner.io import load_json, save_json
from workflow.bundle_code import bundle_module
from workflow.models import bundle_for, bundle_plan, class_names
from workflow.sweep import as_dict, fold_params, images_dir, load_raw_and_gt

logger = logging.getLogger(__name__)

NUM_EXAMPLE_PLOTS = 3


def evaluate_fold(task: str | int, fold: int = 0, model: str | None = None, plan: str | None = None,
                  plots: bool = True, analyze_boxes: bool = False) -> dict[str, float]:
    """`nndet_eval TASK MODEL FOLD`: validation metrics with the swept parameters (defaults if not swept)."""
    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    inference = bundle_module(bundle, "inference")
    p = bundle_plan(bundle)
    raws, gts, ids = load_raw_and_gt(bundle, p, task_name, [fold])
    params = fold_params(bundle, fold)
    if params is None:
        logger.warning("fold %d has no sweep result: evaluating nnDetection's default parameters", fold)
    preds = [as_dict(inference.postprocess_members(r.members, r.shape, params)) for r in raws]
    out = bundle / f"fold{fold}" / "val_results"
    pred_dir = bundle / f"fold{fold}" / "val_predictions"
    for case, pred in zip(ids, preds, strict=True):
        save_json({"case_id": case, "frame": "preprocessed voxels (StandardMode, half-open)", **pred},
                  pred_dir / f"{case}_boxes.json")
    images = images_dir(task_name, p)
    return evaluate_and_plot(bundle, preds, gts, ids, class_names(p), out, plots,
                             lambda c: np.load(images / f"{c}.npy", mmap_mode="r")[0], analyze_boxes)


def evaluate_and_plot(bundle: Path, preds, gts, ids, classes, out: Path, plots: bool, image_of,
                      analyze_boxes: bool = False) -> dict[str, float]:
    """Metrics (``results_boxes.json``), optional box analysis, curves and example slices under ``out``."""
    evaluation = bundle_module(bundle, "evaluation")
    metrics, curves = evaluation.evaluate_boxes_detailed(preds, gts, classes)
    evaluation.save_results(metrics, out)
    if analyze_boxes:
        from workflow.analysis import analyze_boxes as analyze

        analyze(preds, gts, ids, classes, out)
    if plots:
        eval_plots = bundle_module(bundle, "eval_plots")
        eval_plots.plot_all(curves, out)
        examples = [{"case_id": c, "image": np.asarray(image_of(c)), "pred_boxes": pr["boxes"],
                     "pred_scores": pr["scores"], "gt_boxes": gt["boxes"]}
                    for c, pr, gt in list(zip(ids, preds, gts, strict=True))[:NUM_EXAMPLE_PLOTS]]
        eval_plots.plot_examples(examples, out / "examples")
    logger.info("results written to %s", out / "results_boxes.json")
    return metrics


def gt_raw(task_root: Path, case: str, dim: int) -> dict[str, np.ndarray]:
    """Ground-truth boxes (original voxels) and labels of a test case from ``raw_splitted/labelsTs``."""
    from planner.fingerprint import instance_boxes
    from planner.nifti import load_instances_json, load_nifti

    label_dir = task_root / "raw_splitted" / "labelsTs"
    seg, _ = load_nifti(label_dir / f"{case}.nii.gz", dim)
    classes = load_instances_json(label_dir / f"{case}.json")
    ids, boxes = instance_boxes(np.asarray(seg).astype(np.int64))
    return {"boxes": np.asarray(boxes, np.float64).reshape(-1, 2 * dim),
            "labels": np.asarray([classes[i] for i in ids], np.int64)}


def evaluate_test(task: str | int, model: str | None = None, plan: str | None = None,
                  plots: bool = True, analyze_boxes: bool = False) -> dict[str, float]:
    """`nndet_eval TASK MODEL --test`: test predictions vs ``raw_splitted/labelsTs`` (original voxels)."""
    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = bundle_plan(bundle)
    task_root = paths.det_data() / task_name
    pred_dir = bundle / "test_predictions"
    files = sorted(pred_dir.glob("*_boxes.json")) if pred_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{pred_dir}: no test predictions; run `nndet_predict {task_name}` first")
    if not (task_root / "raw_splitted" / "labelsTs").is_dir():
        raise FileNotFoundError(f"{task_root / 'raw_splitted' / 'labelsTs'}: no test labels to evaluate against")
    preds, gts, ids = [], [], []
    for f in files:
        d = load_json(f)
        preds.append({"boxes": np.asarray(d["boxes"], np.float64).reshape(-1, 2 * p.dim),
                      "scores": np.asarray(d["scores"], np.float64), "labels": np.asarray(d["labels"], np.int64)})
        gts.append(gt_raw(task_root, d["case_id"], p.dim))
        ids.append(d["case_id"])

    def image_of(case: str):
        from planner.nifti import load_nifti

        return load_nifti(task_root / "raw_splitted" / "imagesTs" / f"{case}_0000.nii.gz", p.dim)[0]

    return evaluate_and_plot(bundle, preds, gts, ids, class_names(p), bundle / "test_results", plots, image_of,
                             analyze_boxes)
