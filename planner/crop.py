"""Crop to the nonzero region (nnU-Net / nnDetection rule), shared by fingerprint and preprocessing."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, holes filled. data: [C, *spatial] -> bool [*spatial]."""
    mask = np.any(data != 0, axis=0)
    return binary_fill_holes(mask)


def bbox_of_mask(mask: np.ndarray) -> list[list[int]]:
    """Tight half-open bbox [[lo, hi), ...] per axis of a boolean mask; the whole array if empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=other))
        box.append([int(idx[0]), int(idx[-1]) + 1] if idx.size else [0, int(mask.shape[axis])])
    return box


def crop_to_bbox(array: np.ndarray, bbox: list[list[int]]) -> np.ndarray:
    """Crop the trailing len(bbox) axes of ``array`` to ``bbox``."""
    lead = (slice(None),) * (array.ndim - len(bbox))
    return array[lead + tuple(slice(lo, hi) for lo, hi in bbox)]


def crop_case(data: np.ndarray, seg: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, list[list[int]]]:
    """Crop image [C, *spatial] (+ instance map) to the nonzero bbox.

    Label voxels outside the nonzero mask that were background are set to -1 (as nnDetection), so
    sampling and normalisation can tell outside-body from background.

    Returns:
        (cropped data, cropped seg or None, bbox as [[lo, hi), ...] in raw voxel indices)
    """
    mask = nonzero_mask(data)
    bbox = bbox_of_mask(mask)
    data_c = crop_to_bbox(data, bbox)
    seg_c = None
    if seg is not None:
        seg_c = crop_to_bbox(seg, bbox).copy()
        seg_c[(seg_c == 0) & ~crop_to_bbox(mask, bbox)] = -1
    return data_c, seg_c, bbox
