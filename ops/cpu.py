"""CPU backend (numpy): pairwise IoU/GIoU, NMS, class-wise NMS and WBC clustering.

Inputs here are already validated float32 arrays (see :mod:`ops.boxes` for the box mode, the corner
convention and the exact float32 formula). NMS does not build the dense N x N IoU matrix: a sweep over
boxes sorted by ``x1`` lists only the pairs that overlap on every axis (every other pair has IoU 0,
which never exceeds a threshold >= 0), and the exact float32 IoU is computed for those. The greedy scan then runs over the sparse "suppresses" graph in score order,
one vectorised step per box that suppresses something. Kept sets are therefore identical to the
dense/bitmask GPU algorithm, which evaluates the same predicate on every pair.
"""

from __future__ import annotations

import numpy as np

from ops.boxes import giou_elementwise, iou_elementwise, rank_order

# rows per block of the x-sweep (dense block x window tests; bounds temporary memory)
SWEEP_BLOCK = 128
# rows per chunk of a dense IoU matrix
DENSE_CHUNK_ELEMS = 4_000_000


def box_iou(a: np.ndarray, b: np.ndarray, giou: bool = False) -> np.ndarray:
    """Dense IoU (or GIoU) matrix ``[N, M]`` float32 of float32 boxes ``a [N, 2D]``, ``b [M, 2D]``."""
    n, m = a.shape[0], b.shape[0]
    out = np.empty((n, m), np.float32)
    fn = giou_elementwise if giou else iou_elementwise
    rows = max(1, DENSE_CHUNK_ELEMS // max(m, 1))
    for s in range(0, n, rows):
        out[s : s + rows] = fn(a[s : s + rows, None, :], b[None, :, :])
    return out


def _candidate_chunks(boxes: np.ndarray):
    """Yield (i, j) index arrays (into ``boxes``) covering every pair whose boxes overlap on all axes.

    Boxes are swept in ``x1`` order in blocks of :data:`SWEEP_BLOCK` rows; each block is tested densely
    (contiguous broadcasts, no gathers) against the window of later boxes that can still overlap it in
    x. Each unordered pair appears at most once; pairs left out have an intersection of exactly 0.
    """
    n = boxes.shape[0]
    d = boxes.shape[1] // 2
    order = np.argsort(boxes[:, 0], kind="stable")
    srt = np.ascontiguousarray(boxes[order].T)  # [2D, N], x1 ascending
    lo, hi = srt[:d], srt[d:]
    end = np.searchsorted(lo[0], hi[0], side="left")  # first j with x1_j >= x2_i
    tri = np.triu(np.ones((SWEEP_BLOCK, SWEEP_BLOCK), bool), k=1)
    for s in range(0, n, SWEEP_BLOCK):
        e = min(s + SWEEP_BLOCK, n)
        w_end = int(end[s:e].max())
        if w_end <= s + 1:
            continue
        ok = lo[0, None, s:w_end] < hi[0, s:e, None]
        for k in range(1, d):
            ok &= lo[k, None, s:w_end] < hi[k, s:e, None]
            ok &= lo[k, s:e, None] < hi[k, None, s:w_end]
        m = min(e, w_end) - s
        ok[:, :m] &= tri[: e - s, :m]
        ii, jj = np.nonzero(ok)
        if ii.size:
            yield order[ii + s], order[jj + s]


def suppression_edges(
    boxes: np.ndarray, ranks: np.ndarray, thr: np.float32, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs with ``IoU > thr`` (and equal labels), as edges between score ranks.

    Args:
        boxes: float32 ``[N, 2D]``.
        ranks: int64 ``[N]``, position of each box in score order.
        thr: IoU threshold (float32, >= 0).
        labels: optional ``[N]`` class ids; pairs of different classes are never edges.

    Returns:
        ``(u, v, iou)`` with ``u < v`` score ranks, sorted by ``(u, v)``; iou float32.
    """
    us, vs, ious = [], [], []
    for i, j in _candidate_chunks(boxes):
        if labels is not None:
            same = labels[i] == labels[j]
            i, j = i[same], j[same]
        iou = iou_elementwise(boxes[i], boxes[j])
        hit = iou > thr
        ri, rj = ranks[i[hit]], ranks[j[hit]]
        us.append(np.minimum(ri, rj))
        vs.append(np.maximum(ri, rj))
        ious.append(iou[hit])
    if not us:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.float32)
    u, v, iou = np.concatenate(us), np.concatenate(vs), np.concatenate(ious)
    srt = np.lexsort((v, u))
    return u[srt], v[srt], iou[srt]


def greedy_heads(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Greedy scan in score order over edges ``u -> v`` (u suppresses v if u is kept).

    Returns:
        int64 ``[n]``: for each score rank, the rank of the kept box that took it (itself if kept).
    """
    head = np.full(n, -1, np.int64)
    if u.size:
        starts = np.searchsorted(u, np.arange(n + 1))
        for r in np.unique(u).tolist():
            if head[r] >= 0:
                continue
            head[r] = r
            nb = v[starts[r] : starts[r + 1]]
            nb = nb[head[nb] < 0]
            head[nb] = r
    free = head < 0
    head[free] = np.flatnonzero(free)
    return head


def nms(
    boxes: np.ndarray, keys: np.ndarray, thr: np.float32, labels: np.ndarray | None = None
) -> np.ndarray:
    """Greedy NMS on float32 boxes ranked by float32 ``keys`` -> kept indices (int64) in rank order."""
    n = boxes.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    order = rank_order(keys)
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n)
    u, v, _ = suppression_edges(boxes, ranks, thr, labels)
    head = greedy_heads(n, u, v)
    return order[np.flatnonzero(head == np.arange(n))]


def wbc_clusters(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, thr: np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Class-wise WBC clustering: score order and, per score rank, the rank of its cluster head.

    Returns:
        ``(order [N] int64, head [N] int64)``; ``head[r] == r`` for cluster heads.
    """
    n = boxes.shape[0]
    order = rank_order(scores)
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n)
    u, v, _ = suppression_edges(boxes, ranks, thr, labels)
    return order, greedy_heads(n, u, v)
