"""Weighted box clustering against a plain loop written from nnDetection's WBC definition (see ``ops.wbc``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ops
from tests.ops import box_sets, pair_iou64, random_boxes


def reference_wbc(boxes, scores, labels, thr, n_exp, score_thr=0.0, weights=None, missing_weight=1.0):
    """nnDetection's WBC, literally: per class, greedy clusters around the best remaining box."""
    n = len(boxes)
    weights = np.ones(n) if weights is None else np.asarray(weights, float)
    n_exp = np.broadcast_to(np.asarray(n_exp, float), (n,))
    out = []
    for c in np.unique(labels):
        pool = [i for i in sorted(range(n), key=lambda i: -float(np.float32(scores[i]))) if labels[i] == c]
        while pool:
            h = pool[0]
            members = [i for i in pool if i == h or pair_iou64(boxes[h], boxes[i]) > thr]
            m = [weights[i] * (1.0 if i == h else pair_iou64(boxes[h], boxes[i])) for i in members]
            ms = [mi * float(scores[i]) for mi, i in zip(m, members, strict=True)]
            n_missing = max(0.0, float(np.mean([n_exp[i] for i in members])) - len(members))
            den = sum(m) + n_missing * float(np.mean(m)) * missing_weight
            score = sum(ms) / den if den > 0 else 0.0
            if sum(ms) > 0:
                box = sum(w * boxes[i].astype(float) for w, i in zip(ms, members, strict=True)) / sum(ms)
            else:
                box = boxes[h].astype(float)
            if score > score_thr:
                out.append((float(scores[h]), h, box, score, c))
            pool = [i for i in pool if i not in members]
    out.sort(key=lambda t: (-np.float32(t[0]), t[1]))  # ours: ordered by head score, ties by index
    return out


def assert_matches(result, ref):
    b, s, lab = result
    assert len(s) == len(ref)
    for k, (_, _, box, score, c) in enumerate(ref):
        np.testing.assert_allclose(b[k], box, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(s[k], score, rtol=1e-5, atol=1e-7)
        assert lab[k] == c


@settings(max_examples=60, deadline=None)
@given(
    box_sets(max_n=40),
    st.sampled_from([0.0, 0.1, 0.5]),
    st.sampled_from([1, 3, 8]),
    st.sampled_from([0.0, 0.3]),
    st.booleans(),
)
def test_wbc_matches_spec_reference(data, thr, n_exp, score_thr, use_weights):
    boxes, scores = data
    n = len(boxes)
    assume(all(abs(pair_iou64(a, b) - thr) > 1e-5 for i, a in enumerate(boxes) for b in boxes[i + 1 :]))
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 2, n)
    weights = rng.uniform(0.5, 1.0, n) if use_weights else None
    nexp = rng.integers(1, 10, n) if n_exp == 8 else n_exp  # per-box array or scalar
    res = ops.wbc(boxes, scores, labels, thr, nexp, score_threshold=score_thr, weights=weights)
    assert_matches(res, reference_wbc(boxes, scores, labels, thr, nexp, score_thr, weights))


def test_wbc_single_cluster_by_hand():
    # three votes for one object, 5 expected: n_missing = 2 damps the score like two zero votes
    b = np.array([[0, 0, 0, 10, 10, 10], [0, 0, 0, 10, 10, 10], [0, 0, 0, 10, 10, 10]], np.float32)
    s = np.array([0.9, 0.6, 0.3], np.float32)
    boxes, scores, labels = ops.wbc(b, s, np.zeros(3, int), 0.5, 5)
    np.testing.assert_allclose(scores, [(0.9 + 0.6 + 0.3) / 5], rtol=1e-6)
    np.testing.assert_allclose(boxes, b[:1], rtol=1e-6)
    # a shifted member moves the box towards itself in proportion to IoU * score
    b2 = np.array([[0, 0, 10, 10], [2, 0, 12, 10]], np.float32)  # IoU 8/12
    boxes, scores, _ = ops.wbc(b2, np.array([0.8, 0.4]), np.zeros(2), 0.5, 1)
    m = np.array([1.0, 8 / 12])
    w = m * [0.8, 0.4]
    np.testing.assert_allclose(boxes[0], (w[:, None] * b2).sum(0) / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(scores[0], w.sum() / m.sum(), rtol=1e-6)


def test_wbc_score_threshold_missing_weight_and_classes():
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    s = np.array([0.5, 0.5], np.float32)
    _, sc, lab = ops.wbc(b, s, np.array([3, 4]), 0.5, 4)  # different classes never merge
    np.testing.assert_allclose(sc, [0.5 / 4, 0.5 / 4])
    assert sorted(lab.tolist()) == [3, 4]
    _, sc, _ = ops.wbc(b, s, np.array([3, 4]), 0.5, 4, missing_weight=0.0)
    np.testing.assert_allclose(sc, [0.5, 0.5])
    _, sc, _ = ops.wbc(b, s, np.array([3, 3]), 0.5, 4, score_threshold=0.25)
    assert len(sc) == 0  # 1.0 / 4 is not > 0.25


def test_wbc_edge_cases():
    e = ops.wbc(np.zeros((0, 6)), np.zeros(0), np.zeros(0, int), 0.5, 3)
    assert e[0].shape == (0, 6) and e[1].shape == (0,) and e[2].shape == (0,)
    one = ops.wbc(np.array([[1, 2, 3, 4]]), np.array([0.8]), np.array([2]), 0.5, 1)
    np.testing.assert_allclose(one[0], [[1, 2, 3, 4]]) and np.testing.assert_allclose(one[1], [0.8])
    # zero-size boxes form singleton clusters (head IoU defined as 1) and never join others
    z = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10]], np.float32)
    b, s, _ = ops.wbc(z, np.array([0.9, 0.8, 0.7]), np.zeros(3), 0.0, 1)
    np.testing.assert_allclose(s, [0.9, 0.8, 0.7], rtol=1e-6)
    # zero weights: score 0, box falls back to the head box
    b, s, _ = ops.wbc(z[2:], np.array([0.7]), np.zeros(1), 0.5, 1, weights=np.zeros(1), score_threshold=-1)
    np.testing.assert_allclose(s, [0.0]) and np.testing.assert_allclose(b, z[2:])
    with pytest.raises(ValueError, match="NaN"):
        ops.wbc(z, np.array([0.1, np.nan, 0.2]), np.zeros(3), 0.5, 1)
    with pytest.raises(ValueError, match="n_exp_preds"):
        ops.wbc(z, np.ones(3), np.zeros(3), 0.5, np.ones(2))


def test_wbc_kinds_and_dtypes():
    rng = np.random.default_rng(7)
    b = random_boxes(rng, 200, 3, extent=60)
    s = rng.random(200).astype(np.float32)
    lab = rng.integers(0, 3, 200)
    ref = ops.wbc(b, s, lab, 0.3, 6)
    out = ops.wbc(torch.from_numpy(b).double(), torch.from_numpy(s), torch.from_numpy(lab), 0.3, torch.tensor(6))
    assert all(isinstance(x, torch.Tensor) for x in out)
    assert out[0].dtype == torch.float64 and out[1].dtype == torch.float32 and out[2].dtype == torch.int64
    np.testing.assert_allclose(out[0].numpy(), ref[0], rtol=1e-6)
    np.testing.assert_array_equal(out[2].numpy(), ref[2])
    assert ref[0].dtype == np.float32 and ref[1].dtype == np.float32
