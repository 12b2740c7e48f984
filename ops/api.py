"""Public box ops: one signature each, numpy/CuPy backends picked by the input's array kind.

Box mode, corner convention, float32 arithmetic and tie rules: see :mod:`ops.boxes` (the one place
they are written down). Every op accepts numpy arrays, torch tensors (CPU or CUDA) or CuPy arrays and
returns the kind of its first box argument (torch: on the same device).
"""

from __future__ import annotations

from ops import cpu
from ops import wbc as _wbc
from ops.arrays import Backend, backend_of
from ops.boxes import box_dims, check_boxes, check_scores, check_threshold

__all__ = ["box_iou", "box_giou", "nms", "batched_nms", "weighted_nms", "wbc"]


def _impl(bk: Backend):
    if bk.gpu:
        from ops import cuda

        return cuda
    return cpu


def _pairwise(a, b, giou: bool):
    bk = backend_of(a)
    with bk.context():
        a_arr = check_boxes(bk.to_array(a), "boxes1")
        b_arr = check_boxes(bk.to_array(b), "boxes2")
        if a_arr.shape[1] != b_arr.shape[1]:
            raise ValueError(f"boxes1 and boxes2 must both be 2D or both 3D, got {a_arr.shape} and {b_arr.shape}")
        return bk.to_output(_impl(bk).box_iou(a_arr, b_arr, giou=giou))


def box_iou(boxes1, boxes2):
    """Pairwise IoU.

    Args:
        boxes1: ``[N, 4]`` or ``[N, 6]`` StandardMode boxes (half-open voxel corners, see ops.boxes).
        boxes2: ``[M, 4]`` or ``[M, 6]``, same dimensionality.

    Returns:
        float32 ``[N, M]`` IoU in [0, 1], same kind as ``boxes1``. Zero-size boxes give 0.
    """
    return _pairwise(boxes1, boxes2, giou=False)


def box_giou(boxes1, boxes2):
    """Pairwise generalised IoU (float32 ``[N, M]`` in [-1, 1]); shapes and kinds as :func:`box_iou`.

    Not differentiable (the detector's GIoU loss uses its own torch expression on matched pairs).
    """
    return _pairwise(boxes1, boxes2, giou=True)


