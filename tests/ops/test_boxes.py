"""IoU/GIoU values, the half-open convention, validation and ranking (ops.boxes, ops.box_iou/giou)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from monai.data.box_utils import box_giou as monai_giou
from monai.data.box_utils import box_iou as monai_iou

import ops
from ops.boxes import rank_order
from tests.ops import box_sets, pair_iou64, random_boxes


def test_iou_known_values_2d_3d():
    a = np.array([[0, 0, 2, 2]], np.float32)
    b = np.array([[1, 1, 3, 3], [2, 0, 4, 2], [0, 0, 2, 2], [0, 0, 1, 1]], np.float32)
    # overlap 1 of union 7; touching edge (half-open) -> 0; identical -> 1; nested 1/4
    np.testing.assert_allclose(ops.box_iou(a, b), [[1 / 7, 0.0, 1.0, 0.25]], rtol=1e-6)
    a3 = np.array([[0, 0, 0, 2, 2, 2]], np.float32)
    b3 = np.array([[1, 1, 1, 3, 3, 3], [0, 0, 2, 2, 2, 4]], np.float32)
    np.testing.assert_allclose(ops.box_iou(a3, b3), [[1 / 15, 0.0]], rtol=1e-6)


def test_voxel_convention_one_voxel_boxes():
    # voxels i..j inclusive -> [i, j + 1): two single-voxel boxes side by side do not overlap
    v0 = np.array([[3, 3, 3, 4, 4, 4]], np.float32)
    v1 = np.array([[4, 3, 3, 5, 4, 4]], np.float32)
    assert ops.box_iou(v0, v1)[0, 0] == 0.0
    assert ops.box_iou(v0, v0)[0, 0] == 1.0


def test_zero_size_boxes_have_iou_zero_even_with_themselves():
    z = np.array([[5, 5, 5, 5], [1, 1, 1, 4], [0, 0, 10, 10]], np.float32)
    iou = ops.box_iou(z, z)
    assert iou[0, 0] == 0.0 and iou[1, 1] == 0.0 and iou[2, 2] == 1.0
    assert not np.isnan(iou).any()
    assert iou[0, 2] == 0.0 and iou[1, 2] == 0.0
    g = ops.box_giou(z, z)
    assert not np.isnan(g).any() and g[0, 0] == 0.0


@settings(max_examples=60, deadline=None)
@given(box_sets(max_n=25))
def test_iou_agrees_with_monai_and_float64(data):
    boxes, _ = data
    ours = ops.box_iou(boxes, boxes)
    assert ours.dtype == np.float32 and ours.shape == (len(boxes), len(boxes))
    if len(boxes):
        np.testing.assert_allclose(ours, monai_iou(boxes, boxes), atol=1e-6, rtol=1e-5)
        np.testing.assert_array_equal(ours, ours.T)  # bitwise symmetric
        ref = [[pair_iou64(a, b) for b in boxes] for a in boxes]
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-6)


def test_giou_agrees_with_monai():
    rng = np.random.default_rng(1)
    for dim in (2, 3):
        a, b = random_boxes(rng, 50, dim, extent=64), random_boxes(rng, 30, dim, extent=64)
        np.testing.assert_allclose(ops.box_giou(a, b), monai_giou(a, b), atol=1e-5)
        assert (ops.box_giou(a, b) <= ops.box_iou(a, b) + 1e-7).all()


def test_iou_chunked_dense_matches_unchunked(monkeypatch):
    from ops import cpu

    rng = np.random.default_rng(2)
    a, b = random_boxes(rng, 70, 3, extent=64), random_boxes(rng, 50, 3, extent=64)
    full = ops.box_iou(a, b)
    monkeypatch.setattr(cpu, "DENSE_CHUNK_ELEMS", 7)
    np.testing.assert_array_equal(ops.box_iou(a, b), full)


def test_kinds_preserved():
    rng = np.random.default_rng(3)
    a = random_boxes(rng, 6, 2)
    t = torch.from_numpy(a).double()
    out = ops.box_iou(t, t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (6, 6)
    np.testing.assert_array_equal(out.numpy(), ops.box_iou(a, a))
    assert isinstance(ops.box_iou(a, t), np.ndarray)  # first argument decides
    assert ops.box_iou(np.zeros((0, 6)), np.zeros((3, 6))).shape == (0, 3)
    # integer input is computed in float32 too
    np.testing.assert_array_equal(ops.box_iou(a.round().astype(np.int64), a.round()), ops.box_iou(a.round(), a.round()))


@pytest.mark.parametrize(
    "boxes, match",
    [
        (np.zeros((3, 5)), "shape"),
        (np.array([[0, 0, np.nan, 1]]), "NaN"),
        (np.array([[0, 0, np.inf, 1]]), "NaN or Inf"),
        (np.array([[2, 0, 1, 1]]), "hi < lo"),
    ],
)
def test_invalid_boxes_raise(boxes, match):
    with pytest.raises(ValueError, match=match):
        ops.box_iou(boxes, boxes)
    with pytest.raises(ValueError, match=match):
        ops.nms(boxes, np.ones(len(boxes)), 0.5)


def test_mixed_dimensionality_raises():
    with pytest.raises(ValueError, match="2D or both 3D"):
        ops.box_iou(np.zeros((1, 4)), np.zeros((1, 6)))


def test_rank_order_descending_stable_and_signed_zero():
    s = np.array([0.5, -0.0, 0.9, 0.5, 0.0, -1.0, np.inf, 0.9], np.float32)
    np.testing.assert_array_equal(rank_order(s), [6, 2, 7, 0, 3, 1, 4, 5])
    rng = np.random.default_rng(4)
    x = rng.integers(0, 5, 1000).astype(np.float32) * rng.choice([-1, 1], 1000).astype(np.float32)
    np.testing.assert_array_equal(rank_order(x), np.argsort(-x, kind="stable"))
