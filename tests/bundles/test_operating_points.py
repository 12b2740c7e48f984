"""Operating points (scripts/operating_points.py) on hand-built predictions whose table is worked out here.

Two 2D images, classes ``a`` and ``b``::

    image 0: GT a [0,0,10,10], b [20,20,30,30]
             a 0.9 on the a object (TP), a 0.8 on background (FP), b 0.3 on b with IoU 1/3 (TP at IoU 0.1)
    image 1: GT b [0,0,10,10], a [40,40,50,50]
             b 0.7 on the b object (TP), a 0.6 on background (FP), a 0.5 on the b object (wrong class: FP)

Pooled over classes (4 objects, 2 images), detections scoring >= t:

    t     TP FP  sensitivity fppi precision
    0.9   1  0   0.25        0    1
    0.8   1  1   0.25        0.5  0.5
    0.7   2  1   0.5         0.5  2/3
    0.6   2  2   0.5         1    0.5
    0.5   2  3   0.5         1.5  0.4
    0.3   3  3   0.75        1.5  0.5
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from bundles.retinaunet_template.scripts import operating_points as op
from bundles.retinaunet_template.scripts.evaluation import evaluate_boxes_detailed

CLASSES = ["a", "b"]
PREDS = [
    {"boxes": [[0, 0, 10, 10], [50, 50, 60, 60], [25, 20, 35, 30]], "scores": [0.9, 0.8, 0.3], "labels": [0, 0, 1]},
    {"boxes": [[0, 0, 10, 10], [70, 70, 80, 80], [0, 0, 10, 10]], "scores": [0.7, 0.6, 0.5], "labels": [1, 0, 0]},
]
GTS = [
    {"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [0, 1]},
    {"boxes": [[0, 0, 10, 10], [40, 40, 50, 50]], "labels": [1, 0]},
]
# (threshold, TP, FP) pooled, from the table in the module docstring
POOLED = [(0.9, 1, 0), (0.8, 1, 1), (0.7, 2, 1), (0.6, 2, 2), (0.5, 2, 3), (0.3, 3, 3)]
NUM_GT, NUM_IMAGES = 4, 2


@pytest.fixture(scope="module")
def table():
    return op.operating_points(PREDS, GTS, CLASSES)


def _expected(threshold, tp, fp, num_gt=NUM_GT):
    fn = num_gt - tp
    return {"threshold": threshold, "sensitivity": tp / num_gt, "fppi": fp / NUM_IMAGES,
            "precision": tp / (tp + fp) if tp + fp else 0.0, "f1": 2 * tp / (2 * tp + fp + fn),
            "tp": tp, "fp": fp, "fn": fn}


def _same(row, expected):
    assert {k: row[k] for k in op.FIELDS} == pytest.approx(expected)


def test_table_pooled_and_per_class(table):
    assert table["num_images"] == NUM_IMAGES and table["pooled"]["num_gt"] == NUM_GT
    rows = table["pooled"]["rows"]
    assert len(rows) == len(POOLED)
    for row, (t, tp, fp) in zip(rows, POOLED, strict=True):
        _same(row, _expected(t, tp, fp))
    # class a: 0.9 TP, 0.8 FP, 0.6 FP, 0.5 FP (wrong class on b); class b: 0.7 TP, 0.3 TP; 2 objects each
    for name, want in {"a": [(0.9, 1, 0), (0.8, 1, 1), (0.6, 1, 2), (0.5, 1, 3)],
                       "b": [(0.7, 1, 0), (0.3, 2, 0)]}.items():
        g = table["per_class"][name]
        assert g["num_gt"] == 2
        assert len(g["rows"]) == len(want)
        for row, (t, tp, fp) in zip(g["rows"], want, strict=True):
            _same(row, _expected(t, tp, fp, num_gt=2))


def test_pooled_rows_are_the_froc_points(table):
    """The same matching as the FROC of evaluation.py: its curve (after the (0, 0) start) is our rows."""
    _, curves = evaluate_boxes_detailed(PREDS, GTS, CLASSES, fast=True)
    froc = curves["froc"]["IoU_0.10"]
    np.testing.assert_allclose(froc["fppi"][1:], [r["fppi"] for r in table["pooled"]["rows"]])
    np.testing.assert_allclose(froc["sensitivity"][1:], [r["sensitivity"] for r in table["pooled"]["rows"]])


def test_iou_decides_the_matching():
    """At IoU 0.5 the b box with IoU 1/3 is a false positive (and its object a miss)."""
    rows = op.operating_points(PREDS, GTS, CLASSES, iou=0.5)["per_class"]["b"]["rows"]
    _same(rows[-1], _expected(0.3, 1, 1, num_gt=2))


@pytest.mark.parametrize("kwargs, rule, pooled_index", [
    ({}, "fppi<=1", 3),  # lowest threshold with FPPI <= 1: 0.6
    ({"fppi": 0.5}, "fppi<=0.5", 2),  # 0.7
    ({"fppi": 0.25}, "fppi<=0.25", 0),  # 0.9 (no FP)
    ({"fppi": 2}, "fppi<=2", 5),  # 0.3, every detection
    ({"min_sensitivity": 0.5}, "sensitivity>=0.5", 2),  # highest threshold reaching 0.5: 0.7
    ({"min_sensitivity": 0.75}, "sensitivity>=0.75", 5),  # 0.3
    ({"min_sensitivity": 0.2}, "sensitivity>=0.2", 0),  # 0.9
])
def test_choose_rules(table, kwargs, rule, pooled_index):
    got = op.choose(table, **kwargs)
    t, tp, fp = POOLED[pooled_index]
    assert got["rule"] == rule and got["class"] == "all"
    assert got["num_cases"] == NUM_IMAGES and got["num_gt"] == NUM_GT
    _same(got, _expected(t, tp, fp))
    # each class at the chosen threshold; the classes add up to the pooled counts
    assert set(got["per_class"]) == set(CLASSES)
    assert sum(r["tp"] for r in got["per_class"].values()) == tp
    assert sum(r["fp"] for r in got["per_class"].values()) == fp
    assert all(r["threshold"] == got["threshold"] for r in got["per_class"].values())


def test_default_per_class_rows(table):
    got = op.choose(table)  # threshold 0.6: a has 0.9 TP, 0.8 FP, 0.6 FP; b has 0.7 TP
    _same(got["per_class"]["a"], _expected(0.6, 1, 2, num_gt=2))
    _same(got["per_class"]["b"], _expected(0.6, 1, 0, num_gt=2))


def test_choose_on_one_class(table):
    got = op.choose(table, cls="b")  # b has no FP: every detection, down to 0.3
    assert got["class"] == "b" and "per_class" not in got
    _same(got, _expected(0.3, 2, 0, num_gt=2))
    _same(op.choose(table, fppi=0.5, cls="a"), _expected(0.8, 1, 1, num_gt=2))
    with pytest.raises(ValueError, match="no class 'c'"):
        op.choose(table, cls="c")


@pytest.mark.parametrize("t, tp, fp", [
    (0.55, 2, 2),  # between scores: the detections >= 0.55 (0.9, 0.8, 0.7, 0.6)
    (0.6, 2, 2),  # a score itself is kept
    (0.3, 3, 3),
    (0.0, 3, 3),
    (0.95, 0, 0),  # above every score: nothing kept, precision 0
])
def test_fixed_threshold(table, t, tp, fp):
    got = op.choose(table, threshold=t)
    assert got["rule"] == f"threshold={t:g}"
    _same(got, _expected(t, tp, fp))


def test_unsatisfiable_rules_name_the_rule_and_the_best_value(table):
    with pytest.raises(ValueError, match=r"sensitivity>=0\.8.*best achievable sensitivity is 0\.75"):
        op.choose(table, min_sensitivity=0.8)
    # one image whose highest-scoring box is a false positive: FPPI starts at 1
    t = op.operating_points([{"boxes": [[50, 50, 60, 60], [0, 0, 10, 10]], "scores": [0.9, 0.4], "labels": [0, 0]}],
                            [{"boxes": [[0, 0, 10, 10]], "labels": [0]}], ["a"])
    with pytest.raises(ValueError, match=r"fppi<=0\.5.*lowest achievable FPPI is 1 \(threshold 0\.9\)"):
        op.choose(t, fppi=0.5)
    _same(op.choose(t), {"threshold": 0.4, "sensitivity": 1.0, "fppi": 2.0 / 2, "precision": 0.5,
                         "f1": 2 / 3, "tp": 1, "fp": 1, "fn": 0})
    empty = op.operating_points([{"boxes": [], "scores": [], "labels": []}], [{"boxes": [[0, 0, 4, 4]], "labels": [0]}],
                                ["a"])
    assert empty["pooled"]["rows"] == []
    with pytest.raises(ValueError, match="no detection"):
        op.choose(empty)
    with pytest.raises(ValueError, match=r"best achievable sensitivity is 0 \(no detection at all\)"):
        op.choose(empty, min_sensitivity=0.1)


def test_bad_arguments(table):
    with pytest.raises(ValueError, match="mutually exclusive"):
        op.choose(table, fppi=1, threshold=0.5)
    with pytest.raises(ValueError, match=r"min_sensitivity must lie in \[0, 1\]"):
        op.choose(table, min_sensitivity=1.5)
    with pytest.raises(ValueError, match="fppi must be >= 0"):
        op.choose(table, fppi=-1)
    with pytest.raises(ValueError, match="finite"):
        op.choose(table, threshold=float("nan"))


def test_ties_share_one_row():
    t = op.operating_points([{"boxes": [[0, 0, 10, 10], [50, 50, 60, 60]], "scores": [0.5, 0.5], "labels": [0, 0]}],
                            [{"boxes": [[0, 0, 10, 10]], "labels": [0]}], ["a"])
    assert len(t["pooled"]["rows"]) == 1
    _same(t["pooled"]["rows"][0], {"threshold": 0.5, "sensitivity": 1.0, "fppi": 1.0, "precision": 0.5,
                                   "f1": 2 / 3, "tp": 1, "fp": 1, "fn": 0})


def test_save_table_csv_json_and_text(table, tmp_path):
    csv_file, json_file = op.save_table(table, tmp_path)
    assert csv_file.name == "operating_points.csv" and json_file.name == "operating_points.json"
    with open(csv_file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(op.CSV_COLUMNS)
    by_class = {c: [r for r in rows if r["class"] == c] for c in ("all", "a", "b")}
    assert [len(v) for v in by_class.values()] == [6, 4, 2] and len(rows) == 12
    assert [(float(r["threshold"]), int(r["tp"]), int(r["fp"])) for r in by_class["all"]] == POOLED
    assert {r["num_images"] for r in rows} == {"2"} and {r["num_gt"] for r in by_class["all"]} == {"4"}
    loaded = json.loads(json_file.read_text())
    assert loaded["default"]["rule"] == "fppi<=1" and loaded["default"]["threshold"] == 0.6
    assert op.choose(loaded, min_sensitivity=0.75) == op.choose(table, min_sensitivity=0.75)
    text = op.format_table(loaded)
    assert "all classes (4 object(s), 2 case(s))" in text and "class a" in text and "class b" in text
    default_line = next(line for line in text.splitlines() if line.startswith("| default"))
    assert "0.6000" in default_line and "0.5000" in default_line
    assert any(line.startswith("| fppi<=0.125") and "0.9000" in line for line in text.splitlines())
    # a table where the default rule fails still saves, with the error in place of the choice
    # (one image, two false positives tied at the top score: FPPI 2 at the only threshold)
    bad = op.operating_points([{"boxes": [[50, 50, 60, 60], [70, 70, 80, 80]], "scores": [0.9, 0.9], "labels": [0, 0]}],
                              [{"boxes": [[0, 0, 10, 10]], "labels": [0]}], ["a"])
    op.save_table(bad, tmp_path / "bad")
    assert "lowest achievable FPPI" in json.loads((tmp_path / "bad" / "operating_points.json").read_text())["default"]["error"]
    assert "not reached" in op.format_table(bad)
