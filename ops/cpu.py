"""CPU backend (numpy): pairwise IoU/GIoU, NMS, class-wise NMS and WBC clustering.

Inputs here are already validated float32 arrays (see :mod:`ops.boxes` for the box mode, the corner
convention and the exact float32 formula). Greedy NMS (and WBC clustering, the same scan) has two exact
implementations, picked per call by a cost estimate; both give the kept set (and cluster heads) of the
dense/bitmask GPU algorithm, which evaluates the same float32 predicate on every pair:

* **blocked** (:func:`blocked_greedy`, the GPU algorithm's order of work): boxes are visited in score
  order in blocks of :data:`NMS_BLOCK`; a block's boxes are first tested against the boxes kept so far
  (dense tiles, kept boxes in rank order, rows dropped as soon as they are suppressed), then the
  block's survivors are resolved with their own small IoU matrix and a short scan. Cost <= ~N x K
  pair tests (K kept): the right method for detector output, where most candidates overlap a few
  objects.
* **edges** (:func:`suppression_edges` + :func:`greedy_heads`): a sweep over boxes sorted by ``x1``
  lists only the pairs that overlap on every axis (every other pair has IoU 0, which never exceeds a
  threshold >= 0), the float32 IoU is computed for those, and the greedy scan runs over the sparse
  "suppresses" graph. Cost ~ pairs overlapping in ``x``: the right method when almost nothing
  overlaps (K ~ N), where the blocked method would test ~N^2 / 2 pairs.

:func:`greedy` (``method="auto"``) starts with the blocked method and, after each block, projects its
total cost from the tests done so far; once that exceeds :data:`BLOCKED_BIAS` times the edge method's
predicted cost (:func:`edge_cost`: exact sweep size plus a sampled overlap count) it starts the edge
method from scratch. Sparse inputs switch after the first, small block (:data:`NMS_FIRST_BLOCK`
boxes); the work wasted before a later switch is bounded by the same budget.
"""

from __future__ import annotations

import numpy as np

from ops.boxes import giou_elementwise, iou_elementwise, rank_order

# rows per block of the x-sweep (dense block x window tests; bounds temporary memory)
SWEEP_BLOCK = 128
# rows per chunk of a dense IoU matrix
DENSE_CHUNK_ELEMS = 4_000_000
# boxes per score-order block of the blocked greedy scan; the first block is smaller (it is the probe
# the projected cost starts from, wasted when the edge method takes over)
NMS_BLOCK = 256
NMS_FIRST_BLOCK = 64
# pairs per IoU tile of the blocked scan (its float32 temporaries stay in cache; larger is slower)
NMS_TILE_PAIRS = 65_536
# edge-method cost model, in blocked pair tests: per pair of the x-sweep, per pair overlapping on every
# axis (gathered, IoU, sorted, scanned); boxes sampled to estimate the latter, and at most this many of
# their pairs tested
EDGE_COST_SWEEP = 1.0
EDGE_COST_OVERLAP = 8.0
EDGE_COST_SAMPLES = 32
EDGE_COST_PAIRS = 16_384
# switch to the edge method only when it is predicted this many times cheaper: the projection of the
# blocked cost overestimates dense inputs (their kept fraction falls as the scan goes on), and the
# blocked method's worst case (~N^2 / 2 pair tests) is far below the edge method's (N^2 / 2 gathered
# edges, sorted and scanned)
BLOCKED_BIAS = 2.0
# scan used when no method is given: "auto", "blocked" or "edges" (benchmarks set it to time one method
# through the public ops API; results are identical)
NMS_METHOD = "auto"