def _prepare(bk: Backend, boxes, scores, labels=None, weights=None):
    b = check_boxes(bk.to_array(boxes))
    n = b.shape[0]
    s = check_scores(bk.to_array(scores), n)
    lab = None
    if labels is not None:
        lab = bk.to_array(labels)
        if tuple(lab.shape) != (n,):
            raise ValueError(f"labels must have shape [{n}] (one class id per box), got {tuple(lab.shape)}")
    w = None
    if weights is not None:
        w = bk.to_array(weights)
        if tuple(w.shape) != (n,):
            raise ValueError(f"weights must have shape [{n}] (one per box), got {tuple(w.shape)}")
        w = w.astype(bk.xp.float64)
        if not bool(bk.xp.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("weights must be finite and >= 0")
    return b, s, lab, w


def _max_keep(max_keep):
    if max_keep is None:
        return None
    if int(max_keep) < 0:
        raise ValueError(f"max_keep must be >= 0 or None, got {max_keep}")
    return int(max_keep)


def nms(boxes, scores, iou_threshold: float, max_keep: int | None = None):
    """Greedy non-maximum suppression.

    Boxes are visited by score (descending, ties by lower index, ranked in float32); a box is dropped
    when its IoU with an already kept box is ``> iou_threshold`` (strict).

    Args:
        boxes: ``[N, 4]`` / ``[N, 6]`` StandardMode boxes.
        scores: ``[N]`` scores (NaN raises ValueError).
        iou_threshold: >= 0.
        max_keep: return only the first ``max_keep`` kept boxes (the same as truncating the result; the
            CPU scan stops early).

    Returns:
        int64 ``[K]`` indices of kept boxes, by decreasing score; same kind as ``boxes``.
    """
    thr = check_threshold(iou_threshold)
    bk = backend_of(boxes)
    with bk.context():
        b, s, _, _ = _prepare(bk, boxes, scores)
        return bk.to_output(_impl(bk).nms(b, s, thr, max_keep=_max_keep(max_keep)))


def batched_nms(boxes, scores, labels, iou_threshold: float, max_keep: int | None = None):
    """Class-wise NMS: boxes suppress only boxes with the same label (exact; no coordinate offsets).

    Args:
        boxes: ``[N, 4]`` / ``[N, 6]`` StandardMode boxes.
        scores: ``[N]`` scores.
        labels: ``[N]`` integer class ids.
        iou_threshold: >= 0.
        max_keep: only the first ``max_keep`` kept boxes (see :func:`nms`).

    Returns:
        int64 ``[K]`` kept indices by decreasing score (all classes interleaved); same kind as ``boxes``.
    """
    thr = check_threshold(iou_threshold)
    bk = backend_of(boxes)
    with bk.context():
        b, s, lab, _ = _prepare(bk, boxes, scores, labels)
        return bk.to_output(_impl(bk).nms(b, s, thr, lab, max_keep=_max_keep(max_keep)))


def weighted_nms(boxes, scores, labels, weights, iou_threshold: float, max_keep: int | None = None):
    """nnDetection's per-model stage: class-wise NMS ranked by ``score * weight``.

    ``weights`` is the position weight of each box in its sliding-window tile (1 in the centre, down to
    0.5 at the corners, nnDetection's rule). The rank key is the float32 product ``score * weight``; the
    caller keeps the **original** scores of the returned boxes (``scores[keep]``), as nnDetection does.

    Args:
        boxes: ``[N, 4]`` / ``[N, 6]`` StandardMode boxes.
        scores: ``[N]`` scores.
        labels: ``[N]`` class ids, or None for class-agnostic NMS.
        weights: ``[N]`` weights >= 0.
        iou_threshold: >= 0 (nnDetection default 0.1).
        max_keep: only the first ``max_keep`` kept boxes (see :func:`nms`).

    Returns:
        int64 ``[K]`` kept indices, ordered by decreasing ``score * weight``; same kind as ``boxes``.
    """
    thr = check_threshold(iou_threshold)
    if weights is None:
        raise ValueError("weighted_nms needs weights [N]; use batched_nms without weights")
    bk = backend_of(boxes)
    with bk.context():
        b, s, lab, w = _prepare(bk, boxes, scores, labels, weights)
        key = s * w.astype(bk.xp.float32)
        return bk.to_output(_impl(bk).nms(b, key, thr, lab, max_keep=_max_keep(max_keep)))


def wbc(
    boxes,
    scores,
    labels,
    iou_threshold: float,
    n_exp_preds,
    score_threshold: float = 0.0,
    weights=None,
    missing_weight: float = 1.0,
):
    """Weighted box clustering per class (nnDetection's ``batched_wbc_ensemble``; see ops.wbc).

    Args:
        boxes: ``[N, 4]`` / ``[N, 6]`` StandardMode boxes from all ensemble members.
        scores: ``[N]`` scores.
        labels: ``[N]`` class ids; clusters never mix classes.
        iou_threshold: cluster members have ``IoU(head, box) > iou_threshold`` (nnDetection: 0.5).
        n_exp_preds: expected number of predictions per cluster (number of members x TTA), a scalar or
            ``[N]`` per box (the cluster uses the mean over its members).
        score_threshold: keep clusters whose consolidated score is ``> score_threshold``.
        weights: ``[N]`` per-box weights (default 1).
        missing_weight: weight of the missing-prediction damping (nnDetection: 1).

    Returns:
        ``(boxes [K, 2D], scores [K], labels [K])`` of the kept clusters ordered by their head's score
        (descending, ties by index); boxes/scores keep the input float dtype (float32 for integer
        input), labels the input dtype; same kind as ``boxes``.
    """
    thr = check_threshold(iou_threshold)
    if labels is None:
        raise ValueError("wbc needs labels [N] (use zeros for a single class)")
    bk = backend_of(boxes)
    xp = bk.xp
    out_dtype = _float_dtype(getattr(boxes, "dtype", None), xp)
    score_dtype = _float_dtype(getattr(scores, "dtype", None), xp)
    with bk.context():
        b, s, lab, w = _prepare(bk, boxes, scores, labels, weights)
        n, d = b.shape[0], box_dims(b.shape)
        nexp = bk.to_array(n_exp_preds).astype(xp.float64)
        if nexp.ndim == 0:
            nexp = xp.full(n, float(nexp), xp.float64)
        if tuple(nexp.shape) != (n,):
            raise ValueError(f"n_exp_preds must be a scalar or shape [{n}], got {tuple(nexp.shape)}")
        if n == 0:
            out = (xp.zeros((0, 2 * d), out_dtype), xp.zeros(0, score_dtype), lab[:0])
            return tuple(bk.to_output(x) for x in out)
        order, head = _impl(bk).wbc_clusters(b, s, lab, thr)
        w_s = xp.ones(n, xp.float64) if w is None else w[order]
        cb, cs, hr = _wbc.consolidate(
            b[order], s[order], w_s, nexp[order], head, missing_weight, score_threshold
        )
        out = (cb.astype(out_dtype), cs.astype(score_dtype), lab[order[hr]])
        return tuple(bk.to_output(x) for x in out)


def _float_dtype(dtype, xp):
    """numpy/CuPy float dtype matching a numpy or torch dtype (float32 unless float16/64 given)."""
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return {"float64": xp.float64, "float16": xp.float16}.get(name, xp.float32)

