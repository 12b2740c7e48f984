"""NMS, class-wise NMS and weighted NMS: MONAI agreement, a dense reference, edge cases, kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from monai.data.box_utils import non_max_suppression as monai_nms

import ops
from tests.ops import box_sets, pair_iou64, random_boxes


def dense_reference_nms(boxes, scores, thr, labels=None):
    """Textbook greedy NMS over the float32 IoU matrix (stable ties), used as the oracle."""
    order = np.argsort(-scores.astype(np.float32), kind="stable")
    iou = ops.box_iou(boxes, boxes)
    alive = np.ones(len(boxes), bool)
    keep = []
    for i in order:
        if not alive[i]:
            continue
        keep.append(i)
        hit = iou[i] > np.float32(thr)
        if labels is not None:
            hit &= labels == labels[i]
        alive &= ~hit
    return np.array(keep, np.int64)


def far_from_threshold(boxes, thr, eps=1e-5):
    return all(abs(pair_iou64(a, b) - thr) > eps for i, a in enumerate(boxes) for b in boxes[i + 1 :])


@settings(max_examples=80, deadline=None)
@given(box_sets(), __import__("hypothesis").strategies.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7]))
def test_nms_agrees_with_monai(data, thr):
    boxes, scores = data
    assume(far_from_threshold(boxes, thr))
    ours = ops.nms(boxes, scores, thr)
    ref = monai_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr)
    np.testing.assert_array_equal(ours, ref.numpy())
    assert ours.dtype == np.int64


def dense_reference_heads(boxes, scores, thr, labels=None):
    """Greedy clustering over the float32 IoU matrix: per score rank, the rank of the kept box taking it."""
    order = np.argsort(-scores.astype(np.float32), kind="stable")
    iou = ops.box_iou(boxes, boxes)[np.ix_(order, order)]
    same = np.ones_like(iou, bool) if labels is None else labels[order][:, None] == labels[order][None, :]
    head = np.full(len(boxes), -1, np.int64)
    for r in range(len(boxes)):
        if head[r] < 0:
            hit = (iou[r] > np.float32(thr)) & same[r] & (head < 0)
            hit[r] = True
            head[hit] = r
    return order, head


METHODS = ("auto", "blocked", "edges")  # "edges": the previous (sweep + edge list) implementation


def cpu_nms_all_methods(boxes, scores, thr, labels=None):
    """ops.cpu.nms with every method on validated inputs; asserts they agree and returns the result."""
    from ops import cpu

    b = np.ascontiguousarray(boxes, np.float32)
    keys = np.asarray(scores, np.float32)
    out = [cpu.nms(b, keys, np.float32(thr), labels, method=m) for m in METHODS]
    for m, o in zip(METHODS[1:], out[1:], strict=True):
        np.testing.assert_array_equal(o, out[0], err_msg=f"method {m} differs from auto")
    return out[0]


def jittered_copies(rng, n, dim, n_objects=4, jitter=1.0, quantum=0.5):
    """Detector-like candidates: ``n`` jittered copies of a few boxes (most pairs overlap), coordinates on
    a ``quantum`` grid so duplicates and exact IoU ties occur; scores with many ties."""
    lo = rng.uniform(0, 40, (n_objects, dim))
    size = rng.uniform(8, 16, (n_objects, dim))
    obj = rng.integers(0, n_objects, n)
    c_lo = lo[obj] + rng.normal(0, jitter, (n, dim))
    c_hi = c_lo + size[obj] * rng.uniform(0.8, 1.25, (n, dim))
    boxes = np.round(np.concatenate([c_lo, c_hi], 1) / quantum) * quantum
    scores = rng.integers(0, 50, n).astype(np.float32) / 50  # many ties
    return boxes.astype(np.float32), scores


@pytest.mark.parametrize("dim", [2, 3])
def test_nms_matches_dense_reference_across_chunks(monkeypatch, dim):
    from ops import cpu

    rng = np.random.default_rng(dim)
    boxes = random_boxes(rng, 600, dim, extent=60)
    scores = rng.integers(0, 20, 600).astype(np.float32)  # many ties
    for thr in (0.0, 0.2, 0.5):
        expected = dense_reference_nms(boxes, scores, thr)
        np.testing.assert_array_equal(ops.nms(boxes, scores, thr), expected)
        np.testing.assert_array_equal(cpu_nms_all_methods(boxes, scores, thr), expected)
        monkeypatch.setattr(cpu, "SWEEP_BLOCK", 7)  # many small sweep blocks
        monkeypatch.setattr(cpu, "NMS_BLOCK", 13)  # many small score blocks ...
        monkeypatch.setattr(cpu, "NMS_TILE_PAIRS", 40)  # ... and kept-box tiles of a few columns
        np.testing.assert_array_equal(cpu_nms_all_methods(boxes, scores, thr), expected)
        monkeypatch.undo()


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.6, 0.9])
def test_nms_dense_overlaps_match_reference(dim, thr):
    # 3,000 candidates around 4 objects: IoU > thr for a large share of all pairs (the detector case)
    rng = np.random.default_rng(10 * dim + int(thr * 10))
    boxes, scores = jittered_copies(rng, 3000, dim)
    expected = dense_reference_nms(boxes, scores, thr)
    assert len(expected) < 3000
    np.testing.assert_array_equal(ops.nms(boxes, scores, thr), expected)
    np.testing.assert_array_equal(cpu_nms_all_methods(boxes, scores, thr), expected)
    labels = rng.integers(0, 3, 3000)
    expected_cw = dense_reference_nms(boxes, scores, thr, labels)
    np.testing.assert_array_equal(ops.batched_nms(boxes, scores, labels, thr), expected_cw)
    np.testing.assert_array_equal(cpu_nms_all_methods(boxes, scores, thr, labels), expected_cw)
    w = rng.uniform(0.5, 1, 3000)
    key = scores * w.astype(np.float32)
    np.testing.assert_array_equal(
        ops.weighted_nms(boxes, scores, labels, w, thr), dense_reference_nms(boxes, key, thr, labels)
    )


@pytest.mark.parametrize("dim", [2, 3])
def test_dense_overlaps_with_duplicates_and_zero_size(monkeypatch, dim):
    from ops import cpu

    rng = np.random.default_rng(30 + dim)
    boxes, scores = jittered_copies(rng, 1500, dim, n_objects=2, jitter=0.5)
    boxes[::7] = boxes[3]  # exact duplicates (IoU 1) with tied and untied scores
    flat = rng.choice(1500, 100, replace=False)
    boxes[flat, dim] = boxes[flat, 0]  # zero-size boxes: never suppress, never suppressed
    labels = rng.integers(0, 2, 1500)
    for thr in (0.0, 0.5):
        expected = dense_reference_nms(boxes, scores, thr, labels)
        assert np.isin(flat, expected).all()
        np.testing.assert_array_equal(cpu_nms_all_methods(boxes, scores, thr, labels), expected)
        monkeypatch.setattr(cpu, "NMS_BLOCK", 31)
        monkeypatch.setattr(cpu, "NMS_TILE_PAIRS", 100)
        np.testing.assert_array_equal(cpu_nms_all_methods(boxes, scores, thr, labels), expected)
        monkeypatch.undo()


@pytest.mark.parametrize("dim", [2, 3])
def test_cluster_heads_agree_across_methods(dim):
    # WBC uses the same scan: every box's head (first kept box taking it) must agree, not only the kept set
    from ops import cpu

    rng = np.random.default_rng(40 + dim)
    sparse = (random_boxes(rng, 2000, dim, extent=90), rng.random(2000))
    for boxes, scores in (jittered_copies(rng, 2000, dim), sparse):
        labels = rng.integers(0, 2, len(boxes))
        scores = scores.astype(np.float32)
        order, head = dense_reference_heads(boxes, scores, 0.5, labels)
        for m in METHODS:
            o, h = cpu.wbc_clusters(boxes, scores, labels, np.float32(0.5), method=m)
            np.testing.assert_array_equal(o, order)
            np.testing.assert_array_equal(h, head, err_msg=m)


def test_auto_method_picks_blocked_for_dense_and_edges_for_sparse(monkeypatch):
    # guards the cost switch: dense candidates must not build the ~N^2 / 2 edge list, sparse boxes
    # (nearly all kept) must not pay ~N^2 / 2 blocked pair tests; results are identical either way
    from ops import cpu

    calls = []
    edges = cpu.suppression_edges
    monkeypatch.setattr(cpu, "suppression_edges", lambda *a, **k: calls.append(1) or edges(*a, **k))
    rng = np.random.default_rng(50)
    boxes, scores = jittered_copies(rng, 3000, 3)
    cpu.nms(boxes, scores, np.float32(0.5))
    assert not calls
    boxes = random_boxes(rng, 3000, 3)  # 256^3 volume, sides 4..40: almost nothing overlaps
    scores = rng.random(3000).astype(np.float32)
    keep = cpu.nms(boxes, scores, np.float32(0.5))
    assert calls and len(keep) > 2900
    np.testing.assert_array_equal(keep, cpu.nms(boxes, scores, np.float32(0.5), method="blocked"))
    with pytest.raises(ValueError, match="method"):
        cpu.nms(boxes, scores, np.float32(0.5), method="dense")


@settings(max_examples=60, deadline=None)
@given(box_sets(max_n=60), __import__("hypothesis").strategies.sampled_from([0.0, 0.3, 0.7]))
def test_blocked_scan_small_blocks_matches_reference(data, thr):
    from ops import cpu

    boxes, scores = data
    labels = np.random.default_rng(len(boxes)).integers(0, 2, len(boxes))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "NMS_BLOCK", 4)
        mp.setattr(cpu, "NMS_TILE_PAIRS", 6)
        for lab in (None, labels):
            expected = dense_reference_nms(boxes, scores, thr, lab)
            np.testing.assert_array_equal(cpu_nms_all_methods(boxes, scores, thr, lab), expected)


def test_ties_keep_lower_index():
    b = np.array([[0, 0, 10, 10]] * 3 + [[20, 20, 30, 30]] * 2, np.float32)
    s = np.array([0.5, 0.5, 0.5, 0.7, 0.7], np.float32)
    np.testing.assert_array_equal(ops.nms(b, s, 0.5), [3, 0])
    np.testing.assert_array_equal(ops.nms(b, np.zeros(5), 0.5), [0, 3])


def test_threshold_is_strict():
    a = np.array([[0, 0, 2, 1], [1, 0, 3, 1]], np.float32)  # IoU exactly 1/3
    s = np.array([0.9, 0.8], np.float32)
    assert len(ops.nms(a, s, 1 / 3)) == 2 and len(ops.nms(a, s, 0.33)) == 1
    b = np.array([[0, 0, 4, 4], [0, 0, 4, 2]], np.float32)  # IoU exactly 0.5
    assert len(ops.nms(b, s, 0.5)) == 2 and len(ops.nms(b, s, 0.4999)) == 1


def test_empty_one_and_zero_size():
    assert ops.nms(np.zeros((0, 6)), np.zeros(0), 0.5).shape == (0,)
    assert ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    np.testing.assert_array_equal(ops.nms(np.array([[0, 0, 0, 1, 1, 1]]), np.array([0.3]), 0.5), [0])
    # zero-size boxes never suppress or get suppressed, even at threshold 0 and when identical
    b = np.array([[2, 2, 2, 2], [2, 2, 2, 2], [0, 0, 5, 5], [1, 1, 3, 1]], np.float32)
    s = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    np.testing.assert_array_equal(ops.nms(b, s, 0.0), [3, 0, 1, 2])


def test_nan_scores_and_bad_threshold_raise():
    b = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.float32)
    with pytest.raises(ValueError, match="scores contain NaN"):
        ops.nms(b, np.array([0.1, np.nan]), 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        ops.nms(b, np.array([0.1, 0.2]), -0.1)
    with pytest.raises(ValueError, match="shape"):
        ops.nms(b, np.array([0.1]), 0.5)


def test_mixed_dtypes_and_kinds():
    rng = np.random.default_rng(5)
    b = random_boxes(rng, 300, 3, extent=80)
    s = rng.random(300).astype(np.float32)
    ref = ops.nms(b, s, 0.2)
    out = ops.nms(torch.from_numpy(b).double(), torch.from_numpy(s).half().float(), 0.2)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64
    np.testing.assert_array_equal(ops.nms(b.astype(np.float64), s.astype(np.float64), 0.2), ref)
    np.testing.assert_array_equal(ops.nms(b.tolist(), s.tolist(), 0.2), ref)
    np.testing.assert_array_equal(ops.nms(torch.from_numpy(b), s, 0.2).numpy(), ref)


@settings(max_examples=40, deadline=None)
@given(box_sets(max_n=60))
def test_batched_nms_is_per_class_nms(data):
    boxes, scores = data
    labels = np.random.default_rng(len(boxes)).integers(0, 3, len(boxes))
    keep = ops.batched_nms(boxes, scores, labels, 0.3)
    np.testing.assert_array_equal(keep, dense_reference_nms(boxes, scores, 0.3, labels))
    for c in range(3):
        idx = np.flatnonzero(labels == c)
        per_class = idx[ops.nms(boxes[idx], scores[idx], 0.3)]
        np.testing.assert_array_equal(keep[labels[keep] == c], per_class)


def test_batched_nms_exact_on_huge_coordinates():
    # the coordinate-offset trick would lose these in float32; we never shift boxes
    b = np.array([[1e6, 1e6, 1e6 + 1, 1e6 + 1], [1e6, 1e6, 1e6 + 1, 1e6 + 1.5]], np.float32)
    s = np.array([0.9, 0.8], np.float32)
    np.testing.assert_array_equal(ops.batched_nms(b, s, np.array([0, 1]), 0.5), [0, 1])
    np.testing.assert_array_equal(ops.batched_nms(b, s, np.array([7, 7]), 0.5), [0])


def test_weighted_nms_ranks_by_score_times_weight():
    b = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    s = np.array([0.9, 0.8, 0.5], np.float32)
    w = np.array([0.5, 1.0, 1.0])
    np.testing.assert_array_equal(ops.weighted_nms(b, s, None, w, 0.1), [1, 2])
    np.testing.assert_array_equal(ops.weighted_nms(b, s, np.array([0, 1, 0]), w, 0.1), [1, 2, 0])
    rng = np.random.default_rng(6)
    bb = random_boxes(rng, 400, 3, extent=70)
    ss, ww, ll = rng.random(400), rng.uniform(0.5, 1, 400), rng.integers(0, 2, 400)
    key = ss.astype(np.float32) * ww.astype(np.float32)
    np.testing.assert_array_equal(ops.weighted_nms(bb, ss, ll, ww, 0.1), dense_reference_nms(bb, key, 0.1, ll))
    with pytest.raises(ValueError, match="weights"):
        ops.weighted_nms(b, s, None, np.array([1.0, -1.0, 1.0]), 0.1)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dense", [True, False])
def test_max_keep_equals_truncating_the_full_result(monkeypatch, dim, dense):
    import ops.cpu

    rng = np.random.default_rng(11 + dim)
    if dense:
        boxes, _ = jittered_copies(rng, 2000, dim, n_objects=30)
    else:
        boxes = random_boxes(rng, 2000, dim)
    scores = rng.choice(np.linspace(0, 1, 50), len(boxes)).astype(np.float32)  # many ties
    labels = rng.integers(0, 3, len(boxes))
    weights = rng.uniform(0.5, 1.0, len(boxes)).astype(np.float32)
    monkeypatch.setattr(ops.cpu, "NMS_BLOCK", 37)  # several blocks before K boxes are kept
    monkeypatch.setattr(ops.cpu, "NMS_FIRST_BLOCK", 5)
    for k in (0, 1, 7, 100, 5000):
        full = ops.nms(boxes, scores, 0.3)
        np.testing.assert_array_equal(ops.nms(boxes, scores, 0.3, max_keep=k), full[:k])
        full = ops.batched_nms(boxes, scores, labels, 0.3)
        np.testing.assert_array_equal(ops.batched_nms(boxes, scores, labels, 0.3, max_keep=k), full[:k])
        full = ops.weighted_nms(boxes, scores, labels, weights, 0.1)
        np.testing.assert_array_equal(ops.weighted_nms(boxes, scores, labels, weights, 0.1, max_keep=k), full[:k])
    with pytest.raises(ValueError, match="max_keep"):
        ops.nms(boxes, scores, 0.3, max_keep=-1)
