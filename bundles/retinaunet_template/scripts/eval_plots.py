"""Evaluation plots (matplotlib, Agg backend): FROC, precision-recall, TP/FP score histograms, recall by object
size, and example detections drawn on image slices.

The curve plots read the ``curves`` dict of :func:`evaluation.evaluate_boxes_detailed`. Every function writes
PNG files atomically and returns their paths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from planner.io import atomic_path  # noqa: E402

logger = logging.getLogger(__name__)

MAX_EXAMPLE_SLICES = 4


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_froc(curves: dict[str, Any], out_png: str | os.PathLike, prefix: str = "") -> Path:
    """FROC curves (one line per IoU) on a log2 FPPI axis, the 7 FPPI points marked.

    Args:
        curves: ``evaluate_boxes_detailed`` curves.
        out_png: file to write.
        prefix: ``""`` for the pooled curves, ``"<class>_"`` for one class.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5))
    thresholds = None
    for iou in curves["iou_thresholds"]:
        c = curves["froc"].get(f"{prefix}IoU_{iou:.2f}")
        if c is None:
            continue
        thresholds = np.asarray(c["fppi_thresholds"])
        fppi = np.asarray(c["fppi"], float)
        # draw the full step curve within the axis range (FPPI 0 is off a log axis: start at the first point)
        x = np.clip(fppi, thresholds[0] / 2, None)
        (line,) = ax.plot(x, c["sensitivity"], "-", alpha=0.5)  # linear, as np.interp reads it
        at = c["sensitivity_at_thresholds"]
        ax.plot(thresholds, at, "o", color=line.get_color(), label=f"IoU {iou:.2f}: score {np.mean(at):.3f}")
    ax.set_xscale("log", base=2)
    if thresholds is not None:
        ax.set_xlim(thresholds[0] / 2, thresholds[-1] * 2)
        ax.set_xticks(thresholds, [f"{t:g}" for t in thresholds])
        ax.set_title(
            f"FROC {prefix.rstrip('_')} N_img={c['num_images']} N_gt={c['num_gt']}".replace("  ", " ")
        )
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("sensitivity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, out_png)


def plot_pr_curves(curves: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Precision-recall curves (monotone envelope), one PNG per IoU (0.1, 0.5), one line per class."""
    paths = []
    tags = sorted({tag for per_cls in curves["pr"].values() for tag in per_cls})
    for tag in tags:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for name, per_iou in curves["pr"].items():
            c = per_iou.get(tag)
            if c is None or len(c["recall"]) == 0:
                ax.plot([], [], label=f"{name} (no detections)")
                continue
            ax.plot(
                np.r_[0, c["recall"]],
                np.r_[c["precision"][0], c["precision"]],
                drawstyle="steps-post",
                label=name,
            )
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"precision-recall {tag.replace('_', ' ')}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
        paths.append(_save(fig, Path(out_dir) / f"pr_{tag.replace('.', '_')}.png"))
    return paths


def plot_score_histograms(curves: dict[str, Any], out_png: str | os.PathLike, tag: str = "IoU_0.10") -> Path:
    """Histogram of detection scores, true vs false positives at one IoU."""
    s = curves["scores"][tag]
    fig, ax = plt.subplots(figsize=(5, 4))
    bins = np.linspace(0, 1, 21)
    ax.hist(
        [np.clip(s["tp"], 0, 1), np.clip(s["fp"], 0, 1)],
        bins=bins,
        label=[f"TP ({len(s['tp'])})", f"FP ({len(s['fp'])})"],
        color=["tab:green", "tab:red"],
        alpha=0.8,
    )
    ax.set_xlabel("score")
    ax.set_ylabel("detections")
    ax.set_title(f"scores of TP / FP at {tag.replace('_', ' ')}")
    ax.legend()
    return _save(fig, out_png)


def size_breakdown(curves: dict[str, Any], num_bins: int = 3) -> dict[str, Any]:
    """Recall per GT size bin (quantiles of box volume, terciles by default) at each IoU in ``curves['gt']``.

    Returns:
        ``edges`` [num_bins + 1] volume bin edges, ``count`` [num_bins], ``recall`` {``IoU_0.10``: [num_bins]}
        (NaN for an empty bin).
    """
    vol = np.asarray(curves["gt"]["volume"], float)
    edges = np.quantile(vol, np.linspace(0, 1, num_bins + 1)) if len(vol) else np.zeros(num_bins + 1)
    idx = np.clip(np.searchsorted(edges, vol, side="right") - 1, 0, num_bins - 1)
    count = np.bincount(idx, minlength=num_bins)
    recall = {}
    for tag, flags in curves["gt"]["matched"].items():
        hits = np.bincount(idx, weights=np.asarray(flags, float), minlength=num_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall[tag] = np.where(count > 0, hits / np.maximum(count, 1), np.nan)
    return {"edges": edges, "count": count, "recall": recall}


def plot_size_breakdown(curves: dict[str, Any], out_png: str | os.PathLike, num_bins: int = 3) -> Path:
    """Bar chart: recall of GT objects per volume bin (terciles), one bar group per IoU."""
    b = size_breakdown(curves, num_bins)
    fig, ax = plt.subplots(figsize=(6, 4))
    tags = list(b["recall"])
    width = 0.8 / max(len(tags), 1)
    x = np.arange(num_bins)
    for k, tag in enumerate(tags):
        ax.bar(x + k * width, np.nan_to_num(b["recall"][tag]), width, label=tag.replace("_", " "))
    e = b["edges"]
    ax.set_xticks(
        x + width * (len(tags) - 1) / 2,
        [f"{e[i]:.3g}-{e[i + 1]:.3g}\n(n={b['count'][i]})" for i in range(num_bins)],
    )
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("GT box volume (voxels)")
    ax.set_ylabel("recall")
    ax.set_title("recall by object size")
    ax.legend(fontsize=7)
    return _save(fig, out_png)


def plot_all(curves: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """All curve plots into ``out_dir``: FROC (pooled and per class), PR, score histograms, size breakdown."""
    out_dir = Path(out_dir)
    paths = [plot_froc(curves, out_dir / "FROC.png")]
    for name in curves["classes"]:
        if any(k.startswith(f"{name}_IoU_") for k in curves["froc"]):
            paths.append(plot_froc(curves, out_dir / f"FROC_{name}.png", prefix=f"{name}_"))
    paths += plot_pr_curves(curves, out_dir)
    for tag in curves["scores"]:
        paths.append(plot_score_histograms(curves, out_dir / f"scores_{tag.replace('.', '_')}.png", tag))
    if len(curves["gt"]["volume"]):
        paths.append(plot_size_breakdown(curves, out_dir / "recall_by_size.png"))
    return paths


def _split_image(image: np.ndarray, dim: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == dim + 1:
        return image[0]  # first channel
    if image.ndim != dim:
        raise ValueError(
            f"image of shape {image.shape} does not fit {dim}D boxes: pass [C, *spatial] or [*spatial]."
        )
    return image


def plot_example_detections(
    image: np.ndarray,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    gt_boxes: np.ndarray,
    out_png: str | os.PathLike,
    score_thresh: float = 0.5,
    spatial_dims: int | None = None,
    title: str = "",
) -> Path:
    """Draw predicted (score-labelled, red) and true (green) boxes on an image.

    3D: axial slices (last axis) through the centre of the best-scoring prediction and of each GT box (at most
    ``MAX_EXAMPLE_SLICES``), each with the boxes that cross it. 2D: the image itself.

    Args:
        image: [C, *spatial] (channel 0 shown) or [*spatial], nibabel axis order (x, y[, z]).
        pred_boxes: [N, 2*dim] StandardMode voxel boxes; ``pred_scores`` [N].
        gt_boxes: [G, 2*dim] StandardMode voxel boxes.
        out_png: file to write.
        score_thresh: predictions below it are not drawn (the best one always chooses a slice).
        spatial_dims: 2 or 3; inferred from the boxes, else from ``image.ndim`` (3 -> 3D).
    """
    pred_boxes, gt_boxes = np.asarray(pred_boxes, float), np.asarray(gt_boxes, float)
    pred_scores = np.asarray(pred_scores, float).reshape(-1)
    if spatial_dims is None:
        width = pred_boxes.shape[-1] if pred_boxes.size else gt_boxes.shape[-1] if gt_boxes.size else 0
        spatial_dims = width // 2 if width else min(np.asarray(image).ndim, 3)
    dim = spatial_dims
    pred_boxes, gt_boxes = pred_boxes.reshape(-1, 2 * dim), gt_boxes.reshape(-1, 2 * dim)
    vol = _split_image(image, dim)
    shown = pred_scores >= score_thresh

    if dim == 2:
        slices: list[int | None] = [None]
    else:
        centres = []
        if len(pred_scores):
            b = pred_boxes[int(np.argmax(pred_scores))]
            centres.append((b[2] + b[5]) / 2)
        centres += [(g[2] + g[5]) / 2 for g in gt_boxes]
        z = [int(np.clip(np.floor(c), 0, vol.shape[2] - 1)) for c in centres] or [vol.shape[2] // 2]
        slices = list(dict.fromkeys(z))[:MAX_EXAMPLE_SLICES]

    fig, axes = plt.subplots(1, len(slices), figsize=(4 * len(slices), 4), squeeze=False)
    for ax, z in zip(axes[0], slices, strict=True):
        plane = vol if z is None else vol[:, :, z]
        # voxel i covers [i, i+1) so box edges (half-open voxel coordinates) land on voxel borders
        ax.imshow(plane.T, cmap="gray", origin="lower", extent=(0, plane.shape[0], 0, plane.shape[1]))

        def crosses(b: np.ndarray, z: int | None = z) -> bool:
            return z is None or (b[2] < z + 1 and b[5] > z)

        for g in gt_boxes:
            if crosses(g):
                ax.add_patch(
                    Rectangle((g[0], g[1]), g[dim] - g[0], g[dim + 1] - g[1], fill=False, ec="lime", lw=1.5)
                )
        for b, s in zip(pred_boxes[shown], pred_scores[shown], strict=True):
            if crosses(b):
                ax.add_patch(
                    Rectangle((b[0], b[1]), b[dim] - b[0], b[dim + 1] - b[1], fill=False, ec="red", lw=1)
                )
                ax.text(b[0], b[dim + 1], f"{s:.2f}", color="red", fontsize=7, va="bottom")
        ax.set_title(f"{title} z={z}" if z is not None else title, fontsize=8)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    return _save(fig, out_png)


def plot_examples(
    cases: Sequence[dict[str, Any]], out_dir: str | os.PathLike, score_thresh: float = 0.5
) -> list[Path]:
    """``plot_example_detections`` for a few cases: dicts with ``case_id``, ``image``, ``pred_boxes``,
    ``pred_scores``, ``gt_boxes``; writes ``<out_dir>/example_<case_id>.png``."""
    return [
        plot_example_detections(
            c["image"],
            c["pred_boxes"],
            c["pred_scores"],
            c["gt_boxes"],
            Path(out_dir) / f"example_{c['case_id']}.png",
            score_thresh,
            title=str(c["case_id"]),
        )
        for c in cases
    ]
