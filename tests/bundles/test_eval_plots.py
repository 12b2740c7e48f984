"""Evaluation plots: files are written, are PNGs, and the size breakdown counts correctly."""

from __future__ import annotations

import numpy as np
import pytest

from bundles.retinaunet_template.scripts.eval_plots import (
    plot_all,
    plot_example_detections,
    plot_examples,
    size_breakdown,
)
from bundles.retinaunet_template.scripts.evaluation import evaluate_boxes_detailed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def curves():
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(6):
        lo = rng.uniform(0, 30, (3, 3))
        gt = np.c_[lo, lo + rng.uniform(2, 10, (3, 3))]
        labels = rng.integers(0, 2, 3)
        pred = np.r_[gt[:2] + rng.normal(0, 0.5, (2, 6)), [[40, 40, 40, 45, 45, 45]]]
        pred[:, 3:] = np.maximum(pred[:, 3:], pred[:, :3] + 1)
        preds.append({"boxes": pred, "scores": rng.random(3), "labels": np.r_[labels[:2], 0]})
        gts.append({"boxes": gt, "labels": labels})
    return evaluate_boxes_detailed(preds, gts, ["a", "b"])[1]


def test_plot_all_writes_pngs(tmp_path, curves):
    paths = plot_all(curves, tmp_path)
    names = {p.name for p in paths}
    assert {
        "FROC.png",
        "FROC_a.png",
        "FROC_b.png",
        "pr_IoU_0_10.png",
        "pr_IoU_0_50.png",
        "scores_IoU_0_10.png",
        "scores_IoU_0_50.png",
        "recall_by_size.png",
    } <= names
    assert all(_is_png(p) for p in paths)


def test_size_breakdown_terciles():
    c = {
        "gt": {
            "volume": np.array([1, 2, 3, 10, 20, 30, 100, 200, 300.0]),
            "matched": {"IoU_0.10": np.array([1, 1, 1, 1, 0, 1, 0, 0, 1], bool)},
        }
    }
    b = size_breakdown(c)
    assert b["count"].tolist() == [3, 3, 3]
    np.testing.assert_allclose(b["recall"]["IoU_0.10"], [1, 2 / 3, 1 / 3])


def test_example_detections_3d_and_2d(tmp_path):
    img = np.random.default_rng(1).random((1, 32, 24, 16))
    gt = np.array([[2, 3, 4, 8, 9, 7], [10, 10, 12, 14, 15, 15]], float)
    pred = np.array([[2, 3, 4, 8, 9, 6], [20, 5, 0, 25, 9, 3]], float)
    p3 = plot_example_detections(img, pred, [0.9, 0.3], gt, tmp_path / "ex3d.png", score_thresh=0.2)
    p2 = plot_example_detections(
        img[0, :, :, 5], pred[:, [0, 1, 3, 4]], [0.9, 0.3], gt[:, [0, 1, 3, 4]], tmp_path / "ex2d.png"
    )
    p0 = plot_example_detections(img[0], np.zeros((0, 6)), [], np.zeros((0, 6)), tmp_path / "none.png")
    assert all(_is_png(p) for p in (p3, p2, p0))
    many = plot_examples(
        [{"case_id": "c1", "image": img, "pred_boxes": pred, "pred_scores": [0.9, 0.3], "gt_boxes": gt}],
        tmp_path / "ex",
    )
    assert [p.name for p in many] == ["example_c1.png"] and _is_png(many[0])
    with pytest.raises(ValueError, match="does not fit"):
        plot_example_detections(np.zeros((2, 2, 8, 8, 8)), pred, [0.9, 0.3], gt, tmp_path / "bad.png")
