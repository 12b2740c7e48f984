"""Box evaluation with nnDetection's metric definitions and key names (its ``BoxEvaluator``).

Metrics (all in ``results_boxes.json``):

* **AP** (COCO protocol, computed by MONAI's ``COCOMetric`` on ``matching_batch`` results with
  ``box_iou``): per class, detections of all images pooled and sorted by score, cumulative TP/FP, precision
  made monotone, sampled at the 101 recall points 0:0.01:1 (``searchsorted``), AP = mean of the samples;
  then averaged over classes. Keys ``AP_IoU_0.10_MaxDet_100``, ``mAP_IoU_0.10_0.50_0.05_MaxDet_100`` (mean
  over IoU 0.10, 0.15, ..., 0.50) and per class ``<class>_AP_IoU_0.10_MaxDet_100`` /
  ``<class>_mAP_IoU_0.10_0.50_0.05_MaxDet_100``. As in nnDetection, a class without any ground truth gets
  AP -1 and that -1 enters the class mean (a warning is logged).
* **AR** (recall with at most ``MaxDet`` detections per image and class): ``AR_IoU_0.10_MaxDet_100``,
  ``mAR_IoU_0.10_0.50_0.05_MaxDet_{1,5,100}`` (mean over the IoU range), per class with the class prefix.
  Classes without ground truth are left out of the mean. nnDetection does not write AR; MONAI's mAR averages
  over every matched IoU threshold, ours over the range its key names.
* **FROC** (written here on the same matching): all classes pooled, detections sorted by score; at each
  distinct score, sensitivity = TP / number of GT and FPPI = FP / number of images (all images, also those
  without objects); the curve starts at (0, 0), is interpolated with ``np.interp`` at FPPI
  (1/8, 1/4, 1/2, 1, 2, 4, 8) and the score is the mean of the 7 sensitivities. Keys
  ``FROC_score_IoU_0.10``; per class ``<class>_FROC_score_IoU_0.10`` and their class mean
  ``mc_FROC_score_IoU_0.10``. Our addition: the 7 pooled sensitivities at IoU 0.1 and 0.5 as
  ``FROC_sensitivity_FPPI_0.125_IoU_0.10`` ... ``FROC_sensitivity_FPPI_8_IoU_0.50`` (nnDetection keeps them only in its pickled curves as ``FROC_curve_IoU_0.10``). Where nnDetection gives
  NaN (no true positive at all) we give 0.

Boxes are MONAI StandardMode (x1, y1, x2, y2) / (x1, y1, z1, x2, y2, z2) in voxel (or any common) coordinates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

from planner.io import save_json

logger = logging.getLogger(__name__)

RESULTS_FILE = "results_boxes.json"
CURVES_FILE = "curves_boxes.json"
# nnDetection's full evaluation uses np.arange(0.1, 1.0, 0.1) (0.30000000000000004 included, which is also the
# value np.linspace gives inside the mAP range, so both lists share that threshold).
FULL_IOU_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.arange(0.1, 1.0, 0.1))
FAST_IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.5)
IOU_RANGE: tuple[float, float, float] = (0.1, 0.5, 0.05)
MAX_DETECTIONS: tuple[int, ...] = (1, 5, 100)
FPPI_THRESHOLDS: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)
PLOT_IOUS: tuple[float, ...] = (0.1, 0.5)


class EvaluationError(ValueError):
    """Predictions or ground truth are malformed; the message names the case and the fix."""


def iou_key(iou: float) -> str:
    """``IoU_0.10`` style tag used in metric keys and in the curves dict."""
    return f"IoU_{iou:.2f}"


def _check_cases(
    predictions: Sequence[dict[str, Any]], ground_truth: Sequence[dict[str, Any]], num_classes: int
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], int]:
    if len(predictions) != len(ground_truth):
        raise EvaluationError(
            f"{len(predictions)} prediction entries but {len(ground_truth)} ground-truth entries: pass one "
            "entry per case in the same order (an empty prediction is {'boxes': [], 'scores': [], 'labels': []})."
        )
    widths = {
        np.asarray(c["boxes"]).shape[-1] for c in [*predictions, *ground_truth] if np.asarray(c["boxes"]).size
    }
    if len(widths) > 1 or not widths <= {4, 6}:
        raise EvaluationError(
            f"boxes must all be [N, 4] (2D) or all [N, 6] (3D) in StandardMode, got widths {sorted(widths)}."
        )
    width = widths.pop() if widths else 6

    def norm(case: dict[str, Any], i: int, kind: str, with_scores: bool) -> dict[str, np.ndarray]:
        boxes = np.asarray(case["boxes"], dtype=np.float64).reshape(-1, width)
        labels = np.asarray(case["labels"]).reshape(-1)
        if labels.size and (np.any(labels < 0) or np.any(labels >= num_classes) or np.any(labels % 1)):
            raise EvaluationError(
                f"case {i} ({kind}): labels must be integers in [0, {num_classes}) (0-based class indices of "
                f"`classes`), got {np.unique(labels).tolist()}."
            )
        out = {"boxes": boxes, "labels": labels.astype(np.int64)}
        n = {len(boxes), len(labels)}
        if with_scores:
            out["scores"] = np.asarray(case["scores"], dtype=np.float64).reshape(-1)
            n.add(len(out["scores"]))
        if len(n) != 1:
            raise EvaluationError(f"case {i} ({kind}): boxes, labels (and scores) differ in length.")
        if np.any(boxes[:, width // 2 :] < boxes[:, : width // 2]):
            raise EvaluationError(f"case {i} ({kind}): a box has x2 < x1; boxes must be StandardMode.")
        return out

    preds = [norm(p, i, "prediction", True) for i, p in enumerate(predictions)]
    gts = [norm(g, i, "ground truth", False) for i, g in enumerate(ground_truth)]
    return preds, gts, width // 2


def _pooled(
    matches: list[dict[int, dict[str, np.ndarray]]],
    t_idx: int,
    cls: int | None = None,
    max_det: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pool matched detections over images (and classes unless ``cls``): (scores [D], is_tp [D], num_gt)."""
    scores, tps, num_gt = [], [], 0
    for image in matches:
        for c, m in image.items():
            if cls is not None and int(c) != cls:
                continue
            keep = m["dtIgnore"][t_idx][:max_det] == 0
            scores.append(m["dtScores"][:max_det][keep])
            tps.append(m["dtMatches"][t_idx][:max_det][keep] > 0)
            num_gt += int(np.count_nonzero(m["gtIgnore"] == 0))
    if not scores:
        return np.zeros(0), np.zeros(0, bool), num_gt
    return np.concatenate(scores).astype(np.float64), np.concatenate(tps).astype(bool), num_gt


