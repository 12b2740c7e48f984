"""`--analyze_boxes`: per-object and false-positive tables on hand-made cases."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from workflow.analysis import analyze_boxes, box_iou_np, format_summary


def _p(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 6), "scores": np.asarray(scores, float),
            "labels": np.asarray(labels, int)}


def test_box_iou_np_matches_hand_values():
    a = np.array([[0, 0, 0, 2, 2, 2]], float)
    b = np.array([[1, 0, 0, 3, 2, 2], [5, 5, 5, 6, 6, 6], [0, 0, 0, 2, 2, 2]], float)
    np.testing.assert_allclose(box_iou_np(a, b), [[4 / 12, 0.0, 1.0]])
    assert box_iou_np(np.zeros((0, 6)), b).shape == (0, 3)


def test_objects_and_false_positives(tmp_path):
    classes = ["Square", "SquareHole"]
    gts = [{"boxes": np.array([[0, 0, 0, 10, 10, 10], [20, 20, 20, 30, 30, 30]], float), "labels": np.array([0, 1])},
           {"boxes": np.array([[5, 5, 5, 15, 15, 15]], float), "labels": np.array([1])}]
    preds = [
        # case a: object 0 found (0.9), object 1 only by a wrong-class box (0.6), a background box (0.4)
        _p([[0, 0, 0, 10, 10, 9], [21, 20, 20, 30, 30, 30], [40, 40, 40, 45, 45, 45]], [0.9, 0.6, 0.4], [0, 0, 0]),
        # case b: the object found at 0.3 and a low background box below min_score
        _p([[5, 5, 5, 15, 15, 14], [50, 50, 50, 52, 52, 52]], [0.3, 0.05], [1, 1]),
    ]
    s = analyze_boxes(preds, gts, ["a", "b"], classes, tmp_path, iou=0.1, min_score=0.1)
    assert s["num_objects"] == 3 and s["num_found"] == 2
    (missed,) = s["missed"]
    assert missed["case"] == "a" and missed["class"] == "SquareHole" and missed["label"] == "Square"
    assert missed["score"] == pytest.approx(0.6) and missed["right_class"] is False
    assert missed["iou"] == pytest.approx(0.9)
    hardest = s["hardest_found"][0]
    assert hardest["case"] == "b" and hardest["score"] == pytest.approx(0.3) and hardest["rank_in_class"] == 1
    assert s["hardest_found"][1]["rank_in_class"] == 1  # 0.9 is the highest Square score
    fps = s["top_false_positives"]
    assert [(f["case"], round(f["score"], 2)) for f in fps] == [("a", 0.6), ("a", 0.4)]  # 0.05 below min_score
    assert fps[0]["that_object_class"] == "SquareHole" and fps[1]["that_object_class"] is None
    assert s["false_positives_on_objects_of_other_class"] == 1
    rows = list(csv.DictReader(open(tmp_path / "analysis" / "objects.csv")))
    assert len(rows) == 3 and rows[0]["size"] == "10.0 10.0 10.0"
    assert len(list(csv.DictReader(open(tmp_path / "analysis" / "false_positives.csv")))) == 2
    text = format_summary(s)
    assert "2/3 objects found" in text and "missed  a SquareHole" in text and "on a SquareHole" in text


def test_lengths_must_agree(tmp_path):
    with pytest.raises(ValueError, match="differ"):
        analyze_boxes([], [{"boxes": np.zeros((0, 6)), "labels": np.zeros(0)}], ["a"], ["x"], tmp_path)
