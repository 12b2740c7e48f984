"""Fold splits: deterministic, disjoint, complete; user files validated."""

from __future__ import annotations

import json

import pytest

from bundles.retinaunet_template.scripts.splits import (
    SplitsError,
    fold_cases,
    load_or_create_splits,
    make_splits,
)

CASES = [f"case_{i:03d}" for i in range(23)]


def test_splits_deterministic_disjoint_cover_all():
    a = make_splits(CASES, num_folds=5, seed=12345)
    b = make_splits(list(reversed(CASES)), num_folds=5, seed=12345)
    assert a == b  # input order does not matter
    assert make_splits(CASES, num_folds=5, seed=1) != a  # the seed does
    vals = [set(f["val"]) for f in a]
    assert set().union(*vals) == set(CASES)
    assert sum(len(v) for v in vals) == len(CASES)  # pairwise disjoint
    assert sorted(len(v) for v in vals) == [4, 4, 5, 5, 5]  # sizes differ by at most one
    for f in a:
        assert set(f["train"]).isdisjoint(f["val"])
        assert set(f["train"]) | set(f["val"]) == set(CASES)


def test_folds_are_nndetections_sklearn_kfold():
    # nnDetection: KFold(5, shuffle=True, random_state=12345).split(np.sort(ids)). KFold shuffles arange(7)
    # with RandomState(12345) -> [6, 3, 4, 0, 1, 5, 2] and cuts chunks of 2, 2, 1, 1, 1 (the first 7 % 5
    # one larger). Checked once against scikit-learn's KFold; the old default_rng permutation gave
    # other folds.
    ids = [f"case_{c}" for c in "gfedcba"]
    vals = [f["val"] for f in make_splits(ids)]
    assert vals == [["case_d", "case_g"], ["case_a", "case_e"], ["case_b"], ["case_f"], ["case_c"]]
    # 23 ids: the larger folds come first, as in KFold
    assert [len(f["val"]) for f in make_splits(CASES)] == [5, 5, 5, 4, 4]


def test_too_few_cases():
    with pytest.raises(ValueError, match="cannot be split"):
        make_splits(CASES[:3], num_folds=5)


def test_load_or_create_writes_once_and_reuses(tmp_path):
    path = tmp_path / "splits_final.json"
    first = load_or_create_splits(path, CASES)
    assert path.is_file() and json.loads(path.read_text()) == first
    # a later call with a different seed still reuses the file
    assert load_or_create_splits(path, CASES, seed=99) == first
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def _write(path, splits):
    path.write_text(json.dumps(splits))
    return path


def test_user_splits_accepted(tmp_path):
    user = [{"train": CASES[10:], "val": CASES[:10]}, {"train": CASES[:10], "val": CASES[10:]}]
    path = _write(tmp_path / "splits_final.json", user)
    assert load_or_create_splits(path, CASES) == user
    with pytest.raises(SplitsError, match="folds 0..1"):
        fold_cases(user, 2, path)


@pytest.mark.parametrize(
    "splits, message",
    [
        ([{"train": CASES[10:], "val": CASES[:10] + ["ghost"]}, {"train": [], "val": CASES[10:]}], "unknown"),
        ([{"train": CASES[5:], "val": CASES[:10]}, {"train": CASES[:10], "val": CASES[10:]}], "both train"),
        ([{"train": [], "val": CASES[:12]}, {"train": [], "val": CASES[10:]}], "also in the val set"),
        ([{"train": [], "val": CASES[:10]}, {"train": [], "val": CASES[10:20]}], "in no validation fold"),
        ({"train": [], "val": []}, "non-empty JSON list"),
    ],
)
def test_user_splits_rejected_naming_the_file(tmp_path, splits, message):
    path = _write(tmp_path / "my_splits.json", splits)
    with pytest.raises(SplitsError, match=message) as err:
        load_or_create_splits(path, CASES)
    assert "my_splits.json" in str(err.value)
