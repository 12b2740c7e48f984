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

IoU is unchanged by per-axis scaling, so a plan scored in original voxels against its own restored ground
truth gives its own ``nndet_eval`` numbers; for the ensemble original voxels are the only common frame. The
table uses one truth for every row (the first plan's), so another plan's row can differ a little from its
``nndet_eval`` numbers where its resampled instance maps give other ground-truth boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planner import paths
from planner.io import save_json
from workflow.bundle_code import bundle_module
from workflow.ensemble import consolidate_ensemble, ensemble_name, ensemble_oof, oof_predictions
from workflow.models import (
    bundle_for,
    bundle_plan,
    class_names,
    consolidated_folds,
    task_plans,
    trained_folds,
)

logger = logging.getLogger(__name__)

BEST_FILE = "best_configuration.json"
ENSEMBLE = "ensemble"
TABLE_KEYS = ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "AP_IoU_0.50_MaxDet_100",
              "FROC_score_IoU_0.10")


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
        consolidate: consolidate the winner: a plan (``nndet_consolidate``), or the ensemble as one bundle holding
            every plan's folds, each with its own preprocessing (``workflow.ensemble.consolidate_ensemble``).
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
        ens = [ensemble_oof(bundles[ref], [oof[pid][c][0] for pid in ids]) for c in cases]
        rows[ENSEMBLE] = _score(bundles[ref], ens, gts, classes)
    best = max(rows, key=lambda k: (rows[k]["objective"], k != ENSEMBLE))  # a tie goes to a single plan
    criterion = f"{rows[best]['objective_metric']} (mean over classes present), out-of-fold validation"
    result = {"task": task_name, "folds": folds, "cases": len(cases), "plans": ids, "best": best,
              "criterion": criterion, "candidates": rows,
              "consolidated_plan": best if consolidate and best != ENSEMBLE else None,
              "consolidated_ensemble": ids if consolidate and best == ENSEMBLE else None}
    if consolidate and best == ENSEMBLE:
        selection = (f"nndet_find_best: the ensemble scored best ({criterion}: {rows[ENSEMBLE]['objective']:.4f}; "
                     + ", ".join(f"{pid} {rows[pid]['objective']:.4f}" for pid in ids) + ")")
        ens_dir = paths.det_models() / task_name / ensemble_name(ids)
        done = ens_dir / "consolidated" if consolidated_folds(ens_dir) == folds and not overwrite else None
        result["consolidated"] = str(done or consolidate_ensemble(task_name, ids, folds, overwrite=overwrite,
                                                                  selection=selection))
        result["consolidated_model"] = ensemble_name(ids)
    elif consolidate:
        from workflow.consolidate import consolidate as run_consolidate

        b = bundles[best]
        have = consolidated_folds(b)
        if have != folds:
            run_consolidate(task_name, plan=best, folds=folds, overwrite=overwrite)
        result["consolidated"] = str(b / "consolidated")
        result["consolidated_model"] = b.name
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
