"""`nndet_sweep` as an API: raw validation predictions of a fold, then the postprocessing sweep on them.

* :func:`predict_val`: every validation case of a fold through the fold's network x mirror TTA; the raw
  per-member boxes go to ``fold<X>/sweep_predictions/<case>_raw.npz`` (preprocessed voxels), so the sweep
  and the evaluation never run the network again (nnDetection's ``sweep_predictions``).
* :func:`sweep_fold`: nnDetection's coordinate search of the postprocessing parameters (its
  ``BoxSweeper``) on those raw predictions, maximising ``mAP_IoU_0.10_0.50_0.05_MaxDet_100`` ->
  ``fold<X>/sweep/params.json`` + plot.
* :func:`ensemble_params`: the parameters for an ensemble of folds (one fold's sweep, or a sweep over the
  union of the folds' raw validation predictions), used by prediction and consolidation.

Every function runs the code of the bundle it works on (:mod:`workflow.bundle_code`). Boxes are MONAI
StandardMode, half-open: ``[x1, y1, z1, x2, y2, z2]`` covers voxels x1..x2-1 etc.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planner import paths
from planner.io import load_json, save_json
from planner.plan.plan import Plan
from workflow.bundle_code import bundle_module
from workflow.models import TRAIN_CONFIG, bundle_for, bundle_plan, class_names

logger = logging.getLogger(__name__)

RAW_SUFFIX = "_raw.npz"


def resolve_device(bundle: Path, device: str | None = None):
    """The torch device inference runs on (the bundle's rule: CUDA when available unless ``device`` says)."""
    return bundle_module(bundle, "predict").resolve_device(device)


def load_detector(bundle: Path, fold: int, ckpt: str = "last", device: str | None = None):
    """The fold's detector: the network definition of the bundle's ``train.json`` (``network_def``, the one
    definition train and inference share) with ``fold<X>/model_<ckpt>.pt`` weights, in eval mode."""
    weights = bundle / f"fold{fold}" / f"model_{ckpt}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: fold {fold} is not trained; run `nndet_train ... -o exp.fold={fold}`")
    return bundle_module(bundle, "predict").load_detectors(bundle / TRAIN_CONFIG, [weights], bundle, device=device)[0]


def images_dir(task_name: str, plan: Plan, split: str = "Tr") -> Path:
    """``$det_data/<task>/preprocessed/<plan>/images<split>``."""
    return paths.det_data() / task_name / "preprocessed" / plan.plan_id / f"images{split}"


def val_cases(bundle: Path, task_name: str, plan: Plan, fold: int) -> tuple[Path, list[str]]:
    """(preprocessed imagesTr folder, the fold's validation case ids) from the bundle's splits rule."""
    data = bundle_module(bundle, "trainer").fold_data(task_name, plan.plan_id, fold)
    return Path(data["preprocessed_dir"]) / "imagesTr", list(data["val"])


def gt_preprocessed(images: Path, case: str, dim: int) -> dict[str, np.ndarray]:
    """Ground-truth boxes and labels of a preprocessed case (its ``<case>.json``)."""
    props = load_json(images / f"{case}.json")
    return {"boxes": np.asarray(props["boxes"], np.float64).reshape(-1, 2 * dim),
            "labels": np.asarray(props["classes"], np.int64).reshape(-1)}


def as_dict(det) -> dict[str, np.ndarray]:
    """A detections object (``boxes``, ``scores``, ``labels``) as a dict of numpy arrays."""
    return {"boxes": np.asarray(det.boxes), "scores": np.asarray(det.scores), "labels": np.asarray(det.labels)}


