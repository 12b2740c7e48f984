"""`nndet_sweep`, `nndet_eval` and `nndet_predict` as an API: whole-case inference with trained folds.

Stages (each writes its artefacts under the bundle, each skipped when they exist unless ``overwrite``):

* :func:`predict_val`: every validation case of a fold through the fold's network x mirror TTA; the raw
  per-member boxes go to ``fold<X>/sweep_predictions/<case>_raw.npz`` (preprocessed voxels), so the sweep
  and the evaluation never run the network again (nnDetection's ``sweep_predictions``).
* :func:`sweep_fold`: nnDetection's coordinate search of the postprocessing parameters on those raw
  predictions, maximising ``mAP_IoU_0.10_0.50_0.05_MaxDet_100`` -> ``fold<X>/sweep/params.json`` + plot.
* :func:`evaluate_fold`: the fold's validation cases with the swept parameters -> ``fold<X>/val_results/
  results_boxes.json`` (nnDetection's keys, preprocessed space) + FROC/PR/score/size plots + examples.
* :func:`predict_test`: cases of ``raw_splitted/imagesTs`` (preprocessed first into ``preprocessed/<plan>/imagesTs``
  unless ``preprocess=False``) with the ensemble of the trained folds -> ``<bundle>/test_predictions/<case>_boxes.json``
  with boxes in original voxels and in world millimetres.
* :func:`evaluate_test`: those predictions against ``raw_splitted/labelsTs`` -> ``<bundle>/test_results/``.

Boxes are MONAI StandardMode, half-open: ``[x1, y1, z1, x2, y2, z2]`` covers voxels x1..x2-1 etc.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planner import paths
from planner.io import load_json, save_json
from planner.plan.plan import Plan
from planner.train import TRAIN_CONFIG, _fresh_scripts_import, bundle_for, fold_finished

logger = logging.getLogger(__name__)

RAW_SUFFIX = "_raw.npz"
NUM_EXAMPLE_PLOTS = 3


def _template():
    from bundles.retinaunet_template.scripts import evaluation, inference, sweep

    return inference, sweep, evaluation


def _device(device: str | None = None):
    from bundles.retinaunet_template.scripts.predict import resolve_device

    return resolve_device(device)


def load_detector(bundle: Path, fold: int, ckpt: str = "last", device: str | None = None):
    """The fold's detector: the network definition of the bundle's ``train.json`` (``network_def``, the one
    definition train and inference share) with ``fold<X>/model_<ckpt>.pt`` weights, in eval mode."""
    weights = bundle / f"fold{fold}" / f"model_{ckpt}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: fold {fold} is not trained; run `nndet_train ... -o exp.fold={fold}`")
    _fresh_scripts_import(bundle)
    if str(bundle) not in sys.path:
        sys.path.insert(0, str(bundle))  # the config's ``scripts.*`` targets, as under monai.bundle run
    from bundles.retinaunet_template.scripts.predict import load_detectors

    return load_detectors(bundle / TRAIN_CONFIG, [weights], bundle, device=device)[0]


def _plan_of(bundle: Path) -> Plan:
    return Plan.from_json(bundle / "configs" / "plan.json")


def _classes(plan: Plan) -> list[str]:
    return [plan.labels[k] for k in sorted(plan.labels, key=int)]


def _images_dir(task_name: str, plan: Plan, split: str = "Tr") -> Path:
    return paths.det_data() / task_name / "preprocessed" / plan.plan_id / f"images{split}"


def _folds_or_trained(bundle: Path, folds: Sequence[int] | None) -> list[int]:
    folds = list(folds) if folds is not None else trained_folds(bundle)
    if not folds:
        raise FileNotFoundError(f"{bundle}: no trained fold; run `nndet_train {bundle.parent.name}` first")
    return folds


def _val_cases(task_name: str, plan: Plan, fold: int) -> tuple[Path, list[str]]:
    from bundles.retinaunet_template.scripts.trainer import fold_data

    data = fold_data(task_name, plan.plan_id, fold)
    return Path(data["preprocessed_dir"]) / "imagesTr", list(data["val"])


def _gt_preprocessed(images_dir: Path, case: str, dim: int) -> dict[str, np.ndarray]:
    props = load_json(images_dir / f"{case}.json")
    return {"boxes": np.asarray(props["boxes"], np.float64).reshape(-1, 2 * dim),
            "labels": np.asarray(props["classes"], np.int64).reshape(-1)}


def _as_dict(det) -> dict[str, np.ndarray]:
    return {"boxes": np.asarray(det.boxes), "scores": np.asarray(det.scores), "labels": np.asarray(det.labels)}


def predict_val(task: str | int, fold: int = 0, model: str | None = None, plan: str | None = None,
                num_tta: int | None = None, ckpt: str = "last", overwrite: bool = False,
                device: str | None = None) -> Path:
    """Raw per-member predictions of the fold's validation cases (see module docstring); returns their folder."""
    from tqdm import tqdm

    inference, _, _ = _template()
    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = _plan_of(bundle)
    images_dir, cases = _val_cases(task_name, p, fold)
    out = bundle / f"fold{fold}" / "sweep_predictions"
    todo = [c for c in cases if overwrite or not (out / f"{c}{RAW_SUFFIX}").is_file()]
    if not todo:
        logger.info("validation predictions of fold %d exist in %s (overwrite to recompute)", fold, out)
        return out
    det, dev = load_detector(bundle, fold, ckpt, device), _device(device)
    for case in tqdm(todo, desc=f"predict val fold {fold}", unit="case"):
        image = np.load(images_dir / f"{case}.npy", mmap_mode="r")
        pred = inference.predict_case([det], image, p.patch_size, p.batch_size, num_tta=num_tta, device=dev)
        inference.save_raw_predictions(pred, out / f"{case}{RAW_SUFFIX}")
    return out