def _match(preds: list[dict[str, np.ndarray]], gts: list[dict[str, np.ndarray]], thresholds: Sequence[float],
           max_det: int) -> list[dict[int, dict[str, np.ndarray]]]:
    """MONAI's ``matching_batch`` with ``box_iou`` on checked cases (each IoU threshold matched on its own)."""
    return matching_batch(
        iou_fn=box_iou,
        iou_thresholds=list(thresholds),
        pred_boxes=[p["boxes"] for p in preds],
        pred_classes=[p["labels"] for p in preds],
        pred_scores=[p["scores"] for p in preds],
        gt_boxes=[g["boxes"] for g in gts],
        gt_classes=[g["labels"] for g in gts],
        max_detections=max_det,
    )


def froc_detections(
    predictions: Sequence[dict[str, Any]], ground_truth: Sequence[dict[str, Any]], classes: Sequence[str],
    iou: float = 0.1, max_detections: int = MAX_DETECTIONS[-1],
) -> tuple[dict[int | None, tuple[np.ndarray, np.ndarray, int]], int]:
    """The detections the FROC counts (same matching and pooling): ``({None: pooled, c: class c}`` of
    (scores [D], is_tp [D], num_gt), number of images); arguments as :func:`evaluate_boxes_detailed`."""
    preds, gts, _ = _check_cases(predictions, ground_truth, len(classes))
    matches = _match(preds, gts, [float(iou)], int(max_detections))
    return {c: _pooled(matches, 0, c) for c in [None, *range(len(classes))]}, len(matches)


