"""Crop to the nonzero region (nnU-Net / nnDetection rule), shared by fingerprint and preprocessing."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (face connectivity), from one labelling of the background.

    A background voxel stays background exactly when its face-connected background component touches
    the array border (what the fill's dilation from the border reaches); one ``ndimage.label`` pass
    finds those components, instead of a dilation iterated until nothing changes.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0 or mask.all() or not mask.any():
        return mask.copy()
    labels, n = ndimage.label(~mask)
    outside = np.zeros(n + 1, dtype=bool)
    for axis in range(mask.ndim):
        for index in (0, -1):
            outside[np.take(labels, index, axis=axis)] = True
    outside[0] = False  # label 0: the mask itself
    return ~outside[labels]


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, holes filled. data: [C, *spatial] -> bool [*spatial]."""
    return fill_holes(np.any(data != 0, axis=0))


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
    sampling and normalisation can tell outside-body from background. Holes are filled on the cropped
    mask: filling only adds enclosed voxels (the bbox is that of the unfilled mask), and a background
    component touching the bbox faces is joined to the border through the background around the bbox,
    so the filled crop equals the crop of the filled mask.

    Returns:
        (cropped data, cropped seg or None, bbox as [[lo, hi), ...] in raw voxel indices)
    """
    nonzero = data[0] != 0
    for c in range(1, data.shape[0]):
        nonzero |= data[c] != 0
    bbox = bbox_of_mask(nonzero)
    # C-contiguous crops: NIfTI arrays arrive in Fortran order, and every later step (MONAI's tensor
    # conversion included) would otherwise make its own strided copy
    data_c = np.ascontiguousarray(crop_to_bbox(data, bbox))
    seg_c = None
    if seg is not None:
        seg_c = np.array(crop_to_bbox(seg, bbox), order="C")
        body = crop_to_bbox(nonzero, bbox)
        if not body.all():
            seg_c[(seg_c == 0) & ~fill_holes(body)] = -1
    return data_c, seg_c, bbox
