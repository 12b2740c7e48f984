"""The preprocessing of a plan as MONAI dictionary transforms, defined once for training and inference.

The chain a generated bundle's ``configs/preprocessing.json`` instantiates::

    CropForegroundNonzerod -> monai Transposed -> ResampleToSpacingd -> NormalizePerModalityd

It works on a dict with (constants below):

* ``image``: float [C, *spatial] (C modalities, raw voxel axes i, j, k),
* ``seg`` (optional): int [1, *spatial] instance map (0 background, 1..N instances),
* ``spacing``: voxel size per raw axis (mm).

and adds ``mask`` (bool [1, *spatial]: inside the body, i.e. the filled nonzero region) plus the
bookkeeping entries ``original_shape``, ``crop_bbox``, ``shape_after_crop``, ``spacing_after_resampling``
and ``shape_after_resampling``. After the chain ``image`` is float32 [C, *spatial transposed], ``seg``
has -1 outside the body. ``nndet_prep`` applies it offline and inference applies the same config online.

Why our own transforms where MONAI has some:

* Crop: nnU-Net/nnDetection crop to the bbox of the *hole-filled* nonzero mask of all channels and mark
  outside-body label voxels -1; MONAI's ``CropForegroundd`` has neither the filling nor the -1 marking.
* Resampling: ``monai.transforms.Spacingd`` maps voxel *centres* through the affine, so its output shape
  is ``(n - 1) * spacing / target + 1`` (e.g. 7 voxels of 2 mm -> 14 at 0.9 mm), not nnDetection's
  ``round(n * spacing / target)`` (16) with the pixel-edge alignment of ``skimage.transform.resize``.
  We compute ``scipy.ndimage.zoom(grid_mode=True, mode="nearest")``, which is what skimage's ``resize``
  does for ``anti_aliasing=False`` (nnU-Net's call), clipped to the input range as skimage does; the
  zoom is evaluated one axis at a time (it is separable), as a matrix product per axis.
* Normalisation: ``NormalizeIntensityd(nonzero=True)`` takes the mask from the intensities of each
  channel (``x != 0``), not the body mask, and has no dataset-percentile clipping (CT scheme).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import MapTransform
from scipy import ndimage

from planner.crop import crop_case

IMAGE_KEY = "image"
SEG_KEY = "seg"
MASK_KEY = "mask"
SPACING_KEY = "spacing"

NORM_EPS = 1e-8
SCHEMES = ("CT", "CT2", "nonCT")


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, torch tensor or MONAI MetaTensor (CPU)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------- pure functions
def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> list[int]:
    """nnU-Net's rule: ``round(shape * spacing / target)`` per axis, at least 1."""
    s = np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    return [max(1, int(v)) for v in np.round(s / np.asarray(target_spacing, dtype=np.float64))]


@functools.lru_cache(maxsize=256)
def _zoom_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """Dense [n_out, n_in] float64 matrix of scipy's 1D ``zoom`` (grid_mode, mode "nearest", prefilter).

    ``ndimage.zoom`` of an nD array is a tensor product of one linear map per axis (spline prefilter
    after edge pre-padding, then interpolation weights and indices computed per axis), so applying
    these matrices one axis after another gives the values of the nD call up to float64 rounding.
    Column ``j`` is the 1D zoom of the unit vector ``e_j``; all columns come from one zoom of the
    identity along its first axis (along the second, unzoomed, axis the interpolating spline is
    sampled at its knots: the identity up to float64 rounding). Read-only (shared through the cache).
    """
    m = np.empty((n_out, n_in), dtype=np.float64)
    ndimage.zoom(np.eye(n_in, dtype=np.float64), (n_out / n_in, 1.0), output=m, order=order, mode="nearest",
                 grid_mode=True)
    m.flags.writeable = False
    return m


@functools.lru_cache(maxsize=256)
def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index per output voxel of scipy's 1D order-0 ``zoom`` (grid_mode, mode "nearest")."""
    idx = np.empty(n_out, dtype=np.float64)
    ndimage.zoom(np.arange(n_in, dtype=np.float64), n_out / n_in, output=idx, order=0, mode="nearest",
                 grid_mode=True)
    out = np.rint(idx).astype(np.intp)
    out.flags.writeable = False
    return out


