"""`nndet_eval TASK --test --masks`: how good is the mask of each detected object (``nndet_predict --masks``)?

Per ground-truth instance of ``raw_splitted/labelsTs`` (instance maps): among the predicted boxes that overlap
its box with IoU >= ``iou``, the highest-scoring one is its detection (the one a reader sees first); the Dice
of that finding's mask (``<case>_masks.npz``) with the instance's voxels is its score. Objects without such a
box are counted as missed and get no Dice. Writes ``test_results/mask_dice.json`` (per class and pooled:
objects, detected, mean / median / min Dice) and ``mask_dice.csv`` (one row per object).
"""

from __future__ import annotations

import csv
import logging
from typing import Any

import numpy as np

from planner import paths
from planner.io import atomic_path, load_json, save_json
from workflow.bundle_code import bundle_module
from workflow.models import bundle_for, bundle_plan, class_names

logger = logging.getLogger(__name__)

MATCH_IOU = 0.1


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from ops import box_iou

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return np.asarray(box_iou(a.astype(np.float32), b.astype(np.float32)))


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    d = [r["dice"] for r in rows if r["dice"] is not None]
    return {"objects": len(rows), "detected": len(d), "mean_dice": float(np.mean(d)) if d else None,
            "median_dice": float(np.median(d)) if d else None, "min_dice": float(np.min(d)) if d else None}


def evaluate_test_masks(task: str | int, model: str | None = None, plan: str | None = None,
                        iou: float = MATCH_IOU) -> dict[str, Any]:
    """Dice per detected test object (see module docstring); returns the ``mask_dice.json`` content.

    Raises:
        FileNotFoundError: no test prediction with masks (``nndet_predict --masks``), or no labelsTs.
        ValueError: the task's test labels are boxes (no instance masks to compare with).
    """
    from planner.dataset import load_dataset_info
    from planner.fingerprint import instance_boxes
    from planner.nifti import label_to_int, load_instances_json, load_nifti

    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = bundle_plan(bundle)
    task_root = paths.det_data() / task_name
    if load_dataset_info(task_root).annotation == "boxes":
        raise ValueError(f"{task_root / 'dataset.json'}: the task is annotated with boxes; mask Dice needs instance "
                         "masks in labelsTs")
    pred_dir, labels_dir = bundle / "test_predictions", task_root / "raw_splitted" / "labelsTs"
    files = [f for f in sorted(pred_dir.glob("*_boxes.json")) if "masks_file" in load_json(f)]
    if not files:
        raise FileNotFoundError(f"{pred_dir}: no test prediction with masks; run `nndet_predict {task_name} --masks`")
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"{labels_dir}: no test labels to compare the masks with")
    masks_mod = bundle_module(bundle, "masks")
    names = class_names(p)
    rows: list[dict[str, Any]] = []
    for f in files:
        pred = load_json(f)
        case = pred["case_id"]
        masks, _ = masks_mod.load_masks(pred_dir / pred["masks_file"])
        seg, _ = load_nifti(labels_dir / f"{case}.nii.gz", p.dim)
        seg = label_to_int(seg, labels_dir / f"{case}.nii.gz")
        classes = load_instances_json(labels_dir / f"{case}.json")
        ids, gt_boxes = instance_boxes(seg)
        boxes = np.asarray(pred["boxes"], np.float64).reshape(-1, 2 * p.dim)
        scores = np.asarray(pred["scores"], np.float64)
        ious = _box_iou(np.asarray(gt_boxes, np.float64).reshape(-1, 2 * p.dim), boxes)
        for g, inst in enumerate(ids):
            cand = np.nonzero(ious[g] >= iou)[0] if ious.size else np.zeros(0, int)
            row = {"case_id": case, "instance": int(inst), "class": int(classes[inst]),
                   "class_name": names[int(classes[inst])] if int(classes[inst]) < len(names) else str(classes[inst]),
                   "finding": None, "score": None, "iou": None, "dice": None}
            if len(cand):
                k = int(cand[np.argmax(scores[cand])])
                row.update(finding=k, score=float(scores[k]), iou=float(ious[g, k]),
                           dice=float(masks_mod.dice(masks[k], seg == inst)))
            rows.append(row)
    result = {"iou": iou, "pooled": _summary(rows),
              "per_class": {names[c] if c < len(names) else str(c): _summary([r for r in rows if r["class"] == c])
                            for c in sorted({r["class"] for r in rows})},
              "cases": len(files), "predictions": str(pred_dir)}
    out = bundle / "test_results"
    save_json(result, out / "mask_dice.json")
    with atomic_path(out / "mask_dice.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["case_id"])
        w.writeheader()
        w.writerows(rows)
    logger.info("mask Dice of %d test object(s): %s", len(rows), out / "mask_dice.json")
    return result


def mask_dice_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`evaluate_test_masks`'s result."""
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"== mask Dice per detected object (IoU >= {result['iou']}, highest-scoring box) ==", "",
             "| class | objects | detected | mean Dice | median | min |", "|---|---|---|---|---|---|"]
    for name, s in [*result["per_class"].items(), ("all", result["pooled"])]:
        lines.append(f"| {name} | {s['objects']} | {s['detected']} | {fmt(s['mean_dice'])} | "
                     f"{fmt(s['median_dice'])} | {fmt(s['min_dice'])} |")
    return "\n".join(lines)

