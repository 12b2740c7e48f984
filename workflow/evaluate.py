"""`nndet_eval` as an API: box metrics of a fold's validation cases or of the test predictions, with plots.

* :func:`evaluate_fold`: the fold's validation cases with the swept parameters -> ``fold<X>/val_results/
  results_boxes.json`` (nnDetection's keys, preprocessed space) + FROC/PR/score/size plots + examples.
* :func:`evaluate_test`: ``<bundle>/test_predictions`` against ``raw_splitted/labelsTs`` (original voxels)
  -> ``<bundle>/test_results/``.
* ``analyze_boxes=True`` (``--analyze_boxes``) adds the per-object and false-positive tables of
  :mod:`workflow.analysis`.
* Both write ``operating_points.csv`` / ``.json`` (every score threshold: sensitivity, FPPI, precision, F1,
  TP/FP/FN per class and pooled; ``scripts/operating_points.py``). :func:`validation_operating_point`
  chooses one threshold on the folds' validation cases for ``nndet_consolidate``.

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
from workflow.sweep import as_dict, fold_params, gt_preprocessed, images_dir, load_raw_and_gt, val_cases

logger = logging.getLogger(__name__)

NUM_EXAMPLE_PLOTS = 3


def evaluate_fold(task: str | int, fold: int = 0, model: str | None = None, plan: str | None = None,
                  plots: bool = True, analyze_boxes: bool = False, box_convention: str = "ours") -> dict[str, float]:
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
                             lambda c: np.load(images / f"{c}.npy", mmap_mode="r")[0], analyze_boxes, box_convention)


BOX_CONVENTIONS = ("ours", "nndetection")


def to_nndetection_extent(boxes: np.ndarray, dim: int) -> np.ndarray:
    """Our half-open boxes ``[min, max + 1)`` (StandardMode) in nnDetection's extent ``(min - 1, max + 1)``:
    the lower corners one voxel lower, the order unchanged. nnDetection derives boxes from instance maps that
    way, so small-object IoU differs (a 3-voxel cube shifted one voxel per axis: 0.174 ours, 0.267 its)."""
    b = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 2 * dim)
    b[:, :dim] -= 1.0
    return b


def to_nndetection_order(boxes: np.ndarray, dim: int) -> np.ndarray:
    """StandardMode ``(x1, y1, z1, x2, y2, z2)`` rows in nnDetection's ``(x1, y1, x2, y2, z1, z2)`` order (2D
    boxes are the same in both)."""
    b = np.asarray(boxes).reshape(-1, 2 * dim)
    return b if dim == 2 else b[:, [0, 1, 3, 4, 2, 5]]


def from_nndetection_order(boxes: np.ndarray, dim: int) -> np.ndarray:
    """nnDetection's ``(x1, y1, x2, y2, z1, z2)`` rows in StandardMode ``(x1, y1, z1, x2, y2, z2)``."""
    b = np.asarray(boxes).reshape(-1, 2 * dim)
    return b if dim == 2 else b[:, [0, 1, 4, 2, 3, 5]]


def in_convention(items: list[dict], dim: int, convention: str) -> list[dict]:
    """Predictions or ground truths with their boxes in ``convention`` (``ours``: unchanged)."""
    if convention not in BOX_CONVENTIONS:
        raise ValueError(f"--box_convention must be one of {BOX_CONVENTIONS}, got {convention!r}")
    if convention == "ours":
        return items
    return [{**d, "boxes": to_nndetection_extent(d["boxes"], dim)} for d in items]


def evaluate_and_plot(bundle: Path, preds, gts, ids, classes, out: Path, plots: bool, image_of,
                      analyze_boxes: bool = False, box_convention: str = "ours") -> dict[str, float]:
    """Metrics (``results_boxes.json``), optional box analysis, curves and example slices under ``out``.
    ``box_convention="nndetection"``: predictions and ground truth both in nnDetection's box extent (see
    :func:`to_nndetection_extent`), written to ``<out>_nndetection`` instead."""
    if box_convention != "ours":
        dim = bundle_plan(bundle).dim
        preds, gts = in_convention(preds, dim, box_convention), in_convention(gts, dim, box_convention)
        out = out.with_name(f"{out.name}_{box_convention}")
    evaluation = bundle_module(bundle, "evaluation")
    metrics, curves = evaluation.evaluate_boxes_detailed(preds, gts, classes)
    evaluation.save_results(metrics, out)
    save_operating_points(bundle, preds, gts, classes, out)
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


