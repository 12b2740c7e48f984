"""Coordinate-search sweep: nnDetection's order and tie rule, caching, NaN handling, JSON and plot."""

from __future__ import annotations

import json
import math

import pytest

from bundles.retinaunet_template.scripts.sweep import (
    DEFAULT_PARAMS,
    SWEEP_SPACE,
    SweepResult,
    coordinate_search,
    save_sweep,
)


def test_spec_ranges_and_defaults():
    assert list(SWEEP_SPACE) == ["model_iou", "model_nms", "ensemble_iou", "model_score_thresh", "remove_small_boxes"]
    assert SWEEP_SPACE["model_score_thresh"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert SWEEP_SPACE["remove_small_boxes"] == [0.01, 2, 3, 4, 5, 6, 7]
    assert all(DEFAULT_PARAMS[k] in v for k, v in SWEEP_SPACE.items())


def test_each_parameter_is_set_to_the_argmax_given_the_earlier_choices():
    space = {"a": [0, 1, 2], "b": [0, 1, 2]}

    # not separable: the best b depends on a; coordinate search finds a first (with b at its start value)
    def f(p):
        return -(p["a"] - 2) ** 2 - (p["b"] - p["a"]) ** 2 + (3 if (p["a"], p["b"]) == (0, 0) else 0)

    res = coordinate_search(f, space, start={"a": 1, "b": 0})
    # a is chosen with b=0: f(0,0)=-1, f(1,0)=-2, f(2,0)=-4 -> a=0; then b with a=0: f(0,0)=-1 best
    assert res.curves["a"] == [(0, -1.0), (1, -2.0), (2, -4.0)]
    assert res.params == {"a": 0, "b": 0} and res.score == -1.0
    assert res.default_score == f({"a": 1, "b": 0})


def test_ties_keep_the_current_value_then_the_first_and_nan_loses():
    res = coordinate_search(lambda p: {0: 0.5, 1: 0.5, 2: float("nan")}[p["x"]], {"x": [2, 0, 1]}, start={"x": 2})
    assert res.params["x"] == 0 and res.score == 0.5
    assert res.curves["x"][0][1] == -math.inf
    # every value scores the same: the starting value stays (nnDetection would take the first, 1e-5)
    flat = coordinate_search(lambda p: 1.0)
    assert flat.params == DEFAULT_PARAMS
    res = coordinate_search(lambda p: {0: 0.5, 1: 0.5, 2: 0.1}[p["x"]], {"x": [2, 0, 1]}, start={"x": 1})
    assert res.params["x"] == 1


def test_each_distinct_parameter_set_is_evaluated_once():
    calls = []

    def f(p):
        calls.append(dict(p))
        return p["a"] + p["b"]

    coordinate_search(f, {"a": [0, 1], "b": [0, 1]}, start={"a": 0, "b": 0})
    keys = [tuple(sorted(c.items())) for c in calls]
    assert len(keys) == len(set(keys)) == 3  # (0,0), (1,0), (1,1): the repeats are cached


def test_default_space_runs_and_round_trips(tmp_path):
    # a smooth objective with its optimum inside the ranges
    def f(p):
        return (1 - abs(p["model_iou"] - 0.2) - abs(p["ensemble_iou"] - 0.3) - abs(p["model_score_thresh"] - 0.1)
                - 0.01 * p["remove_small_boxes"] + (0.05 if p["model_nms"] == "plain" else 0))

    res = coordinate_search(f)
    assert res.params == {"model_iou": 0.2, "model_nms": "plain", "ensemble_iou": 0.3, "model_score_thresh": 0.1,
                          "remove_small_boxes": 0.01}
    assert res.score > res.default_score
    path = save_sweep(res, tmp_path / "sweep")
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    back = SweepResult.from_dict(json.loads(path.read_text()))
    assert back.params == res.params and back.score == pytest.approx(res.score)
    assert back.curves["model_nms"] == res.curves["model_nms"]


def test_empty_range_is_an_error():
    with pytest.raises(ValueError, match="'a'"):
        coordinate_search(lambda p: 0.0, {"a": []})