def _load_raw_and_gt(bundle: Path, p: Plan, task_name: str, folds: Sequence[int]):
    inference, _, _ = _template()
    raws, gts, ids = [], [], []
    for fold in folds:
        images_dir, cases = _val_cases(task_name, p, fold)
        raw_dir = bundle / f"fold{fold}" / "sweep_predictions"
        missing = [c for c in cases if not (raw_dir / f"{c}{RAW_SUFFIX}").is_file()]
        if missing:
            raise FileNotFoundError(f"{raw_dir}: no raw predictions for {missing}; run `nndet_sweep` (or predict_val)")
        for case in cases:
            raws.append(inference.load_raw_predictions(raw_dir / f"{case}{RAW_SUFFIX}"))
            gts.append(_gt_preprocessed(images_dir, case, p.dim))
            ids.append(case)
    return raws, gts, ids


def sweep_params(raws, gts, classes: Sequence[str], out_dir: Path | None = None):
    """Coordinate search of the postprocessing parameters on stored raw predictions (+ JSON/plot)."""
    inference, sweep, evaluation = _template()

    present = sorted({int(c) for g in gts for c in g["labels"]})
    if not present:
        raise ValueError("the sweep cases hold no object; nothing to optimise")

    def objective(params: dict[str, Any]) -> float:
        preds = [_as_dict(inference.postprocess_members(r.members, r.shape, params)) for r in raws]
        m = evaluation.evaluate_boxes(preds, gts, classes, fast=True, per_class=True)
        # mean over the classes that have objects in these cases: nnDetection's class mean lets an absent
        # class enter as -1, which on a small fold makes the objective constant
        return float(np.mean([m[f"{classes[c]}_{sweep.SWEEP_METRIC}"] for c in present]))

    quiet = [logging.getLogger(), logging.getLogger(evaluation.__name__)]  # per-evaluation class warnings
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        result = sweep.coordinate_search(objective, progress=True)
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    if out_dir is not None:
        sweep.save_sweep(result, out_dir)
    return result


def sweep_fold(task: str | int, fold: int = 0, model: str | None = None, plan: str | None = None,
               num_tta: int | None = None, overwrite: bool = False, device: str | None = None):
    """`nndet_sweep TASK MODEL FOLD`: raw validation predictions (if missing) then the sweep."""
    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = _plan_of(bundle)
    predict_val(task_name, fold, bundle.name, num_tta=num_tta, overwrite=overwrite, device=device)
    raws, gts, _ = _load_raw_and_gt(bundle, p, task_name, [fold])
    result = sweep_params(raws, gts, _classes(p), bundle / f"fold{fold}" / "sweep")
    logger.info("fold %d sweep: %s %.4f -> %.4f with %s", fold, result.metric, result.default_score,
                result.score, result.params)
    return result


def _fold_params(bundle: Path, fold: int) -> dict[str, Any] | None:
    f = bundle / f"fold{fold}" / "sweep" / "params.json"
    return dict(load_json(f)["params"]) if f.is_file() else None