def froc_curve(is_tp: np.ndarray, scores: np.ndarray, num_images: int, num_gt: int) -> tuple[np.ndarray, ...]:
    """FROC curve points: one per distinct score (all detections scoring >= it), starting at (0, 0).

    Args:
        is_tp: [D] bool, detection matched a GT.
        scores: [D] detection scores.
        num_images: number of images (cases) evaluated, including those without objects or detections.
        num_gt: number of ground-truth objects.

    Returns:
        fppi [P], sensitivity [P] (P = distinct scores + 1, FPPI non-decreasing), and the sensitivities
        interpolated at ``FPPI_THRESHOLDS`` [7].
    """
    order = np.argsort(-scores, kind="mergesort")
    s, tp = scores[order], is_tp[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.zeros(0, int)
    fppi = np.r_[0.0, np.cumsum(~tp)[last] / max(num_images, 1)]
    sens = np.r_[0.0, np.cumsum(tp)[last] / num_gt] if num_gt else np.zeros(len(last) + 1)
    return fppi, sens, np.interp(FPPI_THRESHOLDS, fppi, sens)


def _pr_curve(is_tp: np.ndarray, scores: np.ndarray, num_gt: int) -> dict[str, np.ndarray]:
    order = np.argsort(-scores, kind="mergesort")
    tp = is_tp[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
    precision = ctp / np.maximum(ctp + cfp, 1)
    return {
        "recall": ctp / max(num_gt, 1),
        "precision": np.maximum.accumulate(precision[::-1])[::-1],  # monotone (COCO envelope)
        "scores": scores[order],
    }


def _recall(matches: list[dict], t_idx: int, cls: int, max_det: int) -> float:
    _, tp, num_gt = _pooled(matches, t_idx, cls, max_det)
    return float(tp.sum() / num_gt) if num_gt else -1.0


def _ar_metrics(
    matches: list[dict],
    classes: Sequence[str],
    thresholds: np.ndarray,
    iou_list: Sequence[float],
    range_idx: np.ndarray,
    max_detections: Sequence[int],
    per_class: bool,
) -> dict[str, float]:
    def mean_valid(values: list[float]) -> float:
        valid = [v for v in values if v > -1]
        return float(np.mean(valid)) if valid else -1.0

    out: dict[str, float] = {}
    rng = f"IoU_{IOU_RANGE[0]:.2f}_{IOU_RANGE[1]:.2f}_{IOU_RANGE[2]:.2f}"
    for md in max_detections:
        rec = {c: [_recall(matches, int(t), c, md) for t in range_idx] for c in range(len(classes))}
        out[f"mAR_{rng}_MaxDet_{md}"] = mean_valid([v for vals in rec.values() for v in vals])
        if per_class:
            for c, name in enumerate(classes):
                out[f"{name}_mAR_{rng}_MaxDet_{md}"] = mean_valid(rec[c])
    md = max_detections[-1]
    for iou in iou_list:
        t_idx = int(np.argmin(np.abs(thresholds - iou)))
        rec = [_recall(matches, t_idx, c, md) for c in range(len(classes))]
        out[f"AR_{iou_key(iou)}_MaxDet_{md}"] = mean_valid(rec)
        if per_class:
            for c, name in enumerate(classes):
                out[f"{name}_AR_{iou_key(iou)}_MaxDet_{md}"] = rec[c]
    return out


def _froc_metrics(
    matches: list[dict],
    classes: Sequence[str],
    thresholds: np.ndarray,
    iou_list: Sequence[float],
    per_class: bool,
) -> tuple[dict[str, float], dict[str, Any]]:
    num_images = len(matches)
    metrics: dict[str, float] = {}
    curves: dict[str, Any] = {}
    groups: list[tuple[str, int | None]] = [("", None)]
    if per_class:
        groups += [(f"{name}_", c) for c, name in enumerate(classes)]
    for prefix, cls in groups:
        for iou in iou_list:
            t_idx = int(np.argmin(np.abs(thresholds - iou)))
            scores, tp, num_gt = _pooled(matches, t_idx, cls)
            fppi, sens, at = froc_curve(tp, scores, num_images, num_gt)
            metrics[f"{prefix}FROC_score_{iou_key(iou)}"] = float(np.mean(at))
            if cls is None and any(abs(iou - t) < 1e-9 for t in PLOT_IOUS):
                for f, v in zip(FPPI_THRESHOLDS, at, strict=True):
                    metrics[f"FROC_sensitivity_FPPI_{f:g}_{iou_key(iou)}"] = float(v)
            curves[f"{prefix}{iou_key(iou)}"] = {
                "fppi": fppi,
                "sensitivity": sens,
                "fppi_thresholds": np.asarray(FPPI_THRESHOLDS),
                "sensitivity_at_thresholds": at,
                "num_images": num_images,
                "num_gt": num_gt,
            }
    if per_class:
        for iou in iou_list:
            vals = [metrics[f"{name}_FROC_score_{iou_key(iou)}"] for name in classes]
            metrics[f"mc_FROC_score_{iou_key(iou)}"] = float(np.mean(vals))
    return metrics, curves


def _gt_size_table(
    gts: list[dict[str, np.ndarray]], matches: list[dict], thresholds: np.ndarray, ious: Sequence[float]
) -> dict[str, Any]:
    """Per GT object: volume (area in 2D), label, and whether a detection matched it at each IoU in ``ious``."""
    vol, lab = [], []
    matched: dict[str, list[np.ndarray]] = {iou_key(i): [] for i in ious}
    for gt, image in zip(gts, matches, strict=True):
        d = gt["boxes"].shape[1] // 2
        vol.append(np.prod(gt["boxes"][:, d:] - gt["boxes"][:, :d], axis=1))
        lab.append(gt["labels"])
        for iou in ious:
            t_idx = int(np.argmin(np.abs(thresholds - iou)))
            flags = np.zeros(len(gt["labels"]), bool)
            for c, m in image.items():
                idx = np.nonzero(gt["labels"] == int(c))[0]
                # matching_batch sorts GT by ignore flag (stable); without ignores the order is unchanged
                flags[idx] = m["gtMatches"][t_idx][: len(idx)] > 0
            matched[iou_key(iou)].append(flags)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return {
        "volume": cat(vol, float),
        "label": cat(lab, int),
        "matched": {k: cat(v, bool) for k, v in matched.items()},
    }


def evaluate_boxes_detailed(
    predictions: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    classes: Sequence[str],
    iou_thresholds: Sequence[float] | None = None,
    fast: bool = False,
    max_detections: Sequence[int] = MAX_DETECTIONS,
    per_class: bool = True,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate detections against ground truth; return scalar metrics and raw curves for plots.

    Args:
        predictions: one dict per case: ``boxes`` [N, 2*dim] StandardMode, ``scores`` [N], ``labels`` [N]
            (0-based indices into ``classes``). Empty cases are allowed and count as images.
        ground_truth: one dict per case, same order: ``boxes`` [G, 2*dim], ``labels`` [G].
        classes: class names, index = label.
        iou_thresholds: IoU values for AP/AR/FROC keys; default nnDetection's 0.1..0.9 (or (0.1, 0.5) if
            ``fast``). The mAP range 0.10:0.50:0.05 is always evaluated.
        fast: use (0.1, 0.5) when ``iou_thresholds`` is not given.
        max_detections: detections kept per image and class (highest scores); AP uses the last value.
        per_class: also write per-class keys.

    Returns:
        metrics: flat dict of floats with nnDetection key names (see module docstring).
        curves: ``froc`` {``IoU_0.10`` or ``<class>_IoU_0.10``: fppi, sensitivity, ...}, ``pr``
        {class: {``IoU_0.10``: recall, precision (monotone), scores}}, ``scores`` {``IoU_0.10``: tp, fp score
        arrays}, ``gt`` (per-object volume, label, matched flags), ``iou_thresholds``, ``classes``.
    """
    classes = list(classes)
    preds, gts, _ = _check_cases(predictions, ground_truth, len(classes))
    if iou_thresholds is None:
        iou_thresholds = FAST_IOU_THRESHOLDS if fast else FULL_IOU_THRESHOLDS
    iou_list = [float(t) for t in iou_thresholds]
    max_detections = tuple(int(m) for m in max_detections)

    coco = COCOMetric(
        classes,
        iou_list=iou_list,
        iou_range=IOU_RANGE,
        max_detection=max_detections,
        per_class=per_class,
        verbose=False,
    )
    thresholds = np.asarray(coco.iou_thresholds, dtype=np.float64)
    plot_ious = [t for t in PLOT_IOUS if np.min(np.abs(thresholds - t)) < 1e-9]
    matches = _match(preds, gts, thresholds, max(max_detections))
    gt_count = np.bincount(
        np.concatenate([g["labels"] for g in gts] + [np.zeros(0, int)]), minlength=len(classes)
    )
    for c in np.nonzero(gt_count == 0)[0]:
        logger.warning(
            "class %r has no ground-truth object: its AP is -1 and enters the mean AP as -1 "
            "(nnDetection's convention)",
            classes[c],
        )

    coco_metrics, _ = coco(matches)
    metrics = {k: float(v) for k, v in coco_metrics.items() if "AP_" in k}
    metrics.update(
        _ar_metrics(matches, classes, thresholds, iou_list, coco.iou_range_idx, max_detections, per_class)
    )
    froc_metrics, froc_curves = _froc_metrics(matches, classes, thresholds, iou_list, per_class)
    metrics.update(froc_metrics)

    curves: dict[str, Any] = {
        "classes": classes,
        "iou_thresholds": iou_list,
        "froc": froc_curves,
        "pr": {},
        "scores": {},
    }
    for iou in plot_ious:
        t_idx = int(np.argmin(np.abs(thresholds - iou)))
        scores, tp, _ = _pooled(matches, t_idx)
        curves["scores"][iou_key(iou)] = {"tp": scores[tp], "fp": scores[~tp]}
        for c, name in enumerate(classes):
            s, t, n = _pooled(matches, t_idx, c, max_detections[-1])
            curves["pr"].setdefault(name, {})[iou_key(iou)] = _pr_curve(t, s, n)
    curves["gt"] = _gt_size_table(gts, matches, thresholds, plot_ious)
    return metrics, curves


def evaluate_boxes(
    predictions: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    classes: Sequence[str],
    iou_thresholds: Sequence[float] | None = None,
    fast: bool = False,
    max_detections: Sequence[int] = MAX_DETECTIONS,
    per_class: bool = True,
) -> dict[str, float]:
    """Scalar metrics only; see :func:`evaluate_boxes_detailed` for the arguments."""
    return evaluate_boxes_detailed(
        predictions, ground_truth, classes, iou_thresholds, fast, max_detections, per_class
    )[0]


def save_results(
    metrics: dict[str, float], out_dir: str | os.PathLike, curves: dict[str, Any] | None = None
) -> Path:
    """Write ``out_dir/results_boxes.json`` (and ``curves_boxes.json`` if ``curves``) atomically."""
    out_dir = Path(out_dir)
    if curves is not None:
        save_json(curves, out_dir / CURVES_FILE)
    return save_json({k: float(v) for k, v in metrics.items()}, out_dir / RESULTS_FILE)
