"""`nndet run --plans all` and `nndet_find_best` on a task where the low-resolution plan exists (objects larger
than the cpu preset's patch): both plans trained (a few steps), swept and compared with their ensemble on the
same out-of-fold cases, the choice written and consolidated."""

from __future__ import annotations

import json

import pytest

from tests.planner.helpers import cube_case, det_env, write_task
from workflow import cli

SMOKE = ["-o", "epochs=1", "-o", "iterations=2", "-o", "warmup=1", "-o", "swa_epochs=1", "-o", "num_workers=0"]


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    root = tmp_path_factory.mktemp("find_best")
    mp = pytest.MonkeyPatch()
    det_env(mp, root, num_threads=0)
    cases = [cube_case(f"case_{i}", (48, 48, 48), [(4 + i, 5, 6, 40 + i, 41, 42)], seed=i) for i in range(5)]
    write_task(root / "data", "Task103D3_Big", cases=cases, labels={"0": "big"})
    cli.run_main(["103", "--preset", "cpu", "--plans", "all", "--folds", "0", "--num_tta", "1", "-np", "0", *SMOKE])
    yield root
    mp.undo()


def test_every_plan_and_the_ensemble_are_scored_and_the_winner_consolidated(chosen, capsys):
    best = json.loads((chosen / "models" / "Task103D3_Big" / "best_configuration.json").read_text())
    assert best["plans"] == ["D3V001CPU_3d", "D3V001CPU_3dlr1"]
    assert set(best["candidates"]) == {"D3V001CPU_3d", "D3V001CPU_3dlr1", "ensemble"}
    assert best["cases"] == 1 and best["folds"] == [0]
    objective = {k: v["objective"] for k, v in best["candidates"].items()}
    assert objective[best["best"]] == max(objective.values())
    winner = best["consolidated_plan"]
    assert winner in best["plans"] and (best["best"] == winner or best["best"] == "ensemble")
    assert (chosen / "models" / "Task103D3_Big" / f"RetinaUNetV001_{winner}" / "consolidated" / "configs" /
            "inference.json").is_file()
    for r in best["candidates"].values():
        assert {"AP_IoU_0.10_MaxDet_100", "FROC_score_IoU_0.10", "per_class"} <= set(r)


def test_a_plans_score_in_original_voxels_equals_its_own_validation_metrics(chosen, monkeypatch):
    """IoU does not change under per-axis scaling: a plan's row (original voxels) equals nndet_eval's metrics of
    its fold (preprocessed voxels of that plan)."""
    from workflow.evaluate import evaluate_fold

    det_env(monkeypatch, chosen, num_threads=0)
    best = json.loads((chosen / "models" / "Task103D3_Big" / "best_configuration.json").read_text())
    for pid in best["plans"]:
        m = evaluate_fold("103", 0, plan=pid, plots=False)
        for k in ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100"):
            assert best["candidates"][pid][k] == pytest.approx(m[k], abs=1e-6), (pid, k)


def test_find_best_command_prints_the_table_and_needs_trained_plans(chosen, monkeypatch, capsys):
    det_env(monkeypatch, chosen, num_threads=0)
    cli.main(["find_best", "103", "--folds", "0", "--no_consolidate"])
    out = capsys.readouterr().out
    assert "| candidate | objective |" in out and "**best**" in out and "ensemble" in out
    with pytest.raises(SystemExit):
        cli.main(["find_best", "103", "--folds", "3"])
