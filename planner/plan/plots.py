"""Planner plots: what the objects of a task look like, as PNGs next to the plans.

The same kind of overview nnDetection's planner writes to ``preprocessed/analysis/``: box size and volume
histograms, box-size scatter plots, class counts and instances per case.

Written with matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).
Dataset-level plots go to ``out_dir``; per-plan plots (sizes in voxels of the plan's preprocessed
image with its anchors and patch size) go to ``out_dir/<plan_id>/``. Axis names: the raw voxel axes
(nibabel i, j, k); per-plan plots use the plan's transposed order and say which raw axis each is.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from planner.fingerprint import Fingerprint
from planner.io import atomic_path
from planner.plan.anchors import anchor_shapes_per_level
from planner.plan.plan import Plan
from planner.plan.rules import box_sizes_transposed

logger = logging.getLogger(__name__)

RAW_AXES = ("i", "j", "k")
INSTANCE_RANGES = (100, 30, 10)  # instances-per-case histograms over 0..N (as nnDetection)
MAX_BINS = 50
ANCHOR_MARKERS = ("x", "+", "1", "2", "3", "4")  # one per decoder level
DPI = 100


# ------------------------------------------------------------------------------------ helpers
def _save(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to ``path`` (PNG) atomically."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _figure(nrows: int, ncols: int, title: str) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(4.2 * ncols, 3.6 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(nrows, ncols)
    fig.suptitle(title)
    return fig, axes


def _no_objects(path: Path, title: str) -> Path:
    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, "no objects", ha="center", va="center", fontsize=16)
    ax.set_axis_off()
    ax.set_title(title)
    logger.info("%s: no objects in the training cases, wrote a placeholder", path.name)
    return _save(fig, path)


def _bins(n: int) -> int:
    return int(min(MAX_BINS, max(5, n)))


def _pairs(dim: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(dim), 2))


def _class_colors(num_classes: int) -> list:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(k % 10) for k in range(max(num_classes, 1))]


def _scatter_by_class(ax, x: np.ndarray, y: np.ndarray, classes: np.ndarray, labels: dict[str, str]) -> None:
    colors = _class_colors(len(labels))
    for k in sorted(set(classes.tolist())):
        sel = classes == k
        name = labels.get(str(k), str(k))
        ax.scatter(x[sel], y[sel], s=10, alpha=0.6, color=colors[k % len(colors)], label=f"{k}: {name}")


# ----------------------------------------------------------------------------- dataset plots
def plot_box_sizes(fp: Fingerprint, path: Path) -> Path:
    """Histograms of box extents (mm) per raw axis; top row linear, bottom row log counts."""
    sizes = fp.box_sizes_mm()
    if len(sizes) == 0:
        return _no_objects(path, "box sizes (mm)")
    fig, axes = _figure(2, fp.dim, f"{fp.task}: box sizes per axis (mm), {len(sizes)} boxes")
    for row, scale in enumerate(("linear", "log")):
        for a in range(fp.dim):
            ax = axes[row, a]
            ax.hist(sizes[:, a], bins=_bins(len(sizes)), color="tab:blue")
            ax.set_yscale(scale)
            ax.set_xlabel(f"extent along axis {a} ({RAW_AXES[a]}) [mm]")
            ax.set_ylabel(f"boxes ({scale})")
    return _save(fig, path)


def plot_box_volumes(fp: Fingerprint, path: Path) -> Path:
    """Histogram of box volumes (mm^3; mm^2 in 2D), linear and log counts."""
    sizes = fp.box_sizes_mm()
    if len(sizes) == 0:
        return _no_objects(path, "box volumes")
    vol = np.prod(sizes, axis=1)
    unit = "mm^3" if fp.dim == 3 else "mm^2"
    fig, axes = _figure(1, 2, f"{fp.task}: box volumes ({unit})")
    for ax, scale in zip(axes[0], ("linear", "log"), strict=True):
        ax.hist(vol, bins=_bins(len(vol)), color="tab:green")
        ax.set_yscale(scale)
        ax.set_xlabel(f"box volume [{unit}]")
        ax.set_ylabel(f"boxes ({scale})")
    return _save(fig, path)


def plot_box_size_scatter(fp: Fingerprint, path: Path) -> Path:
    """Box extents (mm) for every pair of raw axes, coloured by class."""
    sizes = fp.box_sizes_mm()
    if len(sizes) == 0:
        return _no_objects(path, "box sizes (mm)")
    classes = fp.box_classes()
    pairs = _pairs(fp.dim)
    fig, axes = _figure(1, len(pairs), f"{fp.task}: box sizes (mm, original spacing)")
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        _scatter_by_class(ax, sizes[:, a], sizes[:, b], classes, fp.labels)
        ax.set_xlabel(f"axis {a} ({RAW_AXES[a]}) [mm]")
        ax.set_ylabel(f"axis {b} ({RAW_AXES[b]}) [mm]")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def plot_class_counts(fp: Fingerprint, path: Path) -> Path:
    """Bar plot of instances per class (names from the dataset labels)."""
    keys = sorted(set(fp.labels) | set(fp.num_instances), key=int)
    counts = [fp.num_instances.get(k, 0) for k in keys]
    names = [f"{k}: {fp.labels.get(k, '?')}" for k in keys]
    fig, axes = _figure(1, 1, f"{fp.task}: instances per class ({sum(counts)} in all)")
    ax = axes[0, 0]
    bars = ax.bar(range(len(keys)), counts, color=_class_colors(len(keys))[: len(keys)])
    ax.bar_label(bars)
    ax.set_xticks(range(len(keys)), names, rotation=30 if len(keys) > 4 else 0)
    ax.set_ylabel("instances")
    return _save(fig, path)


def plot_instances_per_case(fp: Fingerprint, path: Path) -> Path:
    """Histograms of the number of instances per case over 0..100, 0..30 and 0..10."""
    per_case = np.asarray([c.num_instances for c in fp.cases], dtype=np.int64)
    fig, axes = _figure(1, len(INSTANCE_RANGES), f"{fp.task}: instances per case ({len(per_case)} cases)")
    for ax, top in zip(axes[0], INSTANCE_RANGES, strict=True):
        ax.hist(per_case, bins=np.arange(0, top + 2) - 0.5, color="tab:purple")
        ax.set_xlim(-0.5, top + 0.5)
        ax.set_xlabel(f"instances per case (0..{top})")
        ax.set_ylabel("cases")
        over = int((per_case > top).sum())
        if over:
            ax.set_title(f"{over} case(s) above {top}", fontsize=8)
    return _save(fig, path)


def plot_spacings(fp: Fingerprint, path: Path) -> Path:
    """Original voxel spacing of every case for every pair of raw axes."""
    sp = fp.spacings
    pairs = _pairs(fp.dim)
    fig, axes = _figure(1, len(pairs), f"{fp.task}: voxel spacing per case (mm)")
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        ax.scatter(sp[:, a], sp[:, b], s=12, alpha=0.7, color="tab:orange")
        ax.set_xlabel(f"spacing axis {a} ({RAW_AXES[a]}) [mm]")
        ax.set_ylabel(f"spacing axis {b} ({RAW_AXES[b]}) [mm]")
    return _save(fig, path)


# -------------------------------------------------------------------------------- plan plots
def plan_box_sizes(fp: Fingerprint, plan: Plan) -> np.ndarray:
    """[N, dim] box extents in voxels of the plan's preprocessed image (target spacing, transposed)."""
    boxes = [np.asarray(c.boxes, dtype=np.float64).reshape(-1, 2 * fp.dim) for c in fp.cases]
    if not any(len(b) for b in boxes):
        return np.zeros((0, fp.dim))
    return box_sizes_transposed(boxes, [c.spacing for c in fp.cases], plan.target_spacing_transposed,
                                plan.transpose_forward)