def _apply_along(x: np.ndarray, m: np.ndarray, axis: int) -> np.ndarray:
    """Contract axis ``axis`` of C-contiguous ``x`` with ``m`` [n_out, n_in]; C-contiguous result."""
    shape = x.shape
    before = int(np.prod(shape[:axis], dtype=np.int64))
    after = int(np.prod(shape[axis + 1:], dtype=np.int64))
    new_shape = (*shape[:axis], m.shape[0], *shape[axis + 1:])
    if after == 1:  # last axis: one GEMM over all lines
        return (x.reshape(before, shape[axis]) @ m.T).reshape(new_shape)
    return np.matmul(m, x.reshape(before, shape[axis], after)).reshape(new_shape)


def _separable_order(shape: Sequence[int], new_shape: Sequence[int]) -> list[int]:
    """Axes whose size changes, in the order with the fewest multiply-adds (shrinking axes first)."""
    axes = [a for a in range(len(shape)) if shape[a] != new_shape[a]]
    best: list[int] = axes
    best_cost = float("inf")
    for perm in itertools.permutations(axes):
        size, cost = float(np.prod(shape, dtype=np.float64)), 0.0
        for a in perm:
            cost += size * new_shape[a]
            size = size / shape[a] * new_shape[a]
        if cost < best_cost:
            best, best_cost = list(perm), cost
    return best


# Float64 working memory per slab of ``resample_image`` (copy of the slab's input rows plus the
# intermediate after each axis; up to twice this with the halo chunks): a 512x512x600 channel goes
# through in ~20-50 slabs, so the cost per slab (Python, BLAS call set-up, halo rows) stays small while
# the worker holds ~100 MiB of float64, not GiB.
SLAB_BYTES = 64 * 2**20
# zoom weights at most this fraction of their row's largest weight are left out of a slab's band
# (see ``_zoom_band``): far below float64 rounding of the dense product
BAND_TRUNCATION = 2.0**-60
# dtypes whose values float32 holds exactly: converted slab by slab, no whole-channel float32 copy
_EXACT_IN_FLOAT32 = (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.float32)


