"""DDP training of one fold on 2 CPU processes (gloo, torchrun) against one process, resume included.

Why a tolerance and not equality: the two ranks together see exactly the single-process batch (same patches,
same augmentation: tested exactly in tests/bundles/test_distributed.py), and DDP averages the gradients, but
each rank normalises its losses over its own half of the batch (number of positive anchors for the box
regression, sampled anchors for the classifier, batch Dice over its patches) and draws its own hard negatives
(seeded from (seed, iteration, rank)). The voxel-mean cross-entropy of the segmentation is the one loss whose
average over equal halves is the single-process value, so it must agree closely (1 %); the summed loss within
5 % per epoch (measured in float32: 0.1-0.8 % on this schedule; bfloat16 autocast, the default on CPUs that
have it, rounds differently on each rank's half but stays inside the same bounds). Resume of a DDP run from its own checkpoint is
deterministic (gloo sums two tensors in a fixed order) and must give the same log as the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from planner.prep import run_prep
from planner.toy import generate_example
from tests.planner.helpers import det_env
from workflow.models import bundle_for
from workflow.train import torchrun_command

PLAN = "D3V001CPU_3d"
SCHEDULE = {"fold": 0, "epochs": 2, "iterations": 4, "warmup": 2, "swa_epochs": 1, "num_workers": 0}
TIMEOUT_S = 300
REL_WEIGHT_DIFF = 0.05  # final weights, DDP vs one process: ||w_ddp - w_1|| / ||w_1|| (measured 0.021, float32)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp = pytest.MonkeyPatch()
    det_env(mp, root, num_threads=1)
    generate_example(root / "data", preset="cpu", num_train=8, num_test=0, size=32)
    run_prep("000", preset="cpu")
    yield bundle_for("000", plan=PLAN)
    mp.undo()


def _copy(bundle, name):
    dst = bundle.parent / name
    shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns("fold*"))
    return dst


def _single(bundle, overrides):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(bundle / "configs/train.json"), "--meta_file", str(bundle / "configs/metadata.json"),
           "--bundle_root", str(bundle)]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    _run(cmd, bundle)


def _ddp(bundle, overrides, n=2):
    _run(torchrun_command(bundle, overrides, n), bundle)


def _run(cmd, cwd):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-4000:]


def _log(bundle):
    return json.loads((bundle / "fold0" / "train_log.json").read_text())


def _weights(bundle):
    return torch.load(bundle / "fold0" / "model_last.pt", map_location="cpu", weights_only=True)["network"]


@pytest.fixture(scope="module")
def runs(bundle):
    single, ddp = _copy(bundle, "single"), _copy(bundle, "ddp")
    _single(single, SCHEDULE)
    _ddp(ddp, SCHEDULE)
    return single, ddp


def test_ddp_loss_trajectory_matches_one_process(runs):
    single, ddp = (_log(b) for b in runs)
    assert [e["epoch"] for e in ddp] == [1, 2, 3] == [e["epoch"] for e in single]  # each epoch logged once
    for a, b in zip(single, ddp, strict=True):
        assert b["train_seg_ce_loss"] == pytest.approx(a["train_seg_ce_loss"], rel=0.01), (a, b)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05), (a, b)
        # validation patches are split over the ranks and gathered: same set, so the same count-weighted loss
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=0.05), (a, b)
    w1, w2 = _weights(runs[0]), _weights(runs[1])
    assert w1.keys() == w2.keys()  # no "module." prefix: the checkpoint is rank-independent
    diff = sum(float((w1[k].float() - w2[k].float()).norm() ** 2) for k in w1) ** 0.5
    norm = sum(float(w1[k].float().norm() ** 2) for k in w1) ** 0.5
    assert 0 < diff / norm < REL_WEIGHT_DIFF, diff / norm


def test_only_rank_zero_writes(runs):
    single, ddp = runs
    for b in (single, ddp):
        assert (b / "fold0" / "model_best.pt").is_file() and (b / "fold0" / "training_curves.png").is_file()
    events = [sorted(p.name.split(".")[-2] for p in (b / "fold0" / "tensorboard").iterdir()) for b in runs]
    assert len(events[1]) == len(events[0]) >= 1  # a second rank would add its own event files
    last = torch.load(ddp / "fold0" / "model_last.pt", map_location="cpu", weights_only=True)
    assert last["finished"] and last["epoch"] == 3 and last["iteration"] == 12
    assert int(last["swa_model"]["n_averaged"]) == 1  # SWA averaged once (epoch 3), on the plain network


def test_ddp_resume_equals_uninterrupted_and_resumes_with_another_world_size(bundle, runs):
    ddp_log = _log(runs[1])
    part = _copy(bundle, "ddp_resumed")
    _ddp(part, {**SCHEDULE, "train#trainer#max_epochs": 1})  # stops after epoch 1: the "interrupted" run
    assert [e["epoch"] for e in _log(part)] == [1]
    _ddp(part, SCHEDULE)  # resumes from model_last.pt at epoch 1
    resumed = _log(part)
    assert [e["epoch"] for e in resumed] == [1, 2, 3]
    for a, b in zip(ddp_log, resumed, strict=True):
        for k in ("train_loss", "val_loss", "train_cls_loss", "train_reg_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a, b)
    w_full, w_res = _weights(runs[1]), _weights(part)
    assert all(torch.allclose(w_full[k].float(), w_res[k].float(), atol=1e-6) for k in w_full)

    # a DDP checkpoint resumed by one process (and the other way round works the same: it is the same file)
    other = _copy(bundle, "ddp_then_single")
    _ddp(other, {**SCHEDULE, "train#trainer#max_epochs": 1})
    _single(other, SCHEDULE)
    log = _log(other)
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert log[0]["train_loss"] == pytest.approx(ddp_log[0]["train_loss"], rel=1e-6)  # epoch 1 was the DDP run's
    for a, b in zip(ddp_log[1:], log[1:], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05), (a, b)
