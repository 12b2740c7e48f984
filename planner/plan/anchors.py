"""Anchor planning: per-axis anchor sizes that best cover the GT boxes (nnDetection's ``BoxC002._plan_anchors``).

Anchors are parameterised as in nnDetection: one set of 3 sizes per axis at the first decoder
level, every combination is an anchor shape (3**dim per location: 27 in 3D, 9 in 2D), and the same
shapes are scaled per axis by the cumulative stride of each decoder level relative to the first
decoder level. Sizes are in voxels of the preprocessed image (target spacing, transposed axes).

The objective is the mean over GT boxes of the best IoU with any anchor shape of any level, with
every box and anchor centred at the origin. For centred boxes the intersection is separable per
axis, ``prod_a min(b_a, s_a)``, which keeps the objective a few small array products.

Optimiser: ``scipy.optimize.differential_evolution`` with integer sizes >= 1, seeded, started from
nnDetection's initial sizes (4, 8, 16); the best value found is kept (nnDetection keeps the value of
the last step, an oddity we do not copy). nnDetection uses nevergrad TwoPointsDE (budget 5000 x 3).

Consumption by MONAI: ``AnchorGeneratorWithAnchorShape`` scales one list of shapes by a *scalar*
per level, which cannot express anisotropic strides. Use :func:`anchor_shapes_per_level` to get the
[num_levels][A][dim] shapes (same order as the classifier's anchor channels) and set them as the
generator's per-level cell anchors. Anchor centres are on the grid of each level (MONAI: position x
image_size // feature_map_size), so sizes need no further scaling.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np
from scipy.optimize import differential_evolution

from planner.plan.plan import AnchorPlan

logger = logging.getLogger(__name__)

ANCHOR_INIT = (4.0, 8.0, 16.0)  # nnDetection BoxC002 initial sizes per axis (first decoder level)
SIZES_PER_AXIS = 3
FILTER_PERCENTILES = (0.5, 99.5)  # GT boxes outside this size range (any axis) are ignored
MAX_BOXES = 500  # the optimiser sees at most this many GT boxes (seeded subsample) to bound the run time
MAX_BOXES_REPORT = 20000  # the reported mean best IoU uses up to this many filtered boxes
ANCHOR_SEED = 0
# generations: what decides the result (not the subsample: 2000 or 5000 boxes at 40 generations were no better
# than 500). benchmarks/anchor_budget.py, mean best IoU over all boxes, ours (500 boxes, 160 generations) vs
# nnDetection's budget (3 x 5000 evaluations on all boxes, best kept): small lesions 0.7937 vs 0.7952, small +
# large 0.7633 vs 0.7466, anisotropic 0.7843 vs 0.7760, 2D 0.8735 vs 0.8733, at 1/5 to 1/9 of its time;
# 40 generations were 0.006-0.034 below it
DE_MAXITER = 160
DE_POPSIZE = 10  # population = popsize x number of parameters


def anchors_per_location(dim: int) -> int:
    """Anchors per location A of a ``dim``-D plan (27 in 3D, 9 in 2D).

    Every combination of the ``SIZES_PER_AXIS`` sizes of each axis is an anchor shape, so A is the
    number of those combinations, the count ``build_detector`` takes of a plan's anchor sizes
    (``len(anchor_shapes(sizes[0]))``) to size the network's head outputs. The planner needs A before
    the sizes are optimised (the memory estimate of the patch loop), hence a function of ``dim``.
    """
    return len(_shapes(np.ones((dim, SIZES_PER_AXIS))))


def relative_level_strides(strides: Sequence[Sequence[int]], levels: Sequence[int]) -> np.ndarray:
    """[num_levels, dim] cumulative stride of each decoder level divided by that of the first one.

    Args:
        strides: per-stage strides (stage 0 all ones).
        levels: decoder levels (stage indices).
    """
    cum = np.cumprod(np.asarray(strides, dtype=np.float64), axis=0)
    sel = cum[list(levels)]
    return sel / sel[0]


def filter_box_sizes(sizes: np.ndarray, percentiles: tuple[float, float] = FILTER_PERCENTILES) -> np.ndarray:
    """Keep boxes whose size lies within the [0.5, 99.5] percentiles on every axis (inclusive).

    nnDetection compares strictly, which drops every box when all boxes have the same size; we keep
    the bounds themselves.
    """
    if len(sizes) == 0:
        return sizes
    lo = np.percentile(sizes, percentiles[0], axis=0)
    hi = np.percentile(sizes, percentiles[1], axis=0)
    keep = np.all((sizes >= lo) & (sizes <= hi), axis=1)
    return sizes[keep]


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n`` rows of ``x`` (random, order kept)."""
    if len(x) <= n:
        return x
    return x[np.sort(rng.choice(len(x), size=n, replace=False))]


def _shapes(per_axis: np.ndarray) -> np.ndarray:
    """[dim, k] per-axis sizes -> [k**dim, dim] all combinations (first axis slowest)."""
    return np.asarray(list(itertools.product(*per_axis)), dtype=np.float64)