def evaluate_fold(task: str | int, fold: int = 0, model: str | None = None, plan: str | None = None,
                  plots: bool = True, analyze_boxes: bool = False) -> dict[str, float]:
    """`nndet_eval TASK MODEL FOLD`: validation metrics with the swept parameters (defaults if not swept)."""
    inference, _, evaluation = _template()
    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = _plan_of(bundle)
    raws, gts, ids = _load_raw_and_gt(bundle, p, task_name, [fold])
    params = _fold_params(bundle, fold)
    if params is None:
        logger.warning("fold %d has no sweep result: evaluating nnDetection's default parameters", fold)
    preds = [_as_dict(inference.postprocess_members(r.members, r.shape, params)) for r in raws]
    out = bundle / f"fold{fold}" / "val_results"
    pred_dir = bundle / f"fold{fold}" / "val_predictions"
    for case, pred in zip(ids, preds, strict=True):
        save_json({"case_id": case, "frame": "preprocessed voxels (StandardMode, half-open)", **pred},
                  pred_dir / f"{case}_boxes.json")
    images_dir = _images_dir(task_name, p)
    return _evaluate_and_plot(preds, gts, ids, _classes(p), out, plots,
                              lambda c: np.load(images_dir / f"{c}.npy", mmap_mode="r")[0], analyze_boxes)


def _evaluate_and_plot(preds, gts, ids, classes, out: Path, plots: bool, image_of,
                       analyze_boxes: bool = False) -> dict[str, float]:
    _, _, evaluation = _template()
    metrics, curves = evaluation.evaluate_boxes_detailed(preds, gts, classes)
    evaluation.save_results(metrics, out)
    if analyze_boxes:
        from planner.analysis import analyze_boxes as analyze

        analyze(preds, gts, ids, classes, out)
    if plots:
        from bundles.retinaunet_template.scripts import eval_plots

        eval_plots.plot_all(curves, out)
        examples = [{"case_id": c, "image": np.asarray(image_of(c)), "pred_boxes": pr["boxes"],
                     "pred_scores": pr["scores"], "gt_boxes": gt["boxes"]}
                    for c, pr, gt in list(zip(ids, preds, gts, strict=True))[:NUM_EXAMPLE_PLOTS]]
        eval_plots.plot_examples(examples, out / "examples")
    logger.info("results written to %s", out / "results_boxes.json")
    return metrics


def trained_folds(bundle: Path) -> list[int]:
    """Folds with a finished ``model_last.pt``."""
    return [int(d.name[4:]) for d in sorted(bundle.glob("fold*"))
            if d.name[4:].isdigit() and fold_finished(d / "model_last.pt") is not None]


def ensemble_params(bundle: Path, folds: Sequence[int]) -> dict[str, Any] | None:
    """Postprocessing parameters for an ensemble of ``folds``: one fold's sweep, or (several folds) a sweep over
    the union of their raw validation predictions (nndet_consolidate --sweep_boxes), cached in
    ``<bundle>/consolidated_sweep/params.json``; None (defaults) when folds were not swept."""
    if len(folds) == 1:
        return _fold_params(bundle, folds[0])
    cache = bundle / "consolidated_sweep" / "params.json"
    if cache.is_file() and load_json(cache).get("folds") == list(folds):
        return dict(load_json(cache)["params"])
    p = _plan_of(bundle)
    try:
        raws, gts, _ = _load_raw_and_gt(bundle, p, p.task, folds)
    except FileNotFoundError as e:
        logger.warning("%s: using nnDetection's default postprocessing parameters", e)
        return None
    result = sweep_params(raws, gts, _classes(p), cache.parent)
    save_json({**result.to_dict(), "folds": list(folds)}, cache)
    return result.params