def operating_points_module(bundle: Path):
    """The bundle's ``scripts/operating_points.py``; None (with a warning) for bundles generated before it."""
    try:
        return bundle_module(bundle, "operating_points")
    except ModuleNotFoundError as e:
        if e.name != "scripts.operating_points":
            raise
        logger.warning("%s/scripts has no operating_points.py (generated by an older version): no operating points; "
                       "copy the template's scripts/operating_points.py and evaluation.py into it", bundle)
        return None


def save_operating_points(bundle: Path, preds, gts, classes, out: Path) -> dict | None:
    """``out/operating_points.csv`` + ``.json`` (the bundle's code); returns the table (None: see above)."""
    op = operating_points_module(bundle)
    if op is None:
        return None
    table = op.operating_points(preds, gts, classes)
    op.save_table(table, out)
    return table


def operating_points_text(bundle: Path, out: Path) -> str | None:
    """The short table of ``out/operating_points.json`` (a few FPPI rules per class and pooled) for the CLI."""
    op, f = operating_points_module(bundle), out / "operating_points.json"
    if op is None or not f.is_file():
        return None
    return f"{op.format_table(load_json(f))}\n\nall operating points: {out / op.CSV_FILE}"


def _validation_predictions(bundle: Path, p, folds, params) -> tuple[list, list, str] | None:
    """(predictions, ground truth, what they are) of the folds' out-of-fold validation cases.

    Preferred: the raw per-member predictions of ``nndet_sweep`` (``fold<X>/sweep_predictions``) through the
    consolidated bundle's own postprocessing ``params``, i.e. what the consolidated bundle would output with
    one fold's model per case (the bundle itself ensembles all folds, so its scores may differ a little).
    Fallback: ``nndet_eval``'s ``fold<X>/val_predictions/<case>_boxes.json``, postprocessed with each fold's own
    swept parameters (not necessarily the consolidated ones). None when neither exists for every case."""
    try:
        raws, gts, _ = load_raw_and_gt(bundle, p, p.task, folds)
    except FileNotFoundError as e:
        logger.info("%s; trying nndet_eval's val_predictions", e)
    else:
        inference = bundle_module(bundle, "inference")
        preds = [as_dict(inference.postprocess_members(r.members, r.shape, params)) for r in raws]
        return preds, gts, f"raw validation predictions of folds {list(folds)} with the consolidated postprocessing"
    preds, gts = [], []
    for fold in folds:
        images, cases = val_cases(bundle, p.task, p, fold)
        for case in cases:
            f = bundle / f"fold{fold}" / "val_predictions" / f"{case}_boxes.json"
            if not f.is_file():
                return None
            d = load_json(f)
            preds.append({"boxes": np.asarray(d["boxes"], np.float64).reshape(-1, 2 * p.dim),
                          "scores": np.asarray(d["scores"], np.float64), "labels": np.asarray(d["labels"], np.int64)})
            gts.append(gt_preprocessed(images, case, p.dim))
    return preds, gts, f"nndet_eval val_predictions of folds {list(folds)} (each fold's own swept parameters)"


def validation_operating_point(bundle: Path, folds, params, fppi: float | None = None,
                               min_sensitivity: float | None = None, threshold: float | None = None) -> dict | None:
    """The operating point chosen on the folds' validation cases (``nndet_consolidate``), as recorded in the
    consolidated ``metadata.json`` (``nndet.operating_point``).

    Default rule ``fppi<=1`` (the lowest threshold with at most one false positive per case); ``fppi``,
    ``min_sensitivity`` or ``threshold`` choose another (``scripts/operating_points.choose``). Without
    validation predictions (or bundle code for it) the default rule gives None with a warning; an explicit
    rule raises (FileNotFoundError), as does an unsatisfiable one (ValueError).
    """
    explicit = [k for k, v in (("fppi", fppi), ("min_sensitivity", min_sensitivity), ("threshold", threshold))
                if v is not None]
    if len(explicit) > 1:
        raise ValueError(f"--fppi, --min_sensitivity and --threshold are mutually exclusive, got {explicit}")
    op, p = operating_points_module(bundle), bundle_plan(bundle)
    found = _validation_predictions(bundle, p, folds, params) if op is not None else None
    if found is None:
        why = (f"no validation predictions of folds {list(folds)} (run `nndet_sweep` for each fold)" if op is not None
               else "the bundle has no scripts/operating_points.py")
        if explicit:
            raise FileNotFoundError(f"cannot choose an operating point by --{explicit[0]}: {why}")
        logger.warning("no operating point recorded: %s", why)
        return None
    preds, gts, source = found
    return choose_operating_point(op, preds, gts, class_names(p), folds, source, fppi=fppi,
                                  min_sensitivity=min_sensitivity, threshold=threshold)


