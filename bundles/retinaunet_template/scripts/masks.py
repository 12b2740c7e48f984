"""A mask per finding from Retina U-Net's segmentation head (``nndet_predict --masks``).

1. ``SegAccumulator``: while the tiles of a case are detected, the head's foreground probability of every
   tile (un-mirrored) is summed into one float32 array of the preprocessed case; its mean over tiles,
   mirrors and folds is the case's foreground probability. The tile coverage is separable (every member
   tiles the case the same way), so it is kept as one count vector per axis, not as a second volume.
2. ``finding_masks``: per kept box, the probability inside the box is resampled (trilinear, pixel-edge
   aligned as the preprocessing) to the original image's voxels of the restored box, thresholded, and the
   largest connected foreground component inside the box is the finding's mask. Masks are cropped to their
   boxes, so their memory is that of the boxes, not of the image.
3. ``save_masks`` / ``load_masks``: ``<case>_masks.npz`` (per finding its offset in original voxels and its
   bit-packed mask; no pickle); ``paint_masks`` makes an instance map of them (higher scores on top);
   ``dice`` scores a mask against a reference.

We wrote this ourselves: MONAI's detection inference keeps boxes only, and nnDetection 0.1 drops the
segmentation head's output at inference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MASK_THRESHOLD = 0.5
MASKS_SUFFIX = "_masks.npz"


class SegAccumulator:
    """Sum of tile foreground probabilities over a padded case (see module docstring, step 1).

    ``inference.predict_member_raw`` calls :meth:`start` with the case's tiling on its first member, then
    :meth:`add` per tile and :meth:`end_member` per member.
    """

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.members = 0

    def start(self, padded_shape: Sequence[int], lower: Sequence[int], shape: Sequence[int],
              starts: Sequence[Sequence[int]], patch_size: Sequence[int]) -> None:
        padded_shape = tuple(int(s) for s in padded_shape)
        if self.sum is not None:
            if self.sum.shape != padded_shape:
                raise ValueError(f"members tile different cases: {self.sum.shape} vs {padded_shape}")
            return
        self.sum = np.zeros(padded_shape, np.float32)
        self.lower, self.shape = [int(v) for v in lower], [int(v) for v in shape]
        self.patch_size = [int(p) for p in patch_size]
        # the tiles are the product of per-axis starts (inference.tile_starts): coverage = product of axis counts
        self.coverage = []
        for a, n in enumerate(self.sum.shape):
            c = np.zeros(n, np.float32)
            for st in sorted({int(s[a]) for s in starts}):
                c[st:st + self.patch_size[a]] += 1
            self.coverage.append(c)

    def add(self, prob: np.ndarray, start: Sequence[int]) -> None:
        """Add one tile's foreground probability ``[*patch]`` at its ``start`` in the padded case."""
        self.sum[tuple(slice(int(s), int(s) + p) for s, p in zip(start, self.patch_size, strict=True))] += prob

    def end_member(self) -> None:
        self.members += 1

    def probability(self) -> np.ndarray:
        """Mean foreground probability float32 ``[*shape]`` of the unpadded case (every member, every tile)."""
        if self.sum is None:
            raise ValueError("no tile was added: run inference with this accumulator first")
        region = tuple(slice(lo, lo + n) for lo, n in zip(self.lower, self.shape, strict=True))
        out = self.sum[region]  # divided in place: no second case-sized array (the sum is done with)
        for a, c in enumerate(self.coverage):
            view = [1] * len(self.shape)
            view[a] = -1
            out /= np.maximum(c[region[a]], 1e-6).reshape(view) * (max(self.members, 1) if a == 0 else 1)
        self.coverage = [np.ones_like(c) for c in self.coverage]  # a second call gives the same mean
        self.members = 1
        return out


def merge_probabilities(parts: Sequence[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.mean(np.stack(parts), axis=0)


@dataclass(frozen=True)
class FindingMask:
    """A finding's mask in the original image: ``mask`` bool ``[*box extent]`` at ``offset`` (voxels)."""

    offset: tuple[int, ...]
    mask: np.ndarray

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())

    def region(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.mask.shape, strict=True))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _pre_coords(orig_idx: np.ndarray, axis_raw: int, properties: Mapping[str, Any]) -> np.ndarray:
    """Preprocessed (transposed-axis) continuous index of original voxel centres along one raw axis."""
    lo = float(properties["crop_bbox"][axis_raw][0])
    crop = float(properties["shape_after_crop"][axis_raw])
    tf = [int(a) for a in properties["transpose_forward"]]
    pre_axis = tf.index(axis_raw)
    pre = float(properties["shape_after_resampling"][pre_axis])
    return (orig_idx - lo + 0.5) * (pre / crop) - 0.5


