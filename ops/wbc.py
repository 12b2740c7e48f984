"""Weighted box clustering (WBC) consolidation, shared by the numpy and CUDA backends.

Definition (nnDetection's ``batched_wbc`` in ``nndet/inference/detection/wbc.py``), applied per class:
rank boxes by score; repeat: take the highest remaining box ``h`` (the head); its cluster is every
remaining box of the same class with ``IoU(h, .) > iou_threshold``, the head included; with member
weights ``m_i = w_i * IoU(h, b_i)``::

    box       = sum(m_i * s_i * b_i) / sum(m_i * s_i)
    n_missing = max(0, mean(n_exp_preds over members) - cluster size)
    score     = sum(m_i * s_i) / (sum(m_i) + n_missing * mean(m_i) * missing_weight)

and the cluster is kept if ``score > score_threshold``; its members leave the pool.

Our definitions where nnDetection's arithmetic is undefined (documented, tested):
* the head's own IoU is 1 (also for a zero-size head, whose IoU with itself is 0 by the convention in
  :mod:`ops.boxes`): a zero-size box forms a singleton cluster and never joins another;
* if ``sum(m_i * s_i) == 0`` (all weights or scores 0) the box is the head box; if the denominator is
  0 the score is 0.

Clustering (who joins which head) is decided with the float32 IoU predicate and is identical on both
backends; the sums run in float64 (order of summation may differ on the GPU: values agree to ~1e-12).
"""

from __future__ import annotations

from ops.boxes import array_module, iou_elementwise


def consolidate(
    boxes_s,
    scores_s,
    weights_s,
    nexp_s,
    head,
    missing_weight: float,
    score_threshold: float,
):
    """Consolidate clusters given in rank order.

    Args:
        boxes_s: float32 ``[N, 2D]`` boxes sorted by rank (StandardMode).
        scores_s: float32 ``[N]`` scores in rank order.
        weights_s: float64 ``[N]`` weights in rank order.
        nexp_s: float64 ``[N]`` expected predictions per box in rank order.
        head: int64 ``[N]``: rank of the cluster head of each rank (``head[r] == r`` for heads).
        missing_weight: weight of the missing-prediction damping.
        score_threshold: keep clusters with consolidated score strictly above it.

    Returns:
        ``(boxes [K, 2D] float64, scores [K] float64, head_ranks [K] int64)`` of the kept clusters,
        in rank order of their heads.
    """
    xp = array_module(boxes_s)
    n = head.shape[0]
    heads = xp.flatnonzero(head == xp.arange(n))
    k = int(heads.size)
    cid = xp.empty(n, xp.int64)
    cid[heads] = xp.arange(k)
    c = cid[head]
    iou = iou_elementwise(boxes_s, boxes_s[head]).astype(xp.float64)
    iou[heads] = 1.0
    m = weights_s * iou
    ms = m * scores_s.astype(xp.float64)
    size = xp.bincount(c, minlength=k).astype(xp.float64)
    sum_m = xp.bincount(c, weights=m, minlength=k)
    sum_ms = xp.bincount(c, weights=ms, minlength=k)
    mean_nexp = xp.bincount(c, weights=nexp_s, minlength=k) / size
    n_missing = xp.maximum(mean_nexp - size, 0.0)
    den = sum_m + n_missing * (sum_m / size) * float(missing_weight)
    score = xp.where(den > 0, sum_ms / xp.where(den > 0, den, 1.0), 0.0)
    b64 = boxes_s.astype(xp.float64)
    cols = [xp.bincount(c, weights=ms * b64[:, j], minlength=k) for j in range(boxes_s.shape[1])]
    box = xp.stack(cols, axis=1)
    ok = sum_ms > 0
    box = xp.where(ok[:, None], box / xp.where(ok, sum_ms, 1.0)[:, None], b64[heads])
    keep = score > float(score_threshold)
    return box[keep], score[keep], heads[keep]