def mean_best_iou(box_sizes: np.ndarray, base: np.ndarray, level_strides: np.ndarray) -> float:
    """Mean over boxes of the best IoU with any anchor of any level (all centred at the origin).

    Args:
        box_sizes: [N, dim] GT box extents (voxels).
        base: [dim, k] per-axis anchor sizes at the first decoder level.
        level_strides: [L, dim] relative stride per level.

    Returns:
        Mean best IoU in [0, 1] (0 for no boxes).
    """
    if len(box_sizes) == 0:
        return 0.0
    dim = box_sizes.shape[1]
    # per axis: [L, k] anchor extents of every level, then [N, L, k] intersections with the boxes
    ext = [level_strides[:, a, None] * base[a][None, :] for a in range(dim)]
    inter = None
    vol = None
    for a in range(dim):
        m = np.minimum(box_sizes[:, a, None, None], ext[a][None])  # [N, L, k]
        shape_n = [box_sizes.shape[0], level_strides.shape[0]] + [1] * dim
        shape_n[2 + a] = ext[a].shape[1]
        shape_v = shape_n.copy()
        shape_v[0] = 1
        m = m.reshape(shape_n)
        e = ext[a].reshape(shape_v)
        inter = m if inter is None else inter * m
        vol = e if vol is None else vol * e
    box_vol = np.prod(box_sizes, axis=1).reshape([-1] + [1] * (dim + 1))
    iou = inter / (box_vol + vol - inter)
    return float(iou.reshape(box_sizes.shape[0], -1).max(axis=1).mean())


def anchor_shapes_per_level(plan: AnchorPlan) -> list[list[list[float]]]:
    """[num_levels][A][dim] anchor shapes (voxels) from ``plan.sizes``, first axis varying slowest."""
    return [_shapes(np.asarray(level)).tolist() for level in plan.sizes]


def plan_anchors(
    box_sizes: np.ndarray,
    strides: Sequence[Sequence[int]],
    levels: Sequence[int],
    seed: int = ANCHOR_SEED,
    max_boxes: int = MAX_BOXES,
    maxiter: int = DE_MAXITER,
) -> AnchorPlan:
    """Optimise per-axis anchor sizes for the GT boxes of a plan.

    Args:
        box_sizes: [N, dim] GT box extents in voxels of the preprocessed image (target spacing,
            transposed axes), e.g. from :func:`planner.plan.rules.box_sizes_transposed`.
        strides: per-stage strides of the plan's encoder (stage 0 all ones).
        levels: decoder levels feeding the heads.
        seed: seed of the subsampling and of the optimiser (deterministic plans).
        max_boxes: subsample the filtered boxes to at most this many.
        maxiter: differential-evolution generations.

    Returns:
        :class:`AnchorPlan` with ``base_sizes[a]`` the 3 sizes per axis at the first decoder level,
        ``sizes[l][a] = base_sizes[a] * relative stride of level l on axis a`` (voxels of the
        preprocessed image), the mean best IoU over the filtered boxes (up to
        ``MAX_BOXES_REPORT`` of them, not only the optimiser's subsample), and 3**dim anchors per
        location.
    """
    dim = len(strides[0])
    box_sizes = np.asarray(box_sizes, dtype=np.float64).reshape(-1, dim)
    rel = relative_level_strides(strides, levels)
    init = np.tile(np.asarray(ANCHOR_INIT[:SIZES_PER_AXIS]), (dim, 1))
    rng = np.random.default_rng(seed)
    # float32 makes the objective ~3x faster; the IoU error is ~1e-7
    filtered = np.maximum(filter_box_sizes(box_sizes), 1e-3).astype(np.float32)
    report = _subsample(filtered, MAX_BOXES_REPORT, rng)
    sizes = _subsample(report, max_boxes, rng)

    if len(sizes) == 0:
        logger.warning("no GT boxes to plan anchors from; using the initial sizes %s", ANCHOR_INIT)
        base = init
    else:
        hi = np.maximum(np.ceil(sizes.max(axis=0)), 2.0)  # a base anchor larger than every box is useless
        bounds = [(1.0, float(hi[a])) for a in range(dim) for _ in range(SIZES_PER_AXIS)]
        x0 = np.clip(init.reshape(-1), [b[0] for b in bounds], [b[1] for b in bounds])
        rel32 = rel.astype(np.float32)

        def objective(x: np.ndarray) -> float:
            return -mean_best_iou(sizes, np.round(x).astype(np.float32).reshape(dim, SIZES_PER_AXIS), rel32)

        init_value = -objective(x0)
        res = differential_evolution(
            objective,
            bounds,
            integrality=[True] * len(bounds),
            x0=x0,
            seed=seed,
            maxiter=maxiter,
            popsize=DE_POPSIZE,
            tol=1e-6,
            polish=False,
            init="latinhypercube",
        )
        # DE keeps its best member, which started at x0; the guard only documents the intent
        x = np.round(res.x) if -res.fun >= init_value else np.round(x0)
        base = x.reshape(dim, SIZES_PER_AXIS)
        logger.info("anchors: %d boxes optimised (%d evaluations), mean best IoU %.4f (initial %.4f)",
                    len(sizes), res.nfev, -res.fun, init_value)
    best = mean_best_iou(report, base.astype(np.float32), rel.astype(np.float32))
    base = np.sort(base, axis=1)
    per_level = [[[float(v) for v in base[a] * rel[lv, a]] for a in range(dim)] for lv in range(len(rel))]
    return AnchorPlan(
        base_sizes=[[float(v) for v in base[a]] for a in range(dim)],
        sizes=per_level,
        mean_best_iou=float(best),
        num_anchors_per_location=len(_shapes(base)),
    )