def predict_val(task: str | int, fold: int = 0, model: str | None = None, plan: str | None = None,
                num_tta: int | None = None, ckpt: str = "last", overwrite: bool = False,
                device: str | None = None) -> Path:
    """Raw per-member predictions of the fold's validation cases (see module docstring); returns their folder."""
    from tqdm import tqdm

    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    inference = bundle_module(bundle, "inference")
    p = bundle_plan(bundle)
    images, cases = val_cases(bundle, task_name, p, fold)
    out = bundle / f"fold{fold}" / "sweep_predictions"
    todo = [c for c in cases if overwrite or not (out / f"{c}{RAW_SUFFIX}").is_file()]
    if not todo:
        logger.info("validation predictions of fold %d exist in %s (overwrite to recompute)", fold, out)
        return out
    det, dev = load_detector(bundle, fold, ckpt, device), resolve_device(bundle, device)
    for case in tqdm(todo, desc=f"predict val fold {fold}", unit="case"):
        image = np.load(images / f"{case}.npy", mmap_mode="r")
        pred = inference.predict_case([det], image, p.patch_size, p.batch_size, num_tta=num_tta, device=dev)
        inference.save_raw_predictions(pred, out / f"{case}{RAW_SUFFIX}")
    return out


def load_raw_and_gt(bundle: Path, p: Plan, task_name: str, folds: Sequence[int]):
    """(raw member predictions, ground truth, case ids) of the validation cases of ``folds``."""
    inference = bundle_module(bundle, "inference")
    raws, gts, ids = [], [], []
    for fold in folds:
        images, cases = val_cases(bundle, task_name, p, fold)
        raw_dir = bundle / f"fold{fold}" / "sweep_predictions"
        missing = [c for c in cases if not (raw_dir / f"{c}{RAW_SUFFIX}").is_file()]
        if missing:
            raise FileNotFoundError(f"{raw_dir}: no raw predictions for {missing}; run `nndet_sweep` (or predict_val)")
        for case in cases:
            raws.append(inference.load_raw_predictions(raw_dir / f"{case}{RAW_SUFFIX}"))
            gts.append(gt_preprocessed(images, case, p.dim))
            ids.append(case)
    return raws, gts, ids


def sweep_params(bundle: Path, raws, gts, classes: Sequence[str], out_dir: Path | None = None):
    """Coordinate search of the postprocessing parameters on stored raw predictions (+ JSON/plot), with the
    bundle's own inference, sweep and evaluation code."""
    inference, sweep, evaluation = (bundle_module(bundle, n) for n in ("inference", "sweep", "evaluation"))
    present = sorted({int(c) for g in gts for c in g["labels"]})
    if not present:
        raise ValueError("the sweep cases hold no object; nothing to optimise")

    def objective(params: dict[str, Any]) -> float:
        preds = [as_dict(inference.postprocess_members(r.members, r.shape, params)) for r in raws]
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
    p = bundle_plan(bundle)
    predict_val(task_name, fold, bundle.name, num_tta=num_tta, overwrite=overwrite, device=device)
    raws, gts, _ = load_raw_and_gt(bundle, p, task_name, [fold])
    result = sweep_params(bundle, raws, gts, class_names(p), bundle / f"fold{fold}" / "sweep")
    logger.info("fold %d sweep: %s %.4f -> %.4f with %s", fold, result.metric, result.default_score,
                result.score, result.params)
    return result


def fold_params(bundle: Path, fold: int) -> dict[str, Any] | None:
    """A fold's swept parameters (``fold<X>/sweep/params.json``), None when it was not swept."""
    f = bundle / f"fold{fold}" / "sweep" / "params.json"
    return dict(load_json(f)["params"]) if f.is_file() else None


def ensemble_params(bundle: Path, folds: Sequence[int]) -> dict[str, Any] | None:
    """Postprocessing parameters for an ensemble of ``folds``: one fold's sweep, or (several folds) a sweep over
    the union of their raw validation predictions (nndet_consolidate --sweep_boxes), cached in
    ``<bundle>/consolidated_sweep/params.json``; None (defaults) when folds were not swept."""
    if len(folds) == 1:
        return fold_params(bundle, folds[0])
    cache = bundle / "consolidated_sweep" / "params.json"
    if cache.is_file() and load_json(cache).get("folds") == list(folds):
        return dict(load_json(cache)["params"])
    p = bundle_plan(bundle)
    try:
        raws, gts, _ = load_raw_and_gt(bundle, p, p.task, folds)
    except FileNotFoundError as e:
        logger.warning("%s: using nnDetection's default postprocessing parameters", e)
        return None
    result = sweep_params(bundle, raws, gts, class_names(p), cache.parent)
    save_json({**result.to_dict(), "folds": list(folds)}, cache)
    return result.params
