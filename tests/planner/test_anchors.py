"""Anchor planning: objective, filtering, level scaling, optimiser, and use with MONAI's generator."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

from planner.plan.anchors import (
    ANCHOR_INIT,
    anchor_shapes_per_level,
    filter_box_sizes,
    mean_best_iou,
    plan_anchors,
    relative_level_strides,
)

STRIDES_3D = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]


def _brute_iou(boxes: np.ndarray, shapes: np.ndarray) -> float:
    """Reference: explicit centred-box IoU over every (box, anchor) pair."""
    best = []
    for b in boxes:
        ious = []
        for s in shapes:
            inter = np.prod(np.minimum(b, s))
            ious.append(inter / (np.prod(b) + np.prod(s) - inter))
        best.append(max(ious))
    return float(np.mean(best))


def test_relative_level_strides_anisotropic():
    rel = relative_level_strides(STRIDES_3D, [2, 3, 4, 5])
    # cumulative strides of stages 2..5: (2,4,4), (4,8,8), (8,16,16), (8,32,32)
    np.testing.assert_allclose(rel, [[1, 1, 1], [2, 2, 2], [4, 4, 4], [4, 8, 8]])


def test_mean_best_iou_matches_brute_force():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(1, 50, size=(40, 3))
    base = np.array([[3.0, 7.0, 12.0], [2.0, 5.0, 9.0], [4.0, 6.0, 20.0]])
    rel = relative_level_strides(STRIDES_3D, [2, 3, 4, 5])
    shapes = np.array([np.array(c) * r for r in rel for c in itertools.product(*base)])
    assert abs(mean_best_iou(boxes, base, rel) - _brute_iou(boxes, shapes)) < 1e-9


def test_mean_best_iou_hand_value():
    base = np.full((3, 3), 4.0)  # every anchor 4 x 4 x 4
    assert mean_best_iou(np.array([[2.0, 2.0, 2.0]]), base, np.ones((1, 3))) == 8 / 64
    assert mean_best_iou(np.array([[4.0, 4.0, 4.0]]), base, np.ones((1, 3))) == 1.0


def test_filter_keeps_identical_boxes_and_drops_outliers():
    same = np.tile([[10.0, 6.0, 12.0]], (50, 1))
    assert len(filter_box_sizes(same)) == 50
    rng = np.random.default_rng(0)
    sizes = np.concatenate([rng.uniform(5, 10, size=(400, 3)), [[500.0, 7.0, 7.0]]])
    kept = filter_box_sizes(sizes)
    assert kept[:, 0].max() < 500 and len(kept) < len(sizes)


def test_identical_boxes_get_a_perfect_anchor():
    boxes = np.tile([[10.0, 6.0, 12.0]], (100, 1))
    plan = plan_anchors(boxes, STRIDES_3D, [2, 3, 4, 5])
    assert plan.mean_best_iou > 0.99
    shapes = [tuple(s) for level in anchor_shapes_per_level(plan) for s in level]
    assert (10.0, 6.0, 12.0) in shapes


def test_optimised_anchors_beat_the_initial_ones_and_are_deterministic():
    rng = np.random.default_rng(1)
    # flat, elongated objects that the default (4, 8, 16) cubes cover badly
    boxes = np.stack([rng.uniform(2, 4, 600), rng.uniform(20, 60, 600), rng.uniform(10, 30, 600)], axis=1)
    levels = [2, 3, 4, 5]
    plan = plan_anchors(boxes, STRIDES_3D, levels, maxiter=20)
    rel = relative_level_strides(STRIDES_3D, levels)
    init = mean_best_iou(filter_box_sizes(boxes), np.tile(np.asarray(ANCHOR_INIT), (3, 1)), rel)
    assert plan.mean_best_iou > init + 0.05
    assert plan == plan_anchors(boxes, STRIDES_3D, levels, maxiter=20)


def test_plan_layout_3d_and_2d():
    rng = np.random.default_rng(2)
    plan = plan_anchors(rng.uniform(4, 30, size=(200, 3)), STRIDES_3D, [2, 3, 4, 5])
    assert plan.num_anchors_per_location == 27
    assert len(plan.base_sizes) == 3 and all(len(b) == 3 for b in plan.base_sizes)
    rel = relative_level_strides(STRIDES_3D, [2, 3, 4, 5])
    for lv, level in enumerate(plan.sizes):
        for a in range(3):
            np.testing.assert_allclose(level[a], np.asarray(plan.base_sizes[a]) * rel[lv, a])
    assert all(v >= 1 and float(v).is_integer() for b in plan.base_sizes for v in b)

    strides_2d = [[1, 1]] + [[2, 2]] * 6
    plan2 = plan_anchors(rng.uniform(4, 30, size=(200, 2)), strides_2d, [2, 3, 4, 5, 6])
    assert plan2.num_anchors_per_location == 9
    assert len(plan2.sizes) == 5 and len(anchor_shapes_per_level(plan2)[0]) == 9


def test_no_boxes_falls_back_to_initial_sizes():
    plan = plan_anchors(np.zeros((0, 3)), STRIDES_3D, [2, 3, 4, 5])
    assert plan.base_sizes == [list(ANCHOR_INIT)] * 3 and plan.mean_best_iou == 0.0


def test_the_network_builds_the_planned_anchors_also_for_odd_sizes():
    """The detector's generator builds every planned shape exactly, odd sizes included (MONAI's own cell
    anchors round 3 and 5 to 4, which is what the planner must not be blind to), so the mean best IoU the
    plan reports is that of the network's anchors."""
    from bundles.retinaunet_template.scripts.detector import PlanAnchorGenerator

    rng = np.random.default_rng(3)
    boxes = rng.uniform(2, 9, size=(300, 3))  # small lesions: the optimiser picks odd sizes here
    plan = plan_anchors(boxes, STRIDES_3D, [2, 3, 4, 5])
    shapes = anchor_shapes_per_level(plan)
    assert any(v % 2 for level in shapes for s in level for v in s), "the case needs odd planned sizes"
    gen = PlanAnchorGenerator(plan.sizes)
    for level, cell in zip(shapes, gen.cell_anchors, strict=True):
        assert cell.shape == (27, 6)
        np.testing.assert_array_equal((cell[:, 3:] - cell[:, :3]).numpy(), np.asarray(level, dtype=np.float32))
        np.testing.assert_array_equal((cell[:, 3:] + cell[:, :3]).numpy(), 0)  # centred on the cell
        rounded = AnchorGeneratorWithAnchorShape.generate_anchors_using_shape(torch.tensor(level))
        odd = [i for i, s in enumerate(level) if any(v % 2 for v in s)]
        if odd:  # MONAI's rounding would change exactly these
            assert not torch.equal(rounded[odd], cell[odd])


def test_default_budget_reaches_nndetections_three_runs_of_5000():
    """Small and large objects (the hard case for the search): our one run (500 boxes at most, DE_MAXITER
    generations) reaches the mean best IoU of nnDetection's budget (best of 3 searches x ~5000 evaluations on
    all boxes); the old 40 generations fell 0.04 short here (benchmarks/anchor_budget.py has four box sets)."""
    from benchmarks.anchor_budget import nndet_like, populations

    sizes, strides, levels = populations(np.random.default_rng(0))["small + large (3D, 2000)"]
    sizes = sizes[np.random.default_rng(1).choice(len(sizes), 400, replace=False)]
    theirs, _, _ = nndet_like(sizes, strides, levels)
    ours = plan_anchors(sizes, strides, levels).mean_best_iou
    assert ours >= theirs - 0.005, (ours, theirs)
    assert plan_anchors(sizes, strides, levels, maxiter=40).mean_best_iou < theirs - 0.02