def box_iou(a: np.ndarray, b: np.ndarray, giou: bool = False) -> np.ndarray:
    """Dense IoU (or GIoU) matrix ``[N, M]`` float32 of float32 boxes ``a [N, 2D]``, ``b [M, 2D]``."""
    n, m = a.shape[0], b.shape[0]
    out = np.empty((n, m), np.float32)
    fn = giou_elementwise if giou else iou_elementwise
    rows = max(1, DENSE_CHUNK_ELEMS // max(m, 1))
    for s in range(0, n, rows):
        out[s : s + rows] = fn(a[s : s + rows, None, :], b[None, :, :])
    return out


def _x_sweep(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes sorted by ``x1``: ``(order, srt [2D, N] coordinates by row, end [N])``.

    ``end[i]`` is the first sorted position ``j`` with ``x1_j >= x2_i``: only ``i < j < end[i]`` can
    overlap sorted box ``i`` in x.
    """
    d = boxes.shape[1] // 2
    order = np.argsort(boxes[:, 0], kind="stable")
    srt = np.ascontiguousarray(boxes[order].T)  # [2D, N], x1 ascending
    end = np.searchsorted(srt[0], srt[d], side="left")
    return order, srt, end


def _candidate_chunks(boxes: np.ndarray, sweep=None):
    """Yield (i, j) index arrays (into ``boxes``) covering every pair whose boxes overlap on all axes.

    Boxes are swept in ``x1`` order in blocks of :data:`SWEEP_BLOCK` rows; each block is tested densely
    (contiguous broadcasts, no gathers) against the window of later boxes that can still overlap it in
    x. Each unordered pair appears at most once; pairs left out have an intersection of exactly 0.
    ``sweep`` is :func:`_x_sweep` of ``boxes`` when already computed.
    """
    n = boxes.shape[0]
    d = boxes.shape[1] // 2
    order, srt, end = _x_sweep(boxes) if sweep is None else sweep
    lo, hi = srt[:d], srt[d:]
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
    boxes: np.ndarray, ranks: np.ndarray, thr: np.float32, labels: np.ndarray | None = None, sweep=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs with ``IoU > thr`` (and equal labels), as edges between score ranks.

    Args:
        boxes: float32 ``[N, 2D]``.
        ranks: int64 ``[N]``, position of each box in score order.
        thr: IoU threshold (float32, >= 0).
        labels: optional ``[N]`` class ids; pairs of different classes are never edges.
        sweep: optional :func:`_x_sweep` of ``boxes`` (reused, not recomputed).

    Returns:
        ``(u, v, iou)`` with ``u < v`` score ranks, sorted by ``(u, v)``; iou float32.
    """
    us, vs, ious = [], [], []
    for i, j in _candidate_chunks(boxes, sweep):
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


def edge_cost(sweep: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
    """Predicted cost of the edge method on the swept boxes, in units of one blocked pair test.

    ``EDGE_COST_SWEEP`` x the pairs the x-sweep tests (exact) + ``EDGE_COST_OVERLAP`` x the pairs that
    overlap on every axis (estimated from the forward x-windows of :data:`EDGE_COST_SAMPLES` boxes
    spread over the x order, at most :data:`EDGE_COST_PAIRS` of their pairs, evenly strided).
    """
    order, srt, end = sweep
    n = order.size
    d = srt.shape[0] // 2
    starts = np.arange(0, n, SWEEP_BLOCK)
    rows = np.diff(np.append(starts, n))
    swept = float(np.sum(rows * np.maximum(np.maximum.reduceat(end, starts) - starts, 0)))
    lo, hi = srt[:d], srt[d:]
    sample = np.unique(np.linspace(0, n - 1, min(n, EDGE_COST_SAMPLES)).astype(np.int64))
    width = np.maximum(end[sample] - sample - 1, 0)  # forward x-window of each sampled box
    stop = np.cumsum(width)
    step = max(1, int(stop[-1]) // EDGE_COST_PAIRS)  # test every step-th pair of the sampled windows
    pair = np.arange(0, int(stop[-1]), step)
    which = np.searchsorted(stop, pair, side="right")
    row = sample[which]
    col = row + 1 + pair - (stop - width)[which]
    ok = np.ones(row.size, bool)
    for k in range(1, d):
        ok &= (lo[k, col] < hi[k, row]) & (lo[k, row] < hi[k, col])
    overlap = np.count_nonzero(ok) * step
    return EDGE_COST_SWEEP * swept + EDGE_COST_OVERLAP * overlap * n / sample.size


def _tile_hits(lo_a, hi_a, vol_a, lo_b, hi_b, vol_b, thr: np.float32) -> np.ndarray:
    """``[Na, Nb]`` bool: float32 IoU > ``thr`` of boxes given by coordinate rows ``lo/hi [D, n]``.

    The :mod:`ops.boxes` formula, operation for operation (volumes precomputed in the same order); where
    the intersection is 0 the quotient is 0 or NaN (0/0), neither of which is > ``thr`` >= 0, exactly
    like the formula's ``iou = 0`` branch. Callers silence the 0/0 warning (``np.errstate``).
    """
    inter = None
    for k in range(lo_a.shape[0]):
        w = np.minimum(hi_a[k][:, None], hi_b[k][None, :])
        w -= np.maximum(lo_a[k][:, None], lo_b[k][None, :])
        np.maximum(w, np.float32(0), out=w)
        if inter is None:
            inter = w
        else:
            inter *= w
    union = vol_a[:, None] + vol_b[None, :]
    union -= inter
    inter /= union
    return inter > thr


def blocked_greedy(
    boxes: np.ndarray, labels: np.ndarray | None, thr: np.float32, budget: float = np.inf,
    max_keep: int | None = None,
) -> np.ndarray | None:
    """Greedy scan over boxes already in score order, block by block (see the module docstring).

    Args:
        boxes: float32 ``[N, 2D]`` in rank order.
        labels: optional ``[N]`` class ids in rank order; boxes only suppress boxes of their class.
        thr: IoU threshold (float32, >= 0).
        budget: give up once the pair tests done plus those projected for the remaining boxes exceed
            this (the projection extrapolates the last block's tests per box and kept fraction).
        max_keep: stop after the block in which ``max_keep`` boxes are kept; later ranks get head -1.
            Exact for the first ``max_keep`` kept boxes: greedy NMS never revisits a decision.

    Returns:
        int64 ``[N]`` as :func:`greedy_heads` (per rank, the rank of the kept box that took it, itself
        if kept), or None when over budget.
    """
    n = boxes.shape[0]
    d = boxes.shape[1] // 2
    lo = np.ascontiguousarray(boxes[:, :d].T)
    hi = np.ascontiguousarray(boxes[:, d:].T)
    size = hi - lo
    vol = size[0].copy()
    for k in range(1, d):
        vol *= size[k]
    head = np.empty(n, np.int64)
    kept = np.empty(n, np.int64)  # ranks of the kept boxes, ascending
    klo, khi, kvol = np.empty((d, n), np.float32), np.empty((d, n), np.float32), np.empty(n, np.float32)
    klab = None if labels is None else np.empty(n, labels.dtype)
    k = 0  # boxes kept so far
    spent = 0.0  # pair tests so far
    with np.errstate(invalid="ignore", divide="ignore"):
        bounds = [0, *range(min(NMS_FIRST_BLOCK, n), n, NMS_BLOCK), n]
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            alive = np.arange(s, e)
            tests = 0
            # 1) suppression by earlier kept boxes: tiles of kept columns, in rank order, so the first
            #    hit is the head; suppressed rows leave before the next tile
            c0 = 0
            while c0 < k and alive.size:
                c1 = min(k, c0 + max(1, NMS_TILE_PAIRS // alive.size))
                hit = _tile_hits(
                    lo[:, alive], hi[:, alive], vol[alive], klo[:, c0:c1], khi[:, c0:c1], kvol[c0:c1], thr
                )
                if labels is not None:
                    hit &= labels[alive, None] == klab[None, c0:c1]
                tests += hit.size
                first = hit.argmax(1)
                sup = hit[np.arange(alive.size), first]
                head[alive[sup]] = kept[c0 + first[sup]]
                alive = alive[~sup]
                c0 = c1
            # 2) the block's survivors among themselves: their IoU matrix and a scan over its rows
            m = alive.size
            nk = 0
            if m:
                blo, bhi, bvol = lo[:, alive], hi[:, alive], vol[alive]
                hit = _tile_hits(blo, bhi, bvol, blo, bhi, bvol, thr)
                if labels is not None:
                    hit &= labels[alive, None] == labels[alive][None, :]
                tests += hit.size
                np.fill_diagonal(hit, False)  # a box never suppresses itself
                removed = np.zeros(m, bool)
                for i in np.flatnonzero(hit.any(1)).tolist():  # rows without hits are always kept
                    if not removed[i]:
                        removed |= hit[i]
                local = np.flatnonzero(~removed)
                # a removed box's head is the first kept row hitting it (the matrix is symmetric)
                head[alive] = alive[local[hit[local].argmax(0)]]
                head[alive[local]] = alive[local]
                nk = local.size
                kept[k : k + nk] = alive[local]
                klo[:, k : k + nk] = blo[:, local]
                khi[:, k : k + nk] = bhi[:, local]
                kvol[k : k + nk] = bvol[local]
                if labels is not None:
                    klab[k : k + nk] = labels[alive[local]]
                k += nk
            spent += tests
            if max_keep is not None and k >= max_keep:
                head[e:] = -1
                return head
            left = n - e
            rows = e - s
            if left and spent + left * tests / rows + left * left / 2 * nk / rows > budget:
                return None
    return head


def greedy(
    boxes: np.ndarray,
    keys: np.ndarray,
    thr: np.float32,
    labels: np.ndarray | None = None,
    method: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS / WBC clustering scan by float32 ``keys`` (descending, ties by lower index).

    Args:
        boxes: float32 ``[N, 2D]``.
        keys: float32 ``[N]`` rank keys.
        thr: IoU threshold (float32, >= 0).
        labels: optional ``[N]`` class ids (class-wise: exact, no coordinate offsets).
        method: ``"auto"`` (blocked, switching to edges when predicted cheaper), ``"blocked"`` or
            ``"edges"``; all three give identical results. Default: :data:`NMS_METHOD`.

    Returns:
        ``(order [N] int64, head [N] int64)``: score order, and per rank the rank of the kept box that
        took it (``head[r] == r`` for kept boxes).
    """
    method = NMS_METHOD if method is None else method
    if method not in ("auto", "blocked", "edges"):
        raise ValueError(f"method must be 'auto', 'blocked' or 'edges', got {method!r}")
    n = boxes.shape[0]
    order = rank_order(keys)
    bs = boxes[order]
    ls = None if labels is None else labels[order]
    sweep = None
    if method != "edges":
        budget = np.inf
        if method == "auto" and n > NMS_BLOCK:
            sweep = _x_sweep(bs)
            budget = BLOCKED_BIAS * edge_cost(sweep)
        head = blocked_greedy(bs, ls, thr, budget)
        if head is not None:
            return order, head
    u, v, _ = suppression_edges(bs, np.arange(n), thr, ls, sweep)
    return order, greedy_heads(n, u, v)


def nms(
    boxes: np.ndarray,
    keys: np.ndarray,
    thr: np.float32,
    labels: np.ndarray | None = None,
    method: str | None = None,
    max_keep: int | None = None,
) -> np.ndarray:
    """Greedy NMS on float32 boxes ranked by float32 ``keys`` -> kept indices (int64) in rank order.

    ``max_keep`` returns only the first ``max_keep`` kept boxes, identical to truncating the full result,
    and stops scanning once they are known (the blocked scan; a detector keeping 100 of 10,000 candidates
    per tile then tests a few hundred boxes instead of all of them).
    """
    if boxes.shape[0] == 0 or max_keep == 0:
        return np.zeros(0, np.int64)
    if max_keep is not None and (method or NMS_METHOD) != "edges":
        order = rank_order(keys)
        head = blocked_greedy(boxes[order], None if labels is None else labels[order], thr, max_keep=max_keep)
        return order[np.flatnonzero(head == np.arange(head.size))][:max_keep]
    order, head = greedy(boxes, keys, thr, labels, method)
    kept = order[np.flatnonzero(head == np.arange(head.size))]
    return kept if max_keep is None else kept[:max_keep]


def wbc_clusters(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, thr: np.float32, method: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Class-wise WBC clustering: score order and, per score rank, the rank of its cluster head.

    Returns:
        ``(order [N] int64, head [N] int64)``; ``head[r] == r`` for cluster heads.
    """
    return greedy(boxes, scores, thr, labels, method)
