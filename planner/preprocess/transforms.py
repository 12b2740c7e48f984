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


def resample_image(image: np.ndarray, new_shape: Sequence[int], order: int = 3) -> np.ndarray:
    """Spline resampling of every channel to ``new_shape`` (pixel-edge aligned, edge mode).

    The values of ``scipy.ndimage.zoom(order=order, mode="nearest", grid_mode=True)`` per channel (up
    to float64 rounding, far below the float32 output precision), computed as one float64 matrix
    product per axis whose size changes (``_zoom_matrix``): the nD spline is separable, so BLAS does
    the work instead of the 64-tap (order 3) nD interpolation loop, and unchanged axes cost nothing.

    Args:
        image: float [C, *spatial]; NaN is set to 0 first.
        new_shape: target spatial shape.
        order: spline order (3 as nnDetection).

    Returns:
        float32 [C, *new_shape], each channel clipped to its input range (as skimage's resize).
    """
    image = np.asarray(image, dtype=np.float32)
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(image.shape[1:]) == new_shape:
        if image.size and np.isfinite(image.min()) and np.isfinite(image.max()):
            return np.array(image, order="C")  # nothing to replace: a plain copy, as nan_to_num would make
        return np.ascontiguousarray(np.nan_to_num(image, nan=0.0))
    axes = _separable_order(image.shape[1:], new_shape)
    out = np.empty((image.shape[0], *new_shape), dtype=np.float32)
    for c in range(image.shape[0]):
        channel = image[c]
        lo, hi = (channel.min(), channel.max()) if channel.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN -> 0, +-inf -> float32 extremes, as nan_to_num
            channel = np.nan_to_num(channel, nan=0.0)
            lo, hi = channel.min(), channel.max()
        x = np.array(channel, dtype=np.float64, order="C")
        for a in axes:
            x = _apply_along(x, _zoom_matrix(image.shape[1 + a], new_shape[a], order), a)
        out[c] = x
        if channel.size:
            np.clip(out[c], lo, hi, out=out[c])
    return out


def resample_labels(labels: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label/instance map [C, *spatial]: no value is mixed or created.

    Picks the voxels of ``scipy.ndimage.zoom(order=0, mode="nearest", grid_mode=True)`` with one source
    index array per axis (order 0 is separable), exactly. Values below -1 (none arise from nearest
    neighbour; kept as nnDetection's safety rule) become 0.
    """
    labels = np.asarray(labels)
    new_shape = tuple(int(s) for s in new_shape)
    work = labels
    if tuple(labels.shape[1:]) != new_shape:
        index = np.ix_(*[_nearest_indices(n, m) for n, m in zip(labels.shape[1:], new_shape, strict=True)])
        work = np.empty((labels.shape[0], *new_shape), dtype=labels.dtype)
        for c in range(labels.shape[0]):
            work[c] = labels[c][index]
    work = np.ascontiguousarray(work)
    if labels.dtype != bool and np.issubdtype(work.dtype, np.signedinteger):
        work[work < -1] = 0
    return work


def normalize_channel(
    x: np.ndarray, scheme: str, props: Mapping[str, float], mask: np.ndarray | None, use_mask: bool
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

    Returns:
        float32 [*spatial].
    """
    x = np.asarray(x, dtype=np.float32)
    if use_mask and mask is None:
        raise ValueError("use_mask_for_norm is set but no body mask was given (run the crop transform first)")
    if scheme in ("CT", "CT2"):
        lb, ub = float(props["percentile_00_5"]), float(props["percentile_99_5"])
        if scheme == "CT":
            mean, std = float(props["mean"]), float(props["std"])
            out = np.clip(x, lb, ub)
        else:
            inside = (x > lb) & (x < ub)
            out = np.clip(x, lb, ub)
            vals = out[inside]
            mean = float(vals.mean(dtype=np.float64)) if vals.size else 0.0
            std = float(vals.std(dtype=np.float64)) if vals.size else 0.0
        out = ((out - mean) / max(std, NORM_EPS)).astype(np.float32)
        if use_mask:
            out[~mask] = 0
        return out
    if scheme == "nonCT":
        # without the mask every voxel counts: ravel gives the C-order values boolean indexing would
        # (a view, not a copy, for the contiguous arrays of the chain), so the statistics are the same
        vals = x[mask] if use_mask else np.ravel(x)
        mean = float(vals.mean(dtype=np.float64)) if vals.size else 0.0
        std = float(vals.std(dtype=np.float64)) if vals.size else 0.0
        if not use_mask:
            return ((vals - mean) / (std + NORM_EPS)).reshape(x.shape)
        out = np.zeros_like(x)
        out[mask] = (vals - mean) / (std + NORM_EPS)
        return out
    raise ValueError(f"unknown normalisation scheme {scheme!r}; the plan must use one of {SCHEMES}")


# --------------------------------------------------------------------------------- dict transforms
class CropForegroundNonzerod(MapTransform):
    """Crop image (+ instance map) to the filled nonzero region of all channels (``planner.crop``).

    Adds ``mask_key`` (bool [1, *cropped]: the body, i.e. label >= 0), ``original_shape``, ``crop_bbox``
    (half-open [[lo, hi), ...] per raw axis) and ``shape_after_crop``. Label voxels outside the body that
    were background become -1. Unlabeled input gets the body mask all the same.
    """

    def __init__(self, keys: str = IMAGE_KEY, seg_key: str = SEG_KEY, mask_key: str = MASK_KEY) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError("CropForegroundNonzerod crops one image key (all its channels define the body)")
        self.seg_key, self.mask_key = seg_key, mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        image = to_numpy(d[key])
        seg = d.get(self.seg_key)
        seg_in = to_numpy(seg)[0] if seg is not None else np.zeros(image.shape[1:], dtype=np.int8)
        image_c, seg_c, bbox = crop_case(image, seg_in)
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
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        target_spacing: Sequence[float],
        transpose_forward: Sequence[int] | None = None,
        order: int | Sequence[int] = 3,
        spacing_key: str = SPACING_KEY,
        allow_missing_keys: bool = True,
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

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.spacing_key not in d:
            raise KeyError(f"ResampleToSpacingd needs the voxel spacing in data[{self.spacing_key!r}]")
        raw = [float(s) for s in d[self.spacing_key]]
        spacing = [raw[a] for a in self.transpose_forward]
        present = [k for k in self.key_iterator(d)]
        if not present:
            return d
        shape = to_numpy(d[present[0]]).shape[1:]
        new_shape = compute_new_shape(shape, spacing, self.target_spacing)
        for key in present:
            arr = to_numpy(d[key])
            if self.orders[key] == 0:
                d[key] = resample_labels(arr, new_shape)
            else:
                d[key] = resample_image(arr, new_shape, order=self.orders[key])
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
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        schemes: Sequence[str],
        intensity_properties: Sequence[Mapping[str, float]],
        use_mask_for_norm: Sequence[bool],
        mask_key: str = MASK_KEY,
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

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = to_numpy(d[self.mask_key])[0].astype(bool) if self.mask_key in d else None
        for key in self.key_iterator(d):
            image = to_numpy(d[key])
            if image.shape[0] != len(self.schemes):
                raise ValueError(
                    f"image has {image.shape[0]} channels but the plan has {len(self.schemes)} modalities"
                )
            out = np.empty(image.shape, dtype=np.float32)
            for c in range(image.shape[0]):
                out[c] = normalize_channel(image[c], self.schemes[c], self.props[c], mask, self.use_mask[c])
            d[key] = out
        return d
