"""Crop to the nonzero region (nnU-Net / nnDetection rule), shared by fingerprint and preprocessing."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# ``fill_holes`` labels the background in slabs of about this many voxels (int32 labels, 4 bytes each):
# a whole-volume labelling of a 512x512x600 CT was 600 MiB on top of the masks
FILL_SLAB_VOXELS = 2**24


def fill_holes(mask: np.ndarray, slab_voxels: int = FILL_SLAB_VOXELS) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (face connectivity), from one labelling of the background.

    A background voxel stays background exactly when its face-connected background component touches
    the array border (what the fill's dilation from the border reaches); ``ndimage.label`` finds those
    components, instead of a dilation iterated until nothing changes. Past ``slab_voxels`` the
    background is labelled in slabs along axis 0 (int32 labels of one slab at a time, not of the whole
    volume): components that meet across a slab face are joined as a graph
    (``scipy.sparse.csgraph.connected_components``), then each slab is labelled again to write its part.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0 or mask.all() or not mask.any():
        return mask.copy()
    rows = max(1, int(slab_voxels) // max(1, mask[0].size))
    if rows >= mask.shape[0]:
        labels, n = ndimage.label(~mask)
        return ~_border_labels(labels, n, (True, True))[labels]
    return _fill_holes_slabs(mask, rows)


def _border_labels(labels: np.ndarray, n: int, ends: tuple[bool, bool]) -> np.ndarray:
    """bool [n + 1]: which labels occur on the array border (axis-0 faces only where ``ends`` says)."""
    touch = np.zeros(n + 1, dtype=bool)
    for axis in range(labels.ndim):
        for index, end in ((0, ends[0]), (-1, ends[1])):
            if axis > 0 or end:
                touch[np.take(labels, index, axis=axis)] = True
    touch[0] = False  # label 0: the mask itself
    return touch


def _fill_holes_slabs(mask: np.ndarray, rows: int) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n0 = mask.shape[0]
    spans = [(a, min(n0, a + rows)) for a in range(0, n0, rows)]

    def label(k: int) -> tuple[np.ndarray, int]:
        a, b = spans[k]
        labels, n = ndimage.label(~mask[a:b])
        return labels, n

    offsets, touching, faces, total = [], [], [], 0
    for k in range(len(spans)):
        labels, n = label(k)
        offsets.append(total)
        touching.append(np.flatnonzero(_border_labels(labels, n, (k == 0, k == len(spans) - 1))) + total)
        first, last = labels[0].astype(np.int64), labels[-1].astype(np.int64)
        faces.append((np.where(first > 0, first + total, 0), np.where(last > 0, last + total, 0)))
        total += n
        del labels
    # graph over all slabs' labels (0: the mask): an edge where two components meet across a slab face
    src, dst = [], []
    for k in range(len(spans) - 1):
        u, v = faces[k][1], faces[k + 1][0]
        both = (u > 0) & (v > 0)
        src.append(u[both])
        dst.append(v[both])
    src_a, dst_a = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(src_a.size, dtype=np.int8), (src_a, dst_a)), shape=(total + 1, total + 1))
    _, component = connected_components(graph, directed=False)
    outside_component = np.zeros(int(component.max()) + 1, dtype=bool)
    outside_component[component[np.concatenate(touching)]] = True
    outside = outside_component[component]
    outside[0] = False
    out = np.empty(mask.shape, dtype=bool)
    for k, (a, b) in enumerate(spans):
        labels, _ = label(k)
        if offsets[k]:
            np.add(labels, offsets[k], out=labels, where=labels > 0)
        np.logical_not(outside[labels], out=out[a:b])
        del labels
    return out


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


def crop_case(data: np.ndarray, seg: np.ndarray | None,
              seg_in_place: bool = False) -> tuple[np.ndarray, np.ndarray | None, list[list[int]]]:
    """Crop image [C, *spatial] (+ instance map) to the nonzero bbox.

    The crops are C-contiguous; a crop that is already C-contiguous in its input (the whole array, say)
    is a view of it, not a copy (whole-case memory in the preprocessing worker): results may share
    memory with the inputs. Label voxels outside the nonzero mask that were background are set to -1
    (as nnDetection), so sampling and normalisation can tell outside-body from background. Holes are
    filled on the cropped mask: filling only adds enclosed voxels (the bbox is that of the unfilled
    mask), and a background component touching the bbox faces is joined to the border through the
    background around the bbox, so the filled crop equals the crop of the filled mask.

    ``seg_in_place``: the -1 marks may be written into ``seg`` itself where its crop is C-contiguous in it
    (the caller gives the map away: no second whole label map in memory); otherwise ``seg`` is never written.

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
        body = crop_to_bbox(nonzero, bbox)
        if body.all():  # nothing to mark: the crop itself (no copy when it is the whole C-ordered map)
            seg_c = np.ascontiguousarray(crop_to_bbox(seg, bbox))
        else:
            seg_c = np.ascontiguousarray(crop_to_bbox(seg, bbox))
            if not (seg_in_place and seg_c.flags.writeable) and np.shares_memory(seg_c, seg):
                seg_c = seg_c.copy()
            outside = fill_holes(body)
            del body, nonzero  # the whole-scan mask is not needed any more
            np.logical_not(outside, out=outside)
            step = max(1, FILL_SLAB_VOXELS // max(1, int(np.prod(outside.shape[1:]))))  # no whole-map temporary
            for a in range(0, outside.shape[0], step):
                o, sc = outside[a:a + step], seg_c[a:a + step]
                o &= sc == 0
                sc[o] = -1
            del outside
    return data_c, seg_c, bbox
