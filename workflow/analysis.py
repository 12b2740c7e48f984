"""`nndet_eval ... --analyze_boxes`: what each object got and where the false positives are, as tables.

The metrics of ``results_boxes.json`` say how good a model is; this says *which* objects it misses and
*which* boxes cost precision, so that a researcher can open those cases. Written next to the results:

* ``analysis/objects.csv``: one row per ground-truth object: case, class, box, size (voxels per axis),
  and the best prediction overlapping it (by score, among predictions with IoU >= ``iou``): its score,
  label, IoU, whether the class is right, and the rank of that score among all predictions of the class
  over all cases (1 = highest), plus the best IoU of any prediction of the right class.
* ``analysis/false_positives.csv``: every prediction with score >= ``min_score`` that matches no object
  of its class at IoU >= ``iou``: case, score, label, box, best IoU with an object of any class and that
  object's class (so wrong-class boxes on a true object are told apart from boxes on background).
* ``analysis/summary.json``: counts, the objects missed at that IoU, the hardest objects (lowest best
  score) and the highest-scored false positives.

Matching here is deliberately simple (per object: best-scored overlapping prediction; no one-to-one
assignment) because it is a diagnostic; the metrics use COCO matching (scripts/evaluation.py).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planner.io import save_json

logger = logging.getLogger(__name__)

ANALYSIS_DIR = "analysis"


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of StandardMode boxes (2D or 3D), float64, through ``ops.box_iou``."""
    import ops

    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.size == 0 or b.size == 0:
        return np.zeros((len(a), len(b)))
    return np.asarray(ops.box_iou(a, b), np.float64)