def choose_operating_point(op, preds, gts, classes, folds, source: str, fppi: float | None = None,
                           min_sensitivity: float | None = None, threshold: float | None = None) -> dict | None:
    """The ``nndet.operating_point`` record chosen on these predictions with the bundle's ``operating_points``
    module ``op``; an unsatisfiable default rule gives None (warned), an explicit one raises ValueError."""
    table = op.operating_points(preds, gts, classes)
    try:
        c = op.choose(table, fppi=fppi, min_sensitivity=min_sensitivity, threshold=threshold)
    except ValueError as e:
        if any(v is not None for v in (fppi, min_sensitivity, threshold)):
            raise
        logger.warning("no operating point recorded: %s", e)
        return None
    keys = ("threshold", "rule", "sensitivity", "fppi", "precision", "f1", "tp", "fp", "fn", "num_gt", "num_cases")
    return {**{k: c[k] for k in keys}, "per_class": c["per_class"], "iou": table["iou"],
            "folds": [int(f) for f in folds], "predictions": source}


def gt_raw(task_root: Path, case: str, dim: int, annotation: str = "masks") -> dict[str, np.ndarray]:
    """Ground-truth boxes (original voxels) and labels of a test case from ``raw_splitted/labelsTs``: the
    boxes of the instance map, or with box annotations the json's boxes themselves (exact, not re-derived
    from a filled map)."""
    from planner.fingerprint import instance_boxes
    from planner.nifti import load_instances_json, load_nifti, read_nifti

    label_dir = task_root / "raw_splitted" / "labelsTs"
    if annotation == "boxes":
        from planner.box_labels import load_box_labels

        img = read_nifti(task_root / "raw_splitted" / "imagesTs" / f"{case}_0000.nii.gz")
        shape = tuple(int(s) for s in img.shape[:dim])
        labels = load_box_labels(label_dir / f"{case}.json", shape, np.asarray(img.affine))
        return {"boxes": labels.boxes.astype(np.float64).reshape(-1, 2 * dim),
                "labels": np.asarray(labels.classes, np.int64)}
    seg, _ = load_nifti(label_dir / f"{case}.nii.gz", dim)
    classes = load_instances_json(label_dir / f"{case}.json")
    ids, boxes = instance_boxes(np.asarray(seg).astype(np.int64))
    return {"boxes": np.asarray(boxes, np.float64).reshape(-1, 2 * dim),
            "labels": np.asarray([classes[i] for i in ids], np.int64)}


def evaluate_test(task: str | int, model: str | None = None, plan: str | None = None,
                  plots: bool = True, analyze_boxes: bool = False, box_convention: str = "ours") -> dict[str, float]:
    """`nndet_eval TASK MODEL --test`: test predictions vs ``raw_splitted/labelsTs`` (original voxels)."""
    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    return evaluate_test_predictions(task_name, bundle, bundle / "test_predictions", bundle / "test_results", plots,
                                     analyze_boxes, box_convention)


def evaluate_test_predictions(task_name: str, bundle: Path, pred_dir: Path, out: Path, plots: bool = True,
                              analyze_boxes: bool = False, box_convention: str = "ours") -> dict[str, float]:
    """``pred_dir/<case>_boxes.json`` (original voxels) vs ``raw_splitted/labelsTs``, results under ``out``, with
    the code and plan of ``bundle`` (a task bundle, or a consolidated one holding ``configs/plan.json``)."""
    p = bundle_plan(bundle)
    task_root = paths.det_data() / task_name
    files = sorted(pred_dir.glob("*_boxes.json")) if pred_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{pred_dir}: no test predictions; run `nndet_predict {task_name}` first")
    if not (task_root / "raw_splitted" / "labelsTs").is_dir():
        raise FileNotFoundError(f"{task_root / 'raw_splitted' / 'labelsTs'}: no test labels to evaluate against")
    from planner.dataset import load_dataset_info

    annotation = load_dataset_info(task_root).annotation
    preds, gts, ids = [], [], []
    for f in files:
        d = load_json(f)
        preds.append({"boxes": np.asarray(d["boxes"], np.float64).reshape(-1, 2 * p.dim),
                      "scores": np.asarray(d["scores"], np.float64), "labels": np.asarray(d["labels"], np.int64)})
        gts.append(gt_raw(task_root, d["case_id"], p.dim, annotation))
        ids.append(d["case_id"])

    def image_of(case: str):
        from planner.nifti import load_nifti

        return load_nifti(task_root / "raw_splitted" / "imagesTs" / f"{case}_0000.nii.gz", p.dim)[0]

    return evaluate_and_plot(bundle, preds, gts, ids, class_names(p), out, plots, image_of, analyze_boxes,
                             box_convention)
