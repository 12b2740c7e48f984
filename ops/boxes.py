"""Box conventions (the one place they are written down) and the shared CPU arithmetic.

Box mode
    MONAI ``StandardMode``: 2D boxes are ``[N, 4]`` rows ``(x1, y1, x2, y2)``, 3D boxes are ``[N, 6]``
    rows ``(x1, y1, z1, x2, y2, z2)``. ``x, y, z`` are the array axes ``i, j, k`` (nibabel voxel order),
    in voxel units of whatever image the boxes belong to (preprocessed or original space).

Corner convention (half-open)
    Voxel ``i`` covers the interval ``[i, i + 1)``. A box covering voxels ``i..j`` (inclusive) along an
    axis is ``[i, j + 1)``: ``x1 = i``, ``x2 = j + 1``. Size is ``x2 - x1`` (no ``+ 1``), volume is the
    product of sizes. In world/continuous-index terms (voxel centres at integers) the box edges are
    ``i - 0.5`` and ``j + 0.5``. nnDetection stores ``(x1, y1, x2, y2, z1, z2)`` with the extent ``(min - 1, max + 1)``; convert with
    ``workflow.evaluate``'s converters at the boundary (``nndet_eval --box_convention nndetection``), never here.

Overlap arithmetic (identical on every backend)
    All IoU/GIoU values are computed in **float32** with one fixed operation order, on the CPU (numpy)
    and on the GPU (CUDA kernels in ``ops/kernels``, built with explicit round-to-nearest intrinsics,
    no FMA contraction), so NMS/WBC decisions are bit-identical across backends::

        w_d    = max(0, min(a.hi_d, b.hi_d) - max(a.lo_d, b.lo_d))        per axis d
        inter  = (w_0 * w_1) [* w_2]
        vol(a) = ((a.hi_0 - a.lo_0) * (a.hi_1 - a.lo_1)) [* (a.hi_2 - a.lo_2)]
        union  = (vol(a) + vol(b)) - inter
        iou    = inter / union   if inter > 0 else 0

    Consequences: IoU is symmetric bit for bit; touching boxes have IoU 0; a **zero-size box** (any
    side 0) has IoU 0 with every box, itself included, so NMS never suppresses it and never lets it
    suppress anything. GIoU = iou - (enclose - union) / enclose, with the last term 0 when the
    enclosing box has volume 0. Coordinates must be finite and ``hi >= lo`` (ValueError otherwise).

Ranking
    Scores are ranked in float32, descending; equal scores (also float64 scores that are equal after
    rounding to float32) keep input order: lower index first. ``-0.0`` equals ``0.0``. NaN scores raise.
    Suppression/clustering uses ``IoU > threshold`` (strictly greater, as torchvision and MONAI).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "array_module",
    "box_dims",
    "check_boxes",
    "check_scores",
    "check_threshold",
    "iou_elementwise",
    "giou_elementwise",
    "rank_keys",
    "rank_order",
]


def array_module(a):
    """``numpy`` for numpy arrays, ``cupy`` for CuPy arrays (so the same code runs on both backends)."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def box_dims(boxes_shape: tuple[int, ...], name: str = "boxes") -> int:
    """Spatial dimensionality (2 or 3) of a ``[N, 4]`` or ``[N, 6]`` box array shape."""
    if len(boxes_shape) != 2 or boxes_shape[1] not in (4, 6):
        raise ValueError(
            f"{name} must have shape [N, 4] (2D x1,y1,x2,y2) or [N, 6] (3D x1,y1,z1,x2,y2,z2), "
            f"got {tuple(boxes_shape)}; convert other box modes with monai.data.box_utils.convert_box_mode"
        )
    return boxes_shape[1] // 2


def check_boxes(boxes: np.ndarray, name: str = "boxes") -> np.ndarray:
    """Validate a numpy/CuPy box array and return it as C-contiguous float32 ``[N, 2*D]``.

    Raises:
        ValueError: wrong shape, non-finite coordinates or inverted boxes (``hi < lo``).
    """
    xp = array_module(boxes)
    d = box_dims(boxes.shape, name)
    out = xp.ascontiguousarray(boxes, dtype=xp.float32)
    finite = xp.isfinite(out).all(axis=1)
    if not bool(finite.all()):
        rows = xp.flatnonzero(~finite)[:5].tolist()
        raise ValueError(f"{name} contain NaN or Inf coordinates (rows {rows}...)")
    bad = (out[:, d:] < out[:, :d]).any(axis=1)
    if bool(bad.any()):
        raise ValueError(
            f"{name} have hi < lo (rows {xp.flatnonzero(bad)[:5].tolist()}...): expected StandardMode "
            "corners (x1,y1[,z1],x2,y2[,z2]) with x2 >= x1; nnDetection order (x1,y1,x2,y2,z1,z2) must be converted first"
        )
    return out


