"""Operating points: the score threshold findings are reported at, chosen on validation data.

The detections are those the FROC of ``evaluation.py`` counts (:func:`evaluation.froc_detections`: the
same ``matching_batch`` at IoU 0.1, at most 100 detections per image and class, all images counted). For
every distinct score ``t`` (every point of the FROC curve) the detections scoring ``>= t`` give::

    TP, FP, FN = num_gt - TP
    sensitivity = TP / num_gt          (0 without ground truth)
    fppi        = FP / num_images      (all images, also those without objects or detections)
    precision   = TP / (TP + FP)       (0 without detections)
    f1          = 2 TP / (2 TP + FP + FN)

per class (its own detections and objects) and pooled over classes (``all``). Rows run from the highest
threshold down (FPPI and sensitivity non-decreasing).

:func:`choose` picks one threshold (rule strings as recorded in the consolidated bundle's metadata):

* default ``fppi<=1``: the lowest threshold whose FPPI <= 1; ``fppi=X``: ``fppi<=X`` likewise;
* ``min_sensitivity=S``: ``sensitivity>=S``, the highest threshold whose sensitivity >= S;
* ``threshold=T``: ``threshold=T``, the counts of the detections scoring >= T.

The table is plain JSON data (lists of dicts), so ``operating_points.json`` loads back into it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planner.io import atomic_path, save_json

from .evaluation import FPPI_THRESHOLDS, froc_detections

CSV_FILE = "operating_points.csv"
JSON_FILE = "operating_points.json"
POOLED = "all"  # the ``class`` of the rows pooled over classes
DEFAULT_FPPI = 1.0
IOU = 0.1
FIELDS = ("threshold", "sensitivity", "fppi", "precision", "f1", "tp", "fp", "fn")
CSV_COLUMNS = ("class", *FIELDS, "num_gt", "num_images")
_EPS = 1e-9  # FP / num_images and TP / num_gt against a rule's decimal bound


def _row(threshold: float, tp: int, fp: int, num_gt: int, num_images: int) -> dict[str, Any]:
    tp, fp, num_gt = int(tp), int(fp), int(num_gt)
    fn = num_gt - tp
    return {"threshold": float(threshold), "sensitivity": tp / num_gt if num_gt else 0.0,
            "fppi": fp / max(num_images, 1), "precision": tp / (tp + fp) if tp + fp else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0, "tp": tp, "fp": fp, "fn": fn}


def curve_rows(scores: np.ndarray, is_tp: np.ndarray, num_gt: int, num_images: int) -> list[dict[str, Any]]:
    """One row per distinct score, highest first: the counts of the detections scoring >= it."""
    scores, is_tp = np.asarray(scores, np.float64), np.asarray(is_tp, bool)
    order = np.argsort(-scores, kind="mergesort")
    s, tp = scores[order], is_tp[order]
    if not len(s):
        return []
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last detection of each distinct score
    ctp, cfp = np.cumsum(tp)[last], np.cumsum(~tp)[last]
    return [_row(s[i], t, f, num_gt, num_images) for i, t, f in zip(last, ctp, cfp, strict=True)]


def operating_points(predictions: Sequence[dict[str, Any]], ground_truth: Sequence[dict[str, Any]],
                     classes: Sequence[str], iou: float = IOU) -> dict[str, Any]:
    """The operating-point table of per-case predictions against ground truth.

    Args:
        predictions, ground_truth, classes: as ``evaluation.evaluate_boxes_detailed`` takes them (one dict per
            case, same order; labels are 0-based indices into ``classes``).
        iou: matching IoU (the FROC's 0.1).

    Returns:
        ``{"iou", "num_images", "classes", "pooled": group, "per_class": {name: group}}`` with
        group = ``{"num_gt": int, "rows": [row, ...]}`` and row = ``FIELDS`` (see module docstring).
    """
    groups, num_images = froc_detections(predictions, ground_truth, classes, iou)

    def group(key: int | None) -> dict[str, Any]:
        scores, is_tp, num_gt = groups[key]
        return {"num_gt": int(num_gt), "rows": curve_rows(scores, is_tp, num_gt, num_images)}

    return {"iou": float(iou), "num_images": int(num_images), "classes": list(classes), "pooled": group(None),
            "per_class": {name: group(c) for c, name in enumerate(classes)}}


def _group(table: dict[str, Any], cls: str | None) -> dict[str, Any]:
    if cls is None or cls == POOLED:
        return table["pooled"]
    if cls not in table["per_class"]:
        raise ValueError(f"no class {cls!r} in the operating-point table; classes: {list(table['per_class'])}")
    return table["per_class"][cls]


def row_at(table: dict[str, Any], threshold: float, cls: str | None = None) -> dict[str, Any]:
    """The counts of the detections scoring >= ``threshold`` (reported at ``threshold`` itself)."""
    g = _group(table, cls)
    kept = [r for r in g["rows"] if r["threshold"] >= threshold]  # highest first: the last one counts
    tp, fp = (kept[-1]["tp"], kept[-1]["fp"]) if kept else (0, 0)
    return _row(threshold, tp, fp, g["num_gt"], table["num_images"])


def choose(table: dict[str, Any], fppi: float | None = None, min_sensitivity: float | None = None,
           threshold: float | None = None, cls: str | None = None) -> dict[str, Any]:
    """The operating point by one rule (default: the lowest threshold with FPPI <= 1).

    Args:
        table: :func:`operating_points` (or ``operating_points.json``).
        fppi: the lowest threshold with FPPI <= ``fppi``.
        min_sensitivity: the highest threshold with sensitivity >= ``min_sensitivity``.
        threshold: this fixed threshold.
        cls: choose on one class's rows (default: pooled over classes).

    Returns:
        The chosen row (``FIELDS``) with ``rule`` (e.g. ``"fppi<=1"``), ``class``, ``num_gt``, ``num_cases``
        and (pooled only) ``per_class``: each class's row at the chosen threshold.

    Raises:
        ValueError: more than one rule, a value out of range, or no threshold satisfies the rule (the
            message names the rule and the best achievable value).
    """
    given = [k for k, v in (("fppi", fppi), ("min_sensitivity", min_sensitivity), ("threshold", threshold))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"choose one operating-point rule, got {given} (fppi, min_sensitivity and threshold "
                         "are mutually exclusive)")
    g = _group(table, cls)
    rows, name = g["rows"], POOLED if cls is None else cls
    where = f"on {table['num_images']} case(s), class {name}"
    if threshold is not None:
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite score, got {threshold}")
        rule, row = f"threshold={threshold:g}", row_at(table, float(threshold), cls)
    elif min_sensitivity is not None:
        if not 0 <= min_sensitivity <= 1:
            raise ValueError(f"min_sensitivity must lie in [0, 1], got {min_sensitivity}")
        rule = f"sensitivity>={min_sensitivity:g}"
        ok = [r for r in rows if r["sensitivity"] >= min_sensitivity - _EPS]
        if not ok:
            best = max(rows, key=lambda r: r["sensitivity"], default=None)
            at = f" (threshold {best['threshold']:.4g})" if best else " (no detection at all)"
            raise ValueError(f"no threshold satisfies {rule} {where} ({g['num_gt']} object(s)): the best "
                             f"achievable sensitivity is {best['sensitivity'] if best else 0.0:.4g}{at}")
        row = dict(ok[0])
    else:
        x = DEFAULT_FPPI if fppi is None else float(fppi)
        if not x >= 0:
            raise ValueError(f"fppi must be >= 0, got {fppi}")
        rule = f"fppi<={x:g}"
        ok = [r for r in rows if r["fppi"] <= x + _EPS]
        if not ok:
            best = f"{rows[0]['fppi']:.4g} (threshold {rows[0]['threshold']:.4g})" if rows else "none (no detection)"
            raise ValueError(f"no threshold satisfies {rule} {where}: the lowest achievable FPPI is {best}")
        row = dict(ok[-1])
    out = {"rule": rule, **row, "class": name, "num_gt": g["num_gt"], "num_cases": table["num_images"]}
    if cls is None:
        out["per_class"] = {c: row_at(table, row["threshold"], c) for c in table["per_class"]}
    return out


def save_table(table: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``out_dir/operating_points.csv`` (one row per class and threshold, ``class`` = ``all`` for the pooled
    rows) and ``operating_points.json`` (the table + ``default``: the ``fppi<=1`` choice, or its error)."""
    out_dir = Path(out_dir)
    try:
        default: dict[str, Any] = choose(table)
    except ValueError as e:
        default = {"rule": f"fppi<={DEFAULT_FPPI:g}", "error": str(e)}
    js = save_json({**table, "default": default}, out_dir / JSON_FILE)
    groups = [(POOLED, table["pooled"]), *table["per_class"].items()]
    with atomic_path(out_dir / CSV_FILE) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for name, g in groups:
            for r in g["rows"]:
                w.writerow([name, *(r[k] for k in FIELDS), g["num_gt"], table["num_images"]])
    return out_dir / CSV_FILE, js


def format_table(table: dict[str, Any], fppis: Sequence[float] = FPPI_THRESHOLDS) -> str:
    """A short text table per class and pooled: the rule ``fppi<=X`` for each of ``fppis`` and the default."""
    head = f"| {'rule':<17} | threshold | sensitivity | fppi   | precision | f1     | TP | FP | FN |"
    lines = []
    for name in [POOLED, *table["per_class"]]:
        cls = None if name == POOLED else name
        g = _group(table, cls)
        title = "all classes" if cls is None else f"class {name}"
        lines += [f"\noperating points, {title} ({g['num_gt']} object(s), {table['num_images']} case(s)):",
                  head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
        for label, x in [*((f"fppi<={f:g}", f) for f in fppis), (f"default (fppi<={DEFAULT_FPPI:g})", DEFAULT_FPPI)]:
            try:
                r = choose(table, fppi=x, cls=cls)
            except ValueError:
                lines.append(f"| {label:<17} | not reached |")
                continue
            lines.append(f"| {label:<17} | {r['threshold']:9.4f} | {r['sensitivity']:11.4f} | {r['fppi']:6.3f} | "
                         f"{r['precision']:9.4f} | {r['f1']:6.4f} | {r['tp']} | {r['fp']} | {r['fn']} |")
    return "\n".join(lines).lstrip("\n")