@functools.lru_cache(maxsize=256)
def _zoom_band(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``_zoom_matrix(n_in, n_out, order)``: the half-open column range ``[lo, hi)`` outside
    which every weight is at most ``BAND_TRUNCATION`` times the row's largest weight.

    Order <= 1 has no prefilter: the matrix is banded exactly (2 taps; 1 for order 0) and nothing
    nonzero is left out. The order-3 spline prefilter makes it dense, but its weights decay as
    ``(2 - sqrt 3)^k`` (~0.268^k) with the distance ``k`` from the sample: 2^-60 is reached ~32 rows
    away, and the dropped weights sum to < 2^-58 of the row's largest, times the largest input value:
    below the rounding error of the float64 dense sum itself (~2^-53 of it), so it only shows where the
    float64 result lies within that error of a float32 rounding boundary (about 1 voxel in 10^8).
    """
    w = np.abs(_zoom_matrix(n_in, n_out, order))
    keep = w > BAND_TRUNCATION * w.max(axis=1, keepdims=True)
    keep[~keep.any(axis=1)] = True  # an all-zero row (none seen) keeps its full width
    lo = keep.argmax(axis=1)
    hi = n_in - keep[:, ::-1].argmax(axis=1)
    lo.flags.writeable = hi.flags.writeable = False
    return lo, hi


def _work_sizes(shape: Sequence[int], new_shape: Sequence[int], axes: Sequence[int]) -> list[int]:
    """Elements of the array before and after each contraction in ``axes`` (in that order)."""
    cur, sizes = list(shape), [int(np.prod(shape, dtype=np.int64))]
    for a in axes:
        cur[a] = new_shape[a]
        sizes.append(int(np.prod(cur, dtype=np.int64)))
    return sizes


def _peak_elements(sizes: Sequence[int]) -> int:
    """Largest number of elements alive at once: a contraction's input and output."""
    return max(sizes[k] + sizes[k + 1] for k in range(len(sizes) - 1))


def _spans(n: int, rows: int) -> list[slice]:
    """``n`` rows in near-equal slabs of about ``rows`` (at least 2 each where ``n`` allows).

    No slab of a single row: a BLAS call with a dimension of 1 is a matrix-vector product whose kernel
    sums in another order than the matrix product of the whole channel (different float64 rounding).
    """
    count = max(1, min(-(-n // max(1, rows)), n // 2))
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _index(ndim: int, axis: int, sl: slice, other: int | None = None, other_sl: slice | None = None) -> tuple:
    idx = [slice(None)] * ndim
    idx[axis] = sl
    if other is not None:
        idx[other] = other_sl
    return tuple(idx)


def _resample_channel(channel: np.ndarray, out: np.ndarray, axes: Sequence[int], order: int,
                      work_bytes: int) -> None:
    """Zoom one channel [*spatial] into ``out`` (float32 [*new]) slab by slab; float64 arithmetic.

    * Whole channel within ``work_bytes``: one slab, the dense product of every changed axis.
    * An axis ``s`` whose size does not change: slabs of rows along ``s``. Each line that a contraction
      reads lies inside one slab, so every output value is the same dense dot product (same weights, same
      order) as for the whole channel; only the number of lines per BLAS call differs.
    * Every axis changes: slabs of output rows along the first contracted axis ``s``. A slab reads the
      input rows of its band (``_zoom_band``: ~32 rows of halo each side at order 3, the spline's
      reach), contracts ``s`` with that sub-matrix (in chunks along another axis, as the halo'd
      input is the largest array), then the other axes densely, as above. The first contraction
      being first keeps the halo off the expensive steps, and its banded product does a fraction of
      the dense one's multiply-adds. Contracting with the band instead of the full row only leaves out
      weights below ``BAND_TRUNCATION``: see ``_zoom_band`` for why that is invisible in float32 but
      for a rare 1-ulp difference.
    """
    shape, new = channel.shape, out.shape
    nd = len(shape)
    sizes = _work_sizes(shape, new, axes)
    budget = max(1, work_bytes // 8)  # float64 elements
    if _peak_elements(sizes) <= budget:  # small: whole channel at once
        x = np.array(channel, dtype=np.float64, order="C")
        for a in axes:
            x = _apply_along(x, _zoom_matrix(shape[a], new[a], order), a)
        out[...] = x
        return
    unchanged = [a for a in range(nd) if shape[a] == new[a]]
    if unchanged:
        s = max(unchanged, key=lambda a: shape[a])
        rows = max(1, int(budget * shape[s] // _peak_elements(sizes)))
        for sl in _spans(shape[s], rows):
            x = np.array(channel[_index(nd, s, sl)], dtype=np.float64, order="C")
            for a in axes:
                x = _apply_along(x, _zoom_matrix(shape[a], new[a], order), a)
            out[_index(nd, s, sl)] = x
        return
    s, rest = axes[0], list(axes[1:])
    m_s = _zoom_matrix(shape[s], new[s], order)
    lo, hi = _zoom_band(shape[s], new[s], order)
    after_s = [new[a] if a == s else shape[a] for a in range(nd)]
    per_row = _work_sizes(after_s, new, rest)  # per output row along s, from here on
    per_row = [v // new[s] for v in per_row]
    rows = max(1, min(new[s], int(budget // (_peak_elements(per_row) if rest else 2 * per_row[0]))))
    c = max((a for a in range(nd) if a != s), key=lambda a: shape[a], default=None)
    for span in _spans(new[s], rows):
        o0, o1 = span.start, span.stop
        i0, i1 = int(lo[o0:o1].min()), int(hi[o0:o1].max())
        sub = np.ascontiguousarray(m_s[o0:o1, i0:i1])
        y_shape = list(after_s)
        y_shape[s] = o1 - o0
        line = int(np.prod([shape[a] for a in range(nd) if a not in (s, c)], dtype=np.int64))
        chunk = max(1, int(budget // max(1, 2 * (i1 - i0 + o1 - o0) * line)))  # input + output of a chunk
        if c is None or chunk >= shape[c]:
            x = np.array(channel[_index(nd, s, slice(i0, i1))], dtype=np.float64, order="C")
            y = _apply_along(x, sub, s)
            del x
        else:
            y = np.empty(y_shape, dtype=np.float64)
            for ck in _spans(shape[c], chunk):
                x = np.array(channel[_index(nd, s, slice(i0, i1), c, ck)], dtype=np.float64, order="C")
                y[_index(nd, c, ck)] = _apply_along(x, sub, s)
            del x
        for a in rest:
            y = _apply_along(y, _zoom_matrix(shape[a], new[a], order), a)
        out[_index(nd, s, span)] = y


def resample_image(image: np.ndarray, new_shape: Sequence[int], order: int = 3,
                   work_bytes: int | None = None) -> np.ndarray:
    """Spline resampling of every channel to ``new_shape`` (pixel-edge aligned, edge mode).

    The values of ``scipy.ndimage.zoom(order=order, mode="nearest", grid_mode=True)`` per channel (up
    to float64 rounding, far below the float32 output precision), computed as one float64 matrix
    product per axis whose size changes (``_zoom_matrix``): the nD spline is separable, so BLAS does
    the work instead of the 64-tap (order 3) nD interpolation loop, and unchanged axes cost nothing.

    Memory: the float64 arithmetic runs slab by slab (``_resample_channel``), so besides input and
    output only ~``work_bytes`` of float64 are alive (a whole-channel float64 copy plus its
    intermediates were ~4 GiB on a 512x512x600 CT). Integer and float32 input is converted per slab
    (no whole float32 copy of an int16 CT either). The output is that of the whole-channel dense
    products (tests/planner/test_resample_slabs.py compares with that implementation): bit for bit
    when an axis keeps its size or at order <= 1, else but for rare 1-ulp float32 differences from
    the band truncation (see ``_zoom_band``).

    Args:
        image: [C, *spatial], float or integer; NaN is set to 0 first (+-inf to the float32 extremes).
        new_shape: target spatial shape.
        order: spline order (3 as nnDetection).
        work_bytes: float64 working memory per slab (default ``SLAB_BYTES``).

    Returns:
        float32 [C, *new_shape], each channel clipped to its input range (as skimage's resize).
    """
    image = np.asarray(image)
    if image.dtype.type not in _EXACT_IN_FLOAT32:  # float64, int32, ...: rounded to float32 first, as always
        image = np.asarray(image, dtype=np.float32)
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(image.shape[1:]) == new_shape:
        if image.dtype != np.float32 or (image.size and np.isfinite(image.min()) and np.isfinite(image.max())):
            return np.array(image, dtype=np.float32, order="C")  # nothing to replace: a plain copy
        return np.ascontiguousarray(np.nan_to_num(image, nan=0.0))
    axes = _separable_order(image.shape[1:], new_shape)
    work = SLAB_BYTES if work_bytes is None else int(work_bytes)
    out = np.empty((image.shape[0], *new_shape), dtype=np.float32)
    for c in range(image.shape[0]):
        channel = image[c]
        lo, hi = (channel.min(), channel.max()) if channel.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN -> 0, +-inf -> float32 extremes, as nan_to_num
            channel = np.nan_to_num(channel, nan=0.0)
            lo, hi = channel.min(), channel.max()
        _resample_channel(channel, out[c], axes, order, work)
        if channel.size:
            np.clip(out[c], np.float32(lo), np.float32(hi), out=out[c])
    return out


def resample_labels(labels: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label/instance map [C, *spatial]: no value is mixed or created.

    Picks the voxels of ``scipy.ndimage.zoom(order=0, mode="nearest", grid_mode=True)`` with one source
    index array per axis (order 0 is separable), exactly. Values below -1 (none arise from nearest
    neighbour; kept as nnDetection's safety rule) become 0.

    Returns:
        C-contiguous [C, *new_shape] of the input's dtype. The input array is never written; when nothing
        changes (same shape, C-contiguous, no value below -1) it is returned itself, not a copy.
    """
    labels = np.asarray(labels)
    new_shape = tuple(int(s) for s in new_shape)
    work = labels
    if tuple(labels.shape[1:]) != new_shape:
        first, *rest = [_nearest_indices(n, m) for n, m in zip(labels.shape[1:], new_shape, strict=True)]
        index = np.ix_(*rest) if rest else ()
        work = np.empty((labels.shape[0], *new_shape), dtype=labels.dtype)
        for c in range(labels.shape[0]):
            for k, i in enumerate(first):  # one output plane at a time: no whole-map temporary
                work[c, k] = labels[c, i][index]
    work = np.ascontiguousarray(work)  # the input itself when nothing changes (no copy of a whole map)
    if labels.dtype != bool and np.issubdtype(work.dtype, np.signedinteger):
        low = work < -1
        if low.any():
            if np.shares_memory(work, labels):  # the caller's array is never written
                work = work.copy()
            work[low] = 0
    return work


def normalize_channel(
    x: np.ndarray, scheme: str, props: Mapping[str, float], mask: np.ndarray | None, use_mask: bool,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Normalise one channel (float32 [*spatial]) by its modality's scheme (nnDetection's rules).

    Args:
        x: intensities of one modality.
        scheme: "CT" (clip to dataset foreground percentiles 0.5/99.5, then dataset foreground z-score),
            "CT2" (same clip, then z-score over this case's voxels strictly inside the clip window) or
            "nonCT" (z-score over the body mask if ``use_mask`` else the whole image).
        props: dataset foreground statistics of the modality (``mean``, ``std``, ``percentile_00_5``,
            ``percentile_99_5``), used by the CT schemes.
        mask: bool [*spatial] body mask (inside the nonzero crop region); needed when ``use_mask``.
        use_mask: set voxels outside ``mask`` to 0 (and, for nonCT, take the statistics inside it).
        out: float32 [*spatial] to write into (may be ``x`` itself); a new array if None. The float32
            operations are the same either way (in place with ``out=``, no whole-array temporaries).

    Returns:
        float32 [*spatial] (``out`` when given).
    """
    x = np.asarray(x, dtype=np.float32)
    if use_mask and mask is None:
        raise ValueError("use_mask_for_norm is set but no body mask was given (run the crop transform first)")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown normalisation scheme {scheme!r}; the plan must use one of {SCHEMES}")
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    if scheme in ("CT", "CT2"):
        lb, ub = float(props["percentile_00_5"]), float(props["percentile_99_5"])
        if scheme == "CT":
            mean, std = float(props["mean"]), float(props["std"])
            np.clip(x, lb, ub, out=out)
        else:
            inside = (x > lb) & (x < ub)  # before ``out`` (maybe ``x``) is written
            np.clip(x, lb, ub, out=out)
            vals = out[inside]
            del inside
            mean = float(vals.mean(dtype=np.float64)) if vals.size else 0.0
            std = float(vals.std(dtype=np.float64)) if vals.size else 0.0
            del vals
        np.subtract(out, mean, out=out)
        np.divide(out, max(std, NORM_EPS), out=out)
        if use_mask:
            out[~mask] = 0
        return out
    # nonCT. Without the mask every voxel counts: ravel gives the C-order values boolean indexing would
    # (a view, not a copy, for the contiguous arrays of the chain), so the statistics are the same
    vals = x[mask] if use_mask else np.ravel(x)
    mean = float(vals.mean(dtype=np.float64)) if vals.size else 0.0
    std = float(vals.std(dtype=np.float64)) if vals.size else 0.0
    if not use_mask:
        np.subtract(x, mean, out=out)
        np.divide(out, std + NORM_EPS, out=out)
        return out
    vals = (vals - mean) / (std + NORM_EPS)
    out[~mask] = 0
    out[mask] = vals
    return out


# --------------------------------------------------------------------------------- dict transforms
class CropForegroundNonzerod(MapTransform):
    """Crop image (+ instance map) to the filled nonzero region of all channels (``planner.crop``).

    Adds ``mask_key`` (bool [1, *cropped]: the body, i.e. label >= 0), ``original_shape``, ``crop_bbox``
    (half-open [[lo, hi), ...] per raw axis) and ``shape_after_crop``. Label voxels outside the body that
    were background become -1. Unlabeled input gets the body mask all the same.

    ``consume``: the dict it is given and the label map in it are the chain's own (the preprocessing worker's
    freshly loaded case): the -1 marks go into that map where nothing is cropped away from it, and the dict's
    entries are replaced rather than copied, so no second whole label map exists. Never for arrays a caller
    still reads.
    """

    def __init__(self, keys: str = IMAGE_KEY, seg_key: str = SEG_KEY, mask_key: str = MASK_KEY,
                 consume: bool = False) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError("CropForegroundNonzerod crops one image key (all its channels define the body)")
        self.seg_key, self.mask_key = seg_key, mask_key
        self.consume = bool(consume)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = data if self.consume and isinstance(data, dict) else dict(data)
        key = self.keys[0]
        image = to_numpy(d[key])
        seg = d.get(self.seg_key)
        own = seg is None or (self.consume and isinstance(seg, np.ndarray))
        seg_in = to_numpy(seg)[0] if seg is not None else np.zeros(image.shape[1:], dtype=np.int8)
        image_c, seg_c, bbox = crop_case(image, seg_in, seg_in_place=own)
        d[key] = image_c
        d[self.mask_key] = (seg_c >= 0)[None]
        if seg is not None:
            d[self.seg_key] = seg_c[None]
        d["original_shape"] = [int(s) for s in image.shape[1:]]
        d["crop_bbox"] = [[int(lo), int(hi)] for lo, hi in bbox]
        d["shape_after_crop"] = [int(s) for s in image_c.shape[1:]]
        return d


class ResampleToSpacingd(MapTransform):
    """Resample arrays to the plan's target spacing (nnDetection: image spline order 3, labels order 0).

    Runs after the transpose, so it reorders the raw ``spacing`` entry by ``transpose_forward`` to match
    the arrays. Output shape ``round(shape * spacing / target)``; nothing is done when it equals the input
    shape (as nnU-Net). Adds ``spacing_after_resampling`` (effective spacing of the output grid,
    transposed), ``shape_after_resampling`` and ``transpose_forward``.

    Args:
        keys: channel-first arrays [C, *spatial] to resample (missing keys skipped if allowed).
        target_spacing: target voxel size in the transposed axis order (``plan.target_spacing_transposed``).
        transpose_forward: the axis order applied by the transpose step (identity if None).
        order: spline order per key (3 for images; 0 = nearest neighbour for label/instance maps and masks).
        spacing_key: entry holding the voxel size per raw axis.
        consume: replace the entries of the dict it is given, one key after the other, instead of returning
            a new dict: each input array is released as soon as its output exists (a 512x512x600 case never
            holds the image's input and output together with the label map's). Only for a dict nobody else
            reads; the bundle's chain sets it, as the transpose step before it hands over a fresh dict.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        target_spacing: Sequence[float],
        transpose_forward: Sequence[int] | None = None,
        order: int | Sequence[int] = 3,
        spacing_key: str = SPACING_KEY,
        allow_missing_keys: bool = True,
        consume: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.target_spacing = [float(s) for s in target_spacing]
        self.transpose_forward = list(range(len(self.target_spacing))) if transpose_forward is None else [
            int(a) for a in transpose_forward
        ]
        orders = [order] * len(self.keys) if isinstance(order, int) else list(order)
        if len(orders) != len(self.keys):
            raise ValueError(f"ResampleToSpacingd: {len(orders)} orders for {len(self.keys)} keys")
        self.orders = dict(zip(self.keys, orders, strict=True))
        self.spacing_key = spacing_key
        self.consume = bool(consume)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = data if self.consume and isinstance(data, dict) else dict(data)
        if self.spacing_key not in d:
            raise KeyError(f"ResampleToSpacingd needs the voxel spacing in data[{self.spacing_key!r}]")
        raw = [float(s) for s in d[self.spacing_key]]
        spacing = [raw[a] for a in self.transpose_forward]
        present = [k for k in self.key_iterator(d)]
        if not present:
            return d
        if self.consume:  # label maps and masks first: the image's input and output then meet fewer others
            present.sort(key=lambda k: self.orders[k] != 0)
        shape = to_numpy(d[present[0]]).shape[1:]
        new_shape = compute_new_shape(shape, spacing, self.target_spacing)
        for key in present:
            arr = to_numpy(d[key])
            if self.consume:
                d[key] = None  # only ``arr`` holds the input now: released when the output replaces it
            if self.orders[key] == 0:
                out = resample_labels(arr, new_shape)
            else:
                out = resample_image(arr, new_shape, order=self.orders[key])
            del arr
            d[key] = out
            del out
        d["spacing_after_resampling"] = [
            float(s * n / m) for s, n, m in zip(spacing, shape, new_shape, strict=True)
        ]
        d["shape_after_resampling"] = [int(s) for s in new_shape]
        d["transpose_forward"] = list(self.transpose_forward)
        return d


class NormalizePerModalityd(MapTransform):
    """Normalise each channel of the image by its modality's scheme (see ``normalize_channel``).

    Args:
        keys: the image key ([C, *spatial], C = number of modalities).
        schemes: per modality "CT", "CT2" or "nonCT" (``plan.normalization_schemes``).
        intensity_properties: per modality dataset foreground statistics (``plan.intensity_properties``).
        use_mask_for_norm: per modality (``plan.use_mask_for_norm``).
        mask_key: body mask [1, *spatial] written by the crop step (needed where the mask is used).
        in_place: write the result into the image array itself (when it is a writable C-contiguous
            float32 numpy array owning its memory; anything else, a tensor included, is left alone and
            a new array made) instead of a new one: the same values without a second whole image in
            memory. Only for an array nobody else holds; the bundle's chain sets it, as
            ``ResampleToSpacingd`` before it always hands over a fresh array.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        schemes: Sequence[str],
        intensity_properties: Sequence[Mapping[str, float]],
        use_mask_for_norm: Sequence[bool],
        mask_key: str = MASK_KEY,
        in_place: bool = False,
    ) -> None:
        super().__init__(keys)
        if not len(schemes) == len(intensity_properties) == len(use_mask_for_norm):
            raise ValueError(
                f"NormalizePerModalityd: {len(schemes)} schemes, {len(intensity_properties)} intensity properties "
                f"and {len(use_mask_for_norm)} use_mask flags must all be one per modality"
            )
        bad = [s for s in schemes if s not in SCHEMES]
        if bad:
            raise ValueError(f"unknown normalisation scheme(s) {bad}; use one of {SCHEMES}")
        self.schemes = list(schemes)
        self.props = [dict(p) for p in intensity_properties]
        self.use_mask = [bool(u) for u in use_mask_for_norm]
        self.mask_key = mask_key
        self.in_place = bool(in_place)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = None  # only where a modality uses it (no whole-image copy otherwise)
        if self.mask_key in d and any(self.use_mask):
            mask = to_numpy(d[self.mask_key])[0].astype(bool, copy=False)
        for key in self.key_iterator(d):
            image = to_numpy(d[key])
            if image.shape[0] != len(self.schemes):
                raise ValueError(
                    f"image has {image.shape[0]} channels but the plan has {len(self.schemes)} modalities"
                )
            # a numpy array of its own memory only: not a tensor's buffer, nor a view into another array
            own = (self.in_place and isinstance(d[key], np.ndarray) and image.dtype == np.float32
                   and image.flags.c_contiguous and image.flags.writeable and image.flags.owndata)
            out = image if own else np.empty(image.shape, dtype=np.float32)
            for c in range(image.shape[0]):
                normalize_channel(image[c], self.schemes[c], self.props[c], mask, self.use_mask[c], out=out[c])
            d[key] = out
        return d