def finding_masks(prob: np.ndarray, boxes_original: np.ndarray, properties: Mapping[str, Any],
                  original_shape: Sequence[int], threshold: float = MASK_THRESHOLD) -> list[FindingMask]:
    """A mask per box (see module docstring, step 2).

    Args:
        prob: float ``[*preprocessed spatial]`` foreground probability (``SegAccumulator.probability``).
        boxes_original: ``[N, 2*dim]`` boxes in original voxels (``inference.restore_boxes``), half-open.
        properties: the case's preprocessing record (crop, transpose, shapes).
        original_shape: the original image's spatial shape.
    """
    from scipy.ndimage import map_coordinates

    dim = len(original_shape)
    tf = [int(a) for a in properties["transpose_forward"]]
    out = []
    for box in np.asarray(boxes_original, np.float64).reshape(-1, 2 * dim):
        lo = np.clip(np.floor(box[:dim]).astype(int), 0, original_shape)
        hi = np.clip(np.ceil(box[dim:]).astype(int), lo, original_shape)
        extent = tuple(int(v) for v in hi - lo)
        if min(extent, default=0) <= 0:
            out.append(FindingMask(tuple(int(v) for v in lo), np.zeros(extent, bool)))
            continue
        # per raw axis the preprocessed coordinate of each original voxel centre, then in preprocessed axis order
        axes_raw = [_pre_coords(np.arange(lo[a], hi[a], dtype=np.float64), a, properties) for a in range(dim)]
        grid = np.meshgrid(*[axes_raw[a] for a in tf], indexing="ij")
        values = map_coordinates(prob, grid, order=1, mode="nearest")  # [*extent in preprocessed axis order]
        values = np.transpose(values, np.argsort(tf))  # back to raw axis order
        mask = _largest_component(values >= threshold)
        out.append(FindingMask(tuple(int(v) for v in lo), mask))
    return out


def save_masks(masks: Sequence[FindingMask], path: str | os.PathLike, shape: Sequence[int]) -> Path:
    """``<case>_masks.npz``: ``offsets``/``extents`` [N, dim] int64, ``bits`` (all masks packed, C order),
    ``shape`` of the original image; atomic rename, no pickle."""
    path = Path(path)
    dim = len(shape)
    offsets = np.asarray([m.offset for m in masks], np.int64).reshape(-1, dim)
    extents = np.asarray([m.mask.shape for m in masks], np.int64).reshape(-1, dim)
    flat = np.concatenate([m.mask.ravel() for m in masks]) if masks else np.zeros(0, bool)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, offsets=offsets, extents=extents, bits=np.packbits(flat),
                                shape=np.asarray(shape, np.int64))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_masks(path: str | os.PathLike) -> tuple[list[FindingMask], tuple[int, ...]]:
    """(masks, original image shape) of a ``save_masks`` file."""
    with np.load(path, allow_pickle=False) as z:
        offsets, extents, shape = z["offsets"], z["extents"], tuple(int(s) for s in z["shape"])
        flat = np.unpackbits(z["bits"], count=int(np.prod(extents, axis=1).sum())).astype(bool)
    out, pos = [], 0
    for off, ext in zip(offsets, extents, strict=True):
        n = int(np.prod(ext))
        out.append(FindingMask(tuple(int(v) for v in off), flat[pos:pos + n].reshape(tuple(int(v) for v in ext))))
        pos += n
    return out, shape


def paint_masks(masks: Sequence[FindingMask], shape: Sequence[int], keep: Sequence[int] | None = None,
                scores: Sequence[float] | None = None, dtype=np.uint16) -> np.ndarray:
    """Instance map: finding ``keep[i]`` becomes instance ``i + 1``; overlaps go to the higher score."""
    keep = list(range(len(masks))) if keep is None else [int(k) for k in keep]
    order = range(len(keep)) if scores is None else np.argsort([scores[k] for k in keep], kind="stable")
    seg = np.zeros(tuple(int(s) for s in shape), dtype)
    for i in order:  # ascending score: the highest is painted last
        m = masks[keep[i]]
        view = seg[m.region()]
        view[m.mask] = i + 1
    return seg


def dice(mask: FindingMask, reference: np.ndarray) -> float:
    """Dice of a finding's mask with a full-size boolean ``reference`` (1.0 when both are empty)."""
    ref_in = reference[mask.region()]
    inter = float(np.logical_and(mask.mask, ref_in).sum())
    total = float(mask.mask.sum()) + float(reference.sum())
    return 1.0 if total == 0 else 2.0 * inter / total
