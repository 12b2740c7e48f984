"""nnDetection's box convention for comparable numbers: extent (min - 1, max + 1) and (x1, y1, x2, y2, z1, z2)
order; the same predictions score differently on small objects, which --box_convention nndetection shows."""

from __future__ import annotations

import numpy as np
import pytest

from bundles.retinaunet_template.scripts import evaluation
from ops.boxes import iou_elementwise
from workflow.evaluate import (
    from_nndetection_order,
    in_convention,
    to_nndetection_extent,
    to_nndetection_order,
)

CUBE = np.array([[0, 0, 0, 3, 3, 3]], np.float64)  # voxels 0..2 (half-open)
SHIFTED = CUBE + 1


def test_a_shifted_3_voxel_cube_has_nndetections_iou_in_its_convention():
    ours = float(iou_elementwise(CUBE.astype(np.float32), SHIFTED.astype(np.float32))[0])
    theirs = float(iou_elementwise(to_nndetection_extent(CUBE, 3).astype(np.float32),
                                   to_nndetection_extent(SHIFTED, 3).astype(np.float32))[0])
    assert ours == pytest.approx(8 / 46, abs=1e-6)  # 0.174
    assert theirs == pytest.approx(27 / 101, abs=1e-6)  # 0.267


def test_order_round_trip():
    b = np.array([[1, 2, 3, 4, 5, 6]])
    assert to_nndetection_order(b, 3).tolist() == [[1, 2, 4, 5, 3, 6]]
    assert from_nndetection_order(to_nndetection_order(b, 3), 3).tolist() == b.tolist()
    assert to_nndetection_order(b[:, :4], 2).tolist() == [[1, 2, 3, 4]]


def test_metrics_at_iou_02_differ_by_convention():
    preds = [{"boxes": SHIFTED, "scores": np.array([0.9]), "labels": np.array([0])}]
    gts = [{"boxes": CUBE, "labels": np.array([0])}]
    key = "AP_IoU_0.20_MaxDet_100"
    ours, _ = evaluation.evaluate_boxes_detailed(preds, gts, ["a"], iou_thresholds=(0.1, 0.2))
    theirs, _ = evaluation.evaluate_boxes_detailed(in_convention(preds, 3, "nndetection"),
                                                   in_convention(gts, 3, "nndetection"), ["a"],
                                                   iou_thresholds=(0.1, 0.2))
    assert ours[key] == pytest.approx(0.0) and theirs[key] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="box_convention"):
        in_convention(preds, 3, "pascal")
