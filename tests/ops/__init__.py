"""Tests of the box ops; shared helpers: random StandardMode boxes and a plain float64 IoU."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


def random_boxes(rng: np.random.Generator, n: int, dim: int = 3, extent: float = 256.0,
                 size: tuple[float, float] = (4.0, 40.0)) -> np.ndarray:
    """Boxes with centres uniform in [0, extent)^dim and sides uniform in ``size`` (float32, StandardMode)."""
    c = rng.uniform(0, extent, (n, dim))
    s = rng.uniform(size[0], size[1], (n, dim))
    return np.concatenate([c - s / 2, c + s / 2], axis=1).astype(np.float32)


@st.composite
def box_sets(draw, dim: int | None = None, max_n: int = 40, extent: int = 24):
    """Small integer-corner boxes in a small volume (many overlaps, exact IoU ties possible)."""
    d = draw(st.sampled_from([2, 3])) if dim is None else dim
    n = draw(st.integers(0, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lo = rng.integers(0, extent, (n, d))
    size = rng.integers(1, 10, (n, d))
    boxes = np.concatenate([lo, lo + size], axis=1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / max(n, 1) + np.float32(0.01)  # distinct
    return boxes, scores


def pair_iou64(a, b) -> float:
    """IoU of two boxes computed plainly in float64 (independent of ops.boxes)."""
    d = len(a) // 2
    inter = 1.0
    va = vb = 1.0
    for k in range(d):
        inter *= max(0.0, min(float(a[d + k]), float(b[d + k])) - max(float(a[k]), float(b[k])))
        va *= float(a[d + k]) - float(a[k])
        vb *= float(b[d + k]) - float(b[k])
    return inter / (va + vb - inter) if inter > 0 else 0.0
