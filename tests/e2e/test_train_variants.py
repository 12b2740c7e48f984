"""Plans that differ train through the same bundle template without code changes: a 2D task, a
multi-modal multi-class 3D task and a low-resolution plan (a few steps each on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from planner.prep import run_prep
from planner.toy import generate_example
from tests.planner.helpers import SMOKE_SCHEDULE as SMOKE
from tests.planner.helpers import cube_case, det_env, write_task
from workflow.train import run_training


@pytest.fixture()
def env(tmp_path, monkeypatch):
    return det_env(monkeypatch, tmp_path)


def _check_fold(fold_dir, in_channels: int, dim: int) -> None:
    last = torch.load(fold_dir / "model_last.pt", weights_only=True)
    assert last["finished"] and last["iteration"] == 2 * SMOKE["iterations"]
    first_conv = next(v for k, v in last["network"].items() if k.endswith("weight") and v.ndim == dim + 2)
    assert first_conv.shape[1] == in_channels
    log = json.loads((fold_dir / "train_log.json").read_text())
    assert len(log) == 2 and all(np.isfinite(e["train_loss"]) and np.isfinite(e["val_loss"]) for e in log)


def test_2d_task_trains_with_nndet_train_and_with_monai_bundle_run(env):
    task = generate_example(env, preset="cpu", num_train=5, num_test=1, size=64, dim=2)
    (plan,) = run_prep(task.name, preset="cpu").plans
    assert plan.plan_id == "D2V001CPU_2d"
    fold0 = run_training(task.name, fold=0, overrides=SMOKE, plan=plan.plan_id)
    _check_fold(fold0, in_channels=1, dim=2)
    # the README's equivalent command, run in the bundle folder as a user would
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--meta_file", "configs/metadata.json", "--bundle_root", ".", "--fold", "1",
           *[x for k, v in SMOKE.items() for x in (f"--{k}", str(v))]]
    done = subprocess.run(cmd, cwd=fold0.parent, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_fold(fold0.parent / "fold1", in_channels=1, dim=2)

    # the inference chain works for 2D too: sweep, validation metrics, 2-fold test prediction, test metrics
    from workflow.evaluate import evaluate_fold, evaluate_test
    from workflow.predict import predict_test
    from workflow.sweep import sweep_fold

    sweep_fold(task.name, 0, plan=plan.plan_id, num_tta=4)
    assert "AP_IoU_0.10_MaxDet_100" in evaluate_fold(task.name, 0, plan=plan.plan_id, plots=False)
    out = predict_test(task.name, plan=plan.plan_id, num_tta=1)
    (pred,) = [json.loads(f.read_text()) for f in out.glob("*_boxes.json")]
    assert pred["folds"] == [0, 1] and all(len(b) == 4 for b in pred["boxes"])
    assert "FROC_score_IoU_0.10" in evaluate_test(task.name, plan=plan.plan_id, plots=False)


def test_multimodal_multiclass_task_trains(env):
    cases = []
    for i in range(5):
        lo = 3 + i
        cases.append(cube_case(f"case_{i}", (24, 24, 24), [(lo, lo, 4, lo + 6, lo + 7, 10), (14, 4, 14, 20, 10, 21)],
                               classes=[i % 3, (i + 1) % 3], num_modalities=2, seed=i))
    write_task(env, "Task102D3_MultiModal", cases=cases, modalities={"0": "T1", "1": "CT"},
               labels={"0": "a", "1": "b", "2": "c"})
    (plan,) = run_prep("102", preset="cpu").plans
    assert plan.architecture.in_channels == 2 and plan.architecture.num_classes == 3
    assert plan.normalization_schemes == ["nonCT", "CT"]
    _check_fold(run_training("102", fold=1, overrides=SMOKE, plan=plan.plan_id), in_channels=2, dim=3)


def test_lowres_plan_trains(env):
    # objects of 36 voxels exceed the cpu preset's 32^3 patch: the planner adds the low-resolution plan
    cases = [cube_case(f"case_{i}", (48, 48, 48), [(4 + i, 5, 6, 40 + i, 41, 42)], seed=i) for i in range(5)]
    write_task(env, "Task103D3_Big", cases=cases, labels={"0": "big"})
    plans = run_prep("103", preset="cpu").plans
    assert [p.mode for p in plans] == ["3d", "3dlr1"]
    lowres = plans[1]
    assert lowres.plan_id == "D3V001CPU_3dlr1" and lowres.target_spacing == [2.0, 2.0, 2.0]
    _check_fold(run_training("103", fold=0, overrides=SMOKE, plan=lowres.plan_id), in_channels=1, dim=3)
