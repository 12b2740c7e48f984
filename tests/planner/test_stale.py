"""Stale plans are reported with how to re-plan; a bundle holding trained folds is not regenerated over them
unless asked, and then it is kept whole under another name (issue 18.7)."""

from __future__ import annotations

import json

import pytest

from planner.plan.plan import PLANNER_VERSION
from planner.prep import run_prep
from tests.planner.helpers import det_env, toy_task


@pytest.fixture
def prepped(tmp_path, monkeypatch):
    det_env(monkeypatch, tmp_path)
    toy_task(tmp_path / "data", num_train=3, num_test=1)
    return run_prep("000", preset="cpu", preprocess=False)


def test_plans_record_the_planner_version_and_an_old_plan_is_called_stale(prepped, caplog):
    plan_file = prepped.plan_files[0]
    d = json.loads(plan_file.read_text())
    assert d["planner_version"] == PLANNER_VERSION and len(d["inputs_hash"]) == 16
    with caplog.at_level("WARNING"):
        run_prep("000", preset="cpu", preprocess=False)
    assert "stale" not in caplog.text
    d["planner_version"] = "1"
    plan_file.write_text(json.dumps(d))
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_prep("000", preset="cpu", preprocess=False)
    assert "is stale: made by planner version 1" in caplog.text and "--overwrite" in caplog.text


def test_a_bundle_with_trained_folds_is_kept_not_overwritten(prepped):
    bundle = prepped.bundles[0]
    (bundle / "fold0").mkdir()
    (bundle / "fold0" / "model_last.pt").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match=r"holds trained models \['fold0'\].*--overwrite_trained"):
        run_prep("000", preset="cpu", preprocess=False, overwrite=True)
    assert (bundle / "fold0" / "model_last.pt").read_bytes() == b"weights"
    run_prep("000", preset="cpu", preprocess=False, overwrite=True, overwrite_trained=True)
    old = [p for p in bundle.parent.iterdir() if p.name.startswith(f"{bundle.name}.old-")]
    assert len(old) == 1 and (old[0] / "fold0" / "model_last.pt").read_bytes() == b"weights"
    assert (bundle / "configs" / "train.json").is_file() and not (bundle / "fold0").exists()
