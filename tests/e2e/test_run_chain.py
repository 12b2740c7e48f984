"""`nndet run TASK`: every stage once, a rerun that reuses them, stale outputs refused, stage subsets."""

from __future__ import annotations

import json

import pytest

from planner.toy import generate_example
from tests.planner.helpers import SMOKE_SCHEDULE as SMOKE
from tests.planner.helpers import det_env
from workflow import cli
from workflow.run import STAGES, run_task


@pytest.fixture()
def task(tmp_path, monkeypatch):
    return generate_example(det_env(monkeypatch, tmp_path), preset="cpu", num_train=5, num_test=2, size=64, dim=2).name


def _status(res) -> dict[str, str]:
    return {e["stage"]: e["status"] for e in res.stages}


def test_run_chain_resumes_and_refuses_stale_outputs(task, capsys):
    res = run_task(task, folds=[0], preset="cpu", overrides=SMOKE, num_tta=1, num_processes=0)
    assert [e["stage"] for e in res.stages] == list(STAGES)
    assert set(_status(res).values()) == {"done"}
    bundle = res.bundle
    assert bundle.name == "RetinaUNetV001_D2V001CPU_2d"
    for f in ("fold0/model_last.pt", "fold0/sweep/params.json", "fold0/val_results/results_boxes.json",
              "consolidated/configs/inference.json", "test_results/results_boxes.json"):
        assert (bundle / f).is_file(), f
    preds = sorted((bundle / "test_predictions").glob("*_boxes.json"))
    assert len(preds) == 2 and all(json.loads(p.read_text())["folds"] == [0] for p in preds)
    assert "FROC_score_IoU_0.10" in res.test_metrics and 0 in res.val_metrics
    log = json.loads((bundle / "run_log.json").read_text())["runs"]
    assert [e["stage"] for e in log] == list(STAGES)

    # rerun: nothing is trained, swept, consolidated or predicted again
    mtimes = {f: (bundle / f).stat().st_mtime_ns for f in ("fold0/model_last.pt", "fold0/sweep/params.json",
                                                           "consolidated/configs/inference.json")}
    pred_mtime = preds[0].stat().st_mtime_ns
    res2 = run_task(task, folds=[0], preset="cpu", overrides=SMOKE, num_tta=1, num_processes=0)
    st = _status(res2)
    assert st["train"] == st["sweep"] == st["consolidate"] == st["predict"] == "reused"
    assert {f: (bundle / f).stat().st_mtime_ns for f in mtimes} == mtimes
    assert preds[0].stat().st_mtime_ns == pred_mtime

    # an interrupted prediction stage resumes: only the missing case is predicted
    preds[1].unlink()
    res3 = run_task(task, folds=[0], preset="cpu", stages=["predict"], num_tta=1)
    assert _status(res3) == {"predict": "done"} and preds[1].is_file()
    assert preds[0].stat().st_mtime_ns == pred_mtime

    # another fold set: fold 1 trains, then the fold-0 consolidated bundle is in the way
    with pytest.raises(FileExistsError, match=r"holds folds \[0\].*--overwrite"):
        run_task(task, folds=[0, 1], preset="cpu", overrides=SMOKE, num_tta=1, num_processes=0)
    assert (bundle / "fold1" / "model_last.pt").is_file()
    assert json.loads((bundle / "consolidated/configs/inference.json").read_text())["folds"] == [0]
    # with --overwrite (through the CLI) it is replaced and the test set is predicted by both folds
    cli.main(["run", task, "--folds", "0", "1", "--preset", "cpu", "--num_tta", "1", "-np", "0", "--overwrite",
              *[x for k, v in SMOKE.items() for x in ("-o", f"{k}={v}")]])
    out = capsys.readouterr().out
    assert "| consolidate | done |" in out and "test set" in out
    assert json.loads((bundle / "consolidated/configs/inference.json").read_text())["folds"] == [0, 1]
    assert all(json.loads(p.read_text())["folds"] == [0, 1] for p in preds)

    # nnDetection's eval flags on the same model: --boxes (the default) and --analyze_boxes
    cli.main(["eval", task, "--plan", "D2V001CPU_2d", "--test", "--boxes", "--analyze_boxes", "--no_plots"])
    out = capsys.readouterr().out
    assert "box analysis (IoU 0.1)" in out and "objects.csv" in out
    summary = json.loads((bundle / "test_results" / "analysis" / "summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["num_objects"] >= 2


def test_run_rejects_unknown_stage_and_plan(task):
    with pytest.raises(ValueError, match="unknown stage"):
        run_task(task, stages=["prep", "deploy"])
    run_task(task, preset="cpu", stages=["prep"], num_processes=0)
    with pytest.raises(FileNotFoundError, match="no plan 'D2V999_2d'"):
        run_task(task, plan="D2V999_2d", stages=["train"])
    with pytest.raises(FileNotFoundError, match="no plan of preset 'default'"):
        run_task(task, preset="default", stages=["train"])  # only the cpu preset was planned