def check_scores(scores: np.ndarray, n: int, name: str = "scores") -> np.ndarray:
    """Validate a ``[N]`` score vector (no NaN) and return it as float32."""
    xp = array_module(scores)
    if tuple(scores.shape) != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one per box), got {tuple(scores.shape)}")
    s = xp.ascontiguousarray(scores, dtype=xp.float32)
    nan = xp.isnan(s)
    if bool(nan.any()):
        raise ValueError(f"{name} contain NaN (indices {xp.flatnonzero(nan)[:5].tolist()}...); cannot rank them")
    return s


def check_threshold(iou_threshold: float, name: str = "iou_threshold") -> np.float32:
    """IoU thresholds are finite and >= 0 (IoU of disjoint boxes is 0 and must never suppress)."""
    t = float(iou_threshold)
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {iou_threshold!r}")
    return np.float32(t)


def _inter_vols(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection and both volumes for broadcastable float32 box arrays ``[..., 2*D]``."""
    xp = array_module(a)
    d = a.shape[-1] // 2
    inter = vol_a = vol_b = None
    for k in range(d):
        w = xp.minimum(a[..., d + k], b[..., d + k]) - xp.maximum(a[..., k], b[..., k])
        w = xp.maximum(w, xp.float32(0))
        sa = a[..., d + k] - a[..., k]
        sb = b[..., d + k] - b[..., k]
        inter = w if inter is None else inter * w
        vol_a = sa if vol_a is None else vol_a * sa
        vol_b = sb if vol_b is None else vol_b * sb
    return inter, vol_a, vol_b


def iou_elementwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of broadcastable float32 boxes ``a[..., 2D]`` and ``b[..., 2D]`` (module formula) -> float32."""
    inter, vol_a, vol_b = _inter_vols(a, b)
    return _safe_ratio(inter, (vol_a + vol_b) - inter, inter > 0)


def _safe_ratio(num, den, ok):
    """num / den where ``ok`` (den > 0 there), else 0; float32."""
    xp = array_module(num)
    return xp.where(ok, num / xp.where(ok, den, xp.float32(1)), xp.float32(0)).astype(xp.float32, copy=False)


def giou_elementwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Generalised IoU of broadcastable float32 boxes (module formula) -> float32 in [-1, 1]."""
    xp = array_module(a)
    d = a.shape[-1] // 2
    inter, vol_a, vol_b = _inter_vols(a, b)
    union = (vol_a + vol_b) - inter
    iou = _safe_ratio(inter, union, inter > 0)
    enc = None
    for k in range(d):
        e = xp.maximum(a[..., d + k], b[..., d + k]) - xp.minimum(a[..., k], b[..., k])
        enc = e if enc is None else enc * e
    return iou - _safe_ratio(enc - union, enc, enc > 0)


def rank_keys(scores32: np.ndarray) -> np.ndarray:
    """Unique uint64 keys whose ascending order is (score descending, index ascending).

    High 32 bits: the float32 score mapped to an order-preserving unsigned integer, inverted; low 32
    bits: the index. The same construction runs on the GPU (``ops.cuda``), so both backends rank
    identically without relying on a stable device sort.
    """
    xp = array_module(scores32)
    s = (scores32.astype(xp.float32) + xp.float32(0.0)).view(xp.uint32)  # -0.0 -> +0.0
    neg = (s >> xp.uint32(31)).astype(bool)
    ordered = xp.where(neg, ~s, s | xp.uint32(0x80000000))
    desc = (~ordered).astype(xp.uint64)
    return (desc << xp.uint64(32)) | xp.arange(s.size, dtype=xp.uint64)


def rank_order(scores32: np.ndarray) -> np.ndarray:
    """Indices sorting ``scores32`` descending, ties by lower index first (int64)."""
    xp = array_module(scores32)
    if scores32.size >= 2**32:
        raise ValueError("more than 2**32 boxes are not supported")
    return (xp.sort(rank_keys(scores32)) & xp.uint64(0xFFFFFFFF)).astype(xp.int64)