def analyze_boxes(preds: Sequence[dict[str, np.ndarray]], gts: Sequence[dict[str, np.ndarray]],
                  case_ids: Sequence[str], classes: Sequence[str], out_dir: str | Path, iou: float = 0.1,
                  min_score: float = 0.1, top: int = 10) -> dict[str, Any]:
    """Write the analysis tables of the module docstring under ``out_dir/analysis`` and return the summary.

    Args:
        preds: per case ``{"boxes" [N, 2*dim], "scores" [N], "labels" [N]}``.
        gts: per case ``{"boxes" [M, 2*dim], "labels" [M]}``, same frame as ``preds``.
        case_ids: names of the cases, same order.
        classes: class names by label index.
        iou: overlap for "found" and for a false positive (nnDetection's main IoU 0.1).
        min_score: false positives below this score are not listed (they rarely matter and are many).
        top: length of the lists in the summary.
    """
    if not (len(preds) == len(gts) == len(case_ids)):
        raise ValueError(f"{len(preds)} predictions, {len(gts)} ground truths and {len(case_ids)} case ids differ")
    out = Path(out_dir) / ANALYSIS_DIR
    out.mkdir(parents=True, exist_ok=True)

    def name(k: int) -> str:
        return classes[k] if 0 <= k < len(classes) else str(k)

    all_scores = {c: np.sort(np.concatenate([np.asarray(p["scores"])[np.asarray(p["labels"]) == c]
                                             for p in preds] or [np.zeros(0)]))[::-1] for c in range(len(classes))}

    def rank(c: int, s: float) -> int:
        return int(np.sum(all_scores.get(c, np.zeros(0)) > s)) + 1

    objects, fps = [], []
    for case, p, g in zip(case_ids, preds, gts, strict=True):
        pb, ps, pl = (np.asarray(p[k]) for k in ("boxes", "scores", "labels"))
        gb, gl = np.asarray(g["boxes"]), np.asarray(g["labels"])
        m = box_iou_np(gb, pb)
        d = gb.shape[1] // 2 if gb.size else (pb.shape[1] // 2 if pb.size else 3)
        for i in range(len(gb)):
            c = int(gl[i])
            over = np.flatnonzero(m[i] >= iou)
            row = {"case": case, "class": name(c), "box": [round(float(v), 1) for v in gb[i]],
                   "size": [round(float(gb[i, d + a] - gb[i, a]), 1) for a in range(d)]}
            same = over[pl[over] == c] if len(over) else over
            if len(same):
                j = same[np.argmax(ps[same])]
                row.update(found=True, score=float(ps[j]), label=name(int(pl[j])), iou=float(m[i, j]),
                           right_class=True, rank_in_class=rank(c, float(ps[j])))
            elif len(over):
                j = over[np.argmax(ps[over])]
                row.update(found=False, score=float(ps[j]), label=name(int(pl[j])), iou=float(m[i, j]),
                           right_class=False, rank_in_class=None)
            else:
                row.update(found=False, score=None, label=None, iou=None, right_class=None, rank_in_class=None)
            right = m[i][pl == c] if len(pb) else np.zeros(0)
            row["best_iou_right_class"] = float(right.max()) if right.size else 0.0
            objects.append(row)
        for j in range(len(pb)):
            if ps[j] < min_score:
                continue
            same_cls = gl == pl[j]
            if len(gb) and np.any(m[same_cls, j] >= iou):
                continue
            k = int(np.argmax(m[:, j])) if len(gb) else -1
            fps.append({"case": case, "score": float(ps[j]), "label": name(int(pl[j])),
                        "box": [round(float(v), 1) for v in pb[j]],
                        "best_iou_any_object": float(m[k, j]) if k >= 0 else 0.0,
                        "that_object_class": name(int(gl[k])) if k >= 0 and m[k, j] > 0 else None})
    fps.sort(key=lambda r: -r["score"])
    _write_csv(out / "objects.csv", objects)
    _write_csv(out / "false_positives.csv", fps)
    found = [o for o in objects if o["found"]]
    summary = {
        "iou": iou, "min_score_false_positives": min_score, "num_objects": len(objects), "num_found": len(found),
        "num_cases": len(case_ids),
        "missed": [o for o in objects if not o["found"]],
        "hardest_found": sorted(found, key=lambda o: o["score"])[:top],
        "top_false_positives": fps[:top],
        "false_positives_on_objects_of_other_class": sum(1 for f in fps if f["that_object_class"] is not None
                                                         and f["best_iou_any_object"] >= iou),
        "files": {"objects": str(out / "objects.csv"), "false_positives": str(out / "false_positives.csv")},
    }
    save_json(summary, out / "summary.json")
    logger.info("box analysis: %d/%d objects found at IoU %.2f, %d false positive(s) with score >= %.2f -> %s",
                len(found), len(objects), iou, len(fps), min_score, out)
    return summary


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()})
    tmp.replace(path)


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: found objects, misses, hardest hits, top false positives."""
    lines = [f"\nbox analysis (IoU {summary['iou']}): {summary['num_found']}/{summary['num_objects']} objects found "
             f"in {summary['num_cases']} case(s)"]
    for o in summary["missed"][:5]:
        extra = f"best overlap: {o['label']} at {o['score']:.2f} (IoU {o['iou']:.2f})" if o["score"] is not None \
            else "no prediction overlaps it"
        lines.append(f"  missed  {o['case']} {o['class']} size {o['size']}: {extra}")
    for o in summary["hardest_found"][:3]:
        lines.append(f"  lowest  {o['case']} {o['class']} size {o['size']}: score {o['score']:.2f}, IoU {o['iou']:.2f}, "
                     f"rank {o['rank_in_class']} in its class")
    for f in summary["top_false_positives"][:3]:
        on = f"on a {f['that_object_class']} (IoU {f['best_iou_any_object']:.2f})" if f["that_object_class"] else \
            "on background"
        lines.append(f"  false+  {f['case']} {f['label']} score {f['score']:.2f} {on}")
    lines.append(f"  tables: {summary['files']['objects']}, {summary['files']['false_positives']}")
    return "\n".join(lines)