def plot_plan_box_sizes(fp: Fingerprint, plan: Plan, path: Path) -> Path:
    """Box extents in voxels at the plan's target spacing (transposed axes), anchors and patch overlaid.

    Anchor shapes of every decoder level (``plan.anchors.sizes``) are drawn as crosses projected on
    each axis pair; the patch size as dashed lines.
    """
    sizes = plan_box_sizes(fp, plan)
    title = f"{plan.plan_id}: box sizes (voxels at {[round(s, 3) for s in plan.target_spacing_transposed]} mm)"
    if len(sizes) == 0:
        return _no_objects(path, title)
    classes = fp.box_classes()
    try:
        levels = anchor_shapes_per_level(plan.anchors) if plan.anchors.sizes else []
    except (ValueError, TypeError):  # malformed anchors must not stop the plots
        logger.warning("%s: anchor sizes cannot be drawn: %s", plan.plan_id, plan.anchors.sizes)
        levels = []
    pairs = _pairs(fp.dim)
    fig, axes = _figure(1, len(pairs), title)
    names = [f"axis {t} (raw {RAW_AXES[r]})" for t, r in enumerate(plan.transpose_forward)]
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        _scatter_by_class(ax, sizes[:, a], sizes[:, b], classes, fp.labels)
        for lvl, shapes in enumerate(levels):
            pts = {(s[a], s[b]) for s in shapes if len(s) == fp.dim}
            if pts:
                x, y = np.asarray(sorted(pts)).T
                ax.scatter(x, y, s=40, marker=ANCHOR_MARKERS[lvl % len(ANCHOR_MARKERS)], color="black", alpha=0.8, label=f"anchors level {lvl}")
        if len(plan.patch_size) == fp.dim:
            ax.axvline(plan.patch_size[a], ls="--", color="grey", lw=1, label="patch size")
            ax.axhline(plan.patch_size[b], ls="--", color="grey", lw=1)
        ax.set_xlabel(f"{names[a]} [voxels]")
        ax.set_ylabel(f"{names[b]} [voxels]")
    axes[0, 0].legend(fontsize=6)
    return _save(fig, path)


DATASET_PLOTS: tuple[tuple[str, Callable[[Fingerprint, Path], Path]], ...] = (
    ("box_sizes.png", plot_box_sizes),
    ("box_volumes.png", plot_box_volumes),
    ("box_size_scatter.png", plot_box_size_scatter),
    ("class_counts.png", plot_class_counts),
    ("instances_per_case.png", plot_instances_per_case),
    ("spacings.png", plot_spacings),
)


def write_planner_plots(fp: Fingerprint, plans: Sequence[Plan], out_dir: Path) -> list[Path]:
    """Write the planner plots of a task.

    Args:
        fp: the task's fingerprint.
        plans: the plans written for it (one per-plan folder each).
        out_dir: e.g. ``preprocessed/plans/analysis``; created if missing.

    Returns:
        paths of the PNGs written (dataset plots first, then per plan).
    """
    out_dir = Path(out_dir)
    written = [fn(fp, out_dir / name) for name, fn in DATASET_PLOTS]
    for plan in plans:
        written.append(plot_plan_box_sizes(fp, plan, out_dir / plan.plan_id / "box_size_scatter.png"))
    logger.info("planner plots written to %s (%d files)", out_dir, len(written))
    return written
