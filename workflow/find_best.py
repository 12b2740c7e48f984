"""`nndet_find_best TASK`: choose between the trained plans of a task by cross-validation (nnU-Net's
``find_best_configuration``, for detection).

For every plan with the requested folds trained and swept (``nndet_sweep``), the out-of-fold validation
predictions (each case predicted by the fold that did not train on it, with that fold's swept
postprocessing) are restored to the original image's voxels, where the plans can be compared and combined.
The candidates are each plan alone and, with two or more plans, their ensemble: per case the plans'
detections clustered by weighted box clustering (``inference.ensemble_members``, IoU 0.5, nnDetection's
ensembling). All are scored with the bundle's evaluation against the same ground truth (the main plan's
boxes restored to original voxels); the criterion is the sweep's objective (``sweep.SWEEP_METRIC``, the mean
over the classes present), and the table carries AP@0.1, mAP@0.1:0.5, AP@0.5, FROC and the per-class values.
The choice with every number goes to ``$det_models/<task>/best_configuration.json``.

IoU is unchanged by per-axis scaling, so comparing in original voxels is what comparing in each plan's
own preprocessed voxels would give for one plan; for the ensemble it is the only common frame.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planner import paths
from planner.io import load_json, save_json
from workflow.bundle_code import bundle_module
from workflow.models import (
    bundle_for,
    bundle_plan,
    class_names,
    consolidated_folds,
    task_plans,
    trained_folds,
)
from workflow.sweep import RAW_SUFFIX, as_dict, fold_params, gt_preprocessed, val_cases

logger = logging.getLogger(__name__)

BEST_FILE = "best_configuration.json"
ENSEMBLE = "ensemble"
TABLE_KEYS = ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "AP_IoU_0.50_MaxDet_100",
              "FROC_score_IoU_0.10")


def oof_predictions(bundle: Path, folds: Sequence[int]) -> dict[str, tuple[dict, dict]]:
    """case id -> (prediction, ground truth), both in original voxels, of the folds' validation cases.

    Raises:
        FileNotFoundError: a fold lacks its sweep (raw predictions and swept parameters).
    """
    p = bundle_plan(bundle)
    inference = bundle_module(bundle, "inference")
    out = {}
    for fold in folds:
        params = fold_params(bundle, fold)
        raw_dir = bundle / f"fold{fold}" / "sweep_predictions"
        if params is None or not raw_dir.is_dir():
            raise FileNotFoundError(f"{bundle.name} fold {fold}: not swept; run `nndet_sweep {p.task} {bundle.name} "
                                    f"{fold}` (or `nndet run {p.task} --plan {p.plan_id}`)")
        images, cases = val_cases(bundle, p.task, p, fold)
        for case in cases:
            raw = inference.load_raw_predictions(raw_dir / f"{case}{RAW_SUFFIX}")
            pred = as_dict(inference.postprocess_members(raw.members, raw.shape, params))
            props = load_json(images / f"{case}.json")
            gt = gt_preprocessed(images, case, p.dim)
            pred["boxes"] = inference.restore_boxes(pred["boxes"], props)
            gt = {**gt, "boxes": inference.restore_boxes(gt["boxes"], props)}
            out[case] = (pred, gt)
    return out


def _score(bundle: Path, preds: list[dict], gts: list[dict], classes: Sequence[str]) -> dict[str, Any]:
    evaluation, sweep = bundle_module(bundle, "evaluation"), bundle_module(bundle, "sweep")
    m = evaluation.evaluate_boxes(preds, gts, classes, per_class=True)
    present = sorted({int(c) for g in gts for c in g["labels"]})
    objective = float(np.mean([m[f"{classes[c]}_{sweep.SWEEP_METRIC}"] for c in present])) if present else 0.0
    per_class = {c: {k: float(m[f"{c}_{k}"]) for k in TABLE_KEYS if f"{c}_{k}" in m} for c in classes}
    return {"objective": objective, "objective_metric": sweep.SWEEP_METRIC,
            **{k: float(m[k]) for k in TABLE_KEYS if k in m}, "per_class": per_class}


def candidate_plans(task_name: str, folds: Sequence[int], plans: Sequence[str] | None = None) -> list[str]:
    """The given plans, or every plan of the task whose bundle has all ``folds`` trained."""
    if plans:
        return list(plans)
    found = []
    for p in task_plans(task_name):
        try:
            if set(folds) <= set(trained_folds(bundle_for(task_name, plan=p.plan_id))):
                found.append(p.plan_id)
        except FileNotFoundError:
            continue
    return found


def find_best(task: str | int, folds: Sequence[int] = (0, 1, 2, 3, 4), plans: Sequence[str] | None = None,
              consolidate: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Score every candidate (each plan, their ensemble), write ``best_configuration.json``, consolidate the winner.

    Args:
        folds: the cross-validation folds to compare on (each must be trained and swept in every plan).
        plans: plan ids to compare (default: every plan with these folds trained).
        consolidate: consolidate the winning plan (``nndet_consolidate``); when the ensemble wins, the best single
            plan is consolidated (a bundle holding both plans' folds is not made yet) and the file says so.
        overwrite: replace a consolidated bundle of other folds.

    Raises:
        FileNotFoundError: no plan with these folds trained, or a fold not swept.
    """
    task_name = paths.resolve_task(task)
    folds = sorted(int(f) for f in folds)
    ids = candidate_plans(task_name, folds, plans)
    if not ids:
        raise FileNotFoundError(f"task {task_name}: no plan has folds {folds} trained; train them first "
                                f"(`nndet run {task_name} --plans all`)")
    bundles = {pid: bundle_for(task_name, plan=pid) for pid in ids}
    oof = {pid: oof_predictions(b, folds) for pid, b in bundles.items()}
    cases = sorted(set.intersection(*(set(o) for o in oof.values())))
    ref = ids[0]
    classes = class_names(bundle_plan(bundles[ref]))
    gts = [oof[ref][c][1] for c in cases]
    rows: dict[str, dict[str, Any]] = {}
    for pid in ids:
        rows[pid] = _score(bundles[ref], [oof[pid][c][0] for c in cases], gts, classes)
    if len(ids) > 1:
        inference = bundle_module(bundles[ref], "inference")
        ens = []
        for c in cases:
            members = [inference.Detections(oof[pid][c][0]["boxes"], oof[pid][c][0]["scores"],
                                            oof[pid][c][0]["labels"]) for pid in ids]
            ens.append(as_dict(inference.ensemble_members(members, ensemble_iou=0.5)))
        rows[ENSEMBLE] = _score(bundles[ref], ens, gts, classes)
    best = max(rows, key=lambda k: (rows[k]["objective"], k != ENSEMBLE))  # a tie goes to a single plan
    consolidated_plan = best if best != ENSEMBLE else max(ids, key=lambda k: rows[k]["objective"])
    result = {"task": task_name, "folds": folds, "cases": len(cases), "plans": ids, "best": best,
              "criterion": f"{rows[best]['objective_metric']} (mean over classes present), out-of-fold validation",
              "candidates": rows, "consolidated_plan": consolidated_plan if consolidate else None}
    if best == ENSEMBLE:
        result["note"] = ("the ensemble of the plans scores best; a consolidated bundle holding both plans is not "
                          f"made yet, so the best single plan ({consolidated_plan}) is consolidated")
    if consolidate:
        from workflow.consolidate import consolidate as run_consolidate

        b = bundles[consolidated_plan]
        have = consolidated_folds(b)
        if have != folds:
            run_consolidate(task_name, plan=consolidated_plan, folds=folds, overwrite=overwrite or have is not None)
        result["consolidated"] = str(b / "consolidated")
    out = paths.det_models() / task_name / BEST_FILE
    save_json(result, out)
    result["file"] = str(out)
    logger.info("best configuration of %s: %s (%s)", task_name, best, out)
    return result


def best_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`find_best`'s result, the winner marked."""
    keys = ("objective", *TABLE_KEYS)
    head = ["candidate", "objective", "AP@0.1", "mAP@0.1:0.5", "AP@0.5", "FROC@0.1"]
    lines = [f"== best configuration of {result['task']} (folds {result['folds']}, {result['cases']} out-of-fold "
             f"cases; objective {result['criterion']}) ==", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result["candidates"].items():
        mark = " **best**" if name == result["best"] else ""
        lines.append(f"| {name}{mark} | " + " | ".join(f"{r[k]:.4f}" if k in r else "-" for k in keys) + " |")
    if result.get("note"):
        lines.append(f"\n{result['note']}")
    if result.get("consolidated"):
        lines.append(f"\nconsolidated: {result['consolidated']}")
    lines.append(f"all numbers: {result.get('file', BEST_FILE)}")
    return "\n".join(lines)