def predict_test(task: str | int, model: str | None = None, plan: str | None = None,
                 folds: Sequence[int] | None = None, num_tta: int | None = None, overwrite: bool = False,
                 device: str | None = None, *, preprocess: bool = True, check: bool = False,
                 num_processes_preprocessing: int | None = None, force_args: bool = False) -> Path:
    """`nndet_predict TASK MODEL [--fold -1] [--no_preprocess] [--check] [-npp N] [--force_args]`: the ensemble
    of ``folds`` (default: all trained) on the test cases; per case ``<bundle>/test_predictions/<case>_boxes.json``.

    Args:
        preprocess: first preprocess ``raw_splitted/imagesTs`` with the bundle's preprocessing definition into
            ``preprocessed/<plan>/imagesTs`` (done cases are skipped); False uses what is there.
        check: dataset checks of the test images (:func:`planner.checks.check_test_cases`) before anything runs.
        num_processes_preprocessing: workers for the checks and the preprocessing (default ``det_num_threads``).
        force_args: predict even though the model was trained on another task (its plan's ``task``).
        overwrite: predict cases whose json exists (else they are skipped when made with the same folds).

    Raises:
        ValueError: model of another task without ``force_args``; test cases with another modality count.
        DatasetError: ``check`` found problems (every one is listed).
        FileNotFoundError: no test case, or with ``preprocess=False`` a test case that is not preprocessed.
        FileExistsError: existing predictions were made with other folds (without ``overwrite``).
    """
    from tqdm import tqdm

    from planner.dataset import load_dataset_info
    from planner.testset import cases_to_predict, check_model_task, select_test_cases

    inference, _, _ = _template()
    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = _plan_of(bundle)
    task_root = paths.det_data() / task_name
    check_model_task(p, task_name, load_dataset_info(task_root).task, bundle, force_args)
    folds = _folds_or_trained(bundle, folds)
    nproc = paths.num_threads() if num_processes_preprocessing is None else num_processes_preprocessing
    if check:
        from planner.checks import check_test_cases

        check_test_cases(task_root, num_processes=nproc)
    cases = select_test_cases(task_name, p, bundle, _images_dir(task_name, p, "Ts"), preprocess)
    out = bundle / "test_predictions"
    todo = cases_to_predict(out, cases, folds, overwrite)
    if not todo:
        logger.info("test predictions exist in %s (overwrite to recompute)", out)
        return out
    images_dir = _images_dir(task_name, p, "Ts")
    if preprocess:
        from planner.preprocess.run import preprocess_task

        preprocess_task(task_root, bundle, p, num_processes=nproc, splits=("Ts",))
    from bundles.retinaunet_template.scripts.predict import prediction_record

    params = ensemble_params(bundle, folds)
    dets = [load_detector(bundle, f, "last", device) for f in folds]
    dev = _device(device)
    for case in tqdm(todo, desc=f"predict test ({len(folds)} fold(s))", unit="case"):
        props = load_json(images_dir / f"{case}.json")
        image = np.load(images_dir / f"{case}.npy", mmap_mode="r")
        pred = inference.predict_case(dets, image, p.patch_size, p.batch_size, num_tta=num_tta, params=params,
                                      device=dev).detections
        save_json(prediction_record(case, pred, props, props["affine"], p.labels, params, task_name, bundle.name,
                                    folds), out / f"{case}_boxes.json")
    return out


def _gt_raw(task_root: Path, case: str, dim: int) -> dict[str, np.ndarray]:
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
    p = _plan_of(bundle)
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
        gts.append(_gt_raw(task_root, d["case_id"], p.dim))
        ids.append(d["case_id"])

    def image_of(case: str):
        from planner.nifti import load_nifti

        return load_nifti(task_root / "raw_splitted" / "imagesTs" / f"{case}_0000.nii.gz", p.dim)[0]

    return _evaluate_and_plot(preds, gts, ids, _classes(p), bundle / "test_results", plots, image_of, analyze_boxes)


def predict_dir(task: str | int, input_dir: str | Path, output_dir: str | Path, model: str | None = None,
                plan: str | None = None, folds: Sequence[int] | None = None, num_tta: int | None = None,
                overwrite: bool = False, device: str | None = None) -> Path:
    """`nndet_predict TASK --input_dir IN --output_dir OUT`: any folder of raw NIfTI cases (``<case>_0000.nii.gz``
    per modality) through the bundle's own preprocessing definition and the fold ensemble; writes
    ``<output_dir>/<case>_boxes.json`` with the fields of :func:`predict_test` (the consolidated bundle's
    ``inference.json`` runs the same function)."""
    from planner.preprocess.run import load_preprocessing

    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = _plan_of(bundle)
    from bundles.retinaunet_template.scripts import predict as predict_mod

    folds = _folds_or_trained(bundle, folds)
    cases = predict_mod.find_cases(input_dir, len(p.modalities), p.modalities)
    params = ensemble_params(bundle, folds)
    dets = [load_detector(bundle, f, "last", device) for f in folds]
    return predict_mod.predict_folder(cases, output_dir, dets, load_preprocessing(bundle), p.patch_size, p.batch_size,
                                      num_tta=num_tta, params=params, device=_device(device), overwrite=overwrite,
                                      task=task_name, model=bundle.name, folds=folds, classes=p.labels)
