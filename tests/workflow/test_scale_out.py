"""nndet_train's torchrun lines (--gpus / --nnodes), GPU checks and the fold scheduler (--folds)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from workflow import train as train_mod
from workflow.train import FoldJob, check_gpus, device_slots, fold_command, run_jobs, torchrun_command


def _fake_cuda(monkeypatch, count):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_torchrun_line_of_one_node(tmp_path):
    cmd = torchrun_command(tmp_path, {"fold": 2, "epochs": 3, "amp": False, "patch_size": [8, 8, 8]}, gpus=4)
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone"]
    i = cmd.index("monai.bundle")
    assert cmd[i - 1] == "-m" and cmd[i + 1:i + 3] == ["run", "training"]
    configs = ast.literal_eval(cmd[cmd.index("--config_file") + 1])
    assert configs == [str(tmp_path / "configs/train.json"), str(tmp_path / "configs/multi_gpu_train.json")]
    assert cmd[cmd.index("--bundle_root") + 1] == str(tmp_path)
    # python-fire reads these back as the values: True/False capitalised, lists as literals
    assert cmd[cmd.index("--fold") + 1] == "2" and cmd[cmd.index("--amp") + 1] == "False"
    assert ast.literal_eval(cmd[cmd.index("--patch_size") + 1]) == [8, 8, 8]
    assert "--nnodes" not in cmd


def test_torchrun_line_of_several_nodes(tmp_path):
    cmd = torchrun_command(tmp_path, {"fold": 0}, gpus=8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500")
    head = cmd[:cmd.index("-m", 3)]
    assert head[3:] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--rdzv_endpoint",
                        "node0:29500"]
    assert "--standalone" not in cmd
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(tmp_path, {}, gpus=2, nnodes=2)
    with pytest.raises(ValueError, match="node_rank 2"):
        torchrun_command(tmp_path, {}, gpus=2, nnodes=2, node_rank=2, rdzv_endpoint="h:1")
    with pytest.raises(ValueError, match=">= 1"):
        torchrun_command(tmp_path, {}, gpus=0)


def test_gpu_count_checks(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    assert check_gpus(2) == "cpu"
    _fake_cuda(monkeypatch, 2)
    assert check_gpus(2) == "cuda"
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        check_gpus(4)


def test_device_slots(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    assert device_slots() == [None]
    _fake_cuda(monkeypatch, 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_slots() == ["0", "1", "2", "3"]
    assert device_slots(2) == ["0,1", "2,3"]
    assert device_slots(3) == ["0,1,2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7,5")  # the user's choice is kept, in its order
    assert device_slots() == ["4", "6", "7", "5"]
    with pytest.raises(ValueError, match="only 4 CUDA"):
        device_slots(5)


def test_fold_command_is_nndet_train_of_one_fold():
    cmd = fold_command("000", 3, {"epochs": 2, "exp.fold": 1, "lr": "0.01", "amp": False}, plan="D3V001CPU_3d",
                       resume=False, gpus=2)
    assert cmd[:2] == [sys.executable, "-c"] and "train_main" in cmd[2]
    args = cmd[3:]
    assert args[:3] == ["000", "--fold", "3"]
    assert ["-o", "epochs=2"] == args[3:5] and "exp.fold=1" not in " ".join(args)  # --fold wins
    assert "amp=false" in args and "lr=0.01" in args
    assert args[-5:] == ["--plan", "D3V001CPU_3d", "--no_resume", "--gpus", "2"]


def _job(tmp_path, fold, seconds, code=0):
    """A job that records when it ran and what CUDA_VISIBLE_DEVICES it saw, then exits with ``code``."""
    script = (f"import json, os, time; t0 = time.time(); time.sleep({seconds}); "
              f"json.dump([t0, time.time(), os.environ.get('CUDA_VISIBLE_DEVICES')], "
              f"open({str(tmp_path / f'job{fold}.json')!r}, 'w')); raise SystemExit({code})")
    return FoldJob(fold, [sys.executable, "-c", script], log_file=tmp_path / "logs" / f"fold{fold}.log")


def _spans(tmp_path, folds):
    return [json.loads((tmp_path / f"job{f}.json").read_text()) for f in folds]


def test_without_gpus_folds_run_one_after_another_and_a_failure_does_not_stop_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "untouched")
    jobs = run_jobs([_job(tmp_path, 0, 0.3), _job(tmp_path, 1, 0.3, code=3), _job(tmp_path, 2, 0.3)], [None])
    assert [j.returncode for j in jobs] == [0, 3, 0]
    spans = _spans(tmp_path, [0, 1, 2])
    assert all(a[1] <= b[0] for a, b in zip(spans[:-1], spans[1:], strict=True))  # no overlap: sequential
    assert [s[2] for s in spans] == ["untouched"] * 3  # the CPU slot sets no device
    assert all(j.log_file is None for j in jobs)  # one slot: the job writes to the terminal


def test_with_gpus_folds_run_at_once_one_per_device(tmp_path):
    jobs = run_jobs([_job(tmp_path, f, 1.0) for f in range(4)], ["0", "1"])
    assert all(j.ok for j in jobs)
    spans = _spans(tmp_path, range(4))
    assert sorted(s[2] for s in spans) == ["0", "0", "1", "1"]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # jobs 0 and 1 overlapped
    # from the jobs' own start/end stamps, not wall time (a loaded CI machine slows start-up): never more
    # than one job per device at once, so never more than two at once
    for dev in ("0", "1"):
        mine = sorted((a, b) for a, b, d in spans if d == dev)
        assert mine[0][1] <= mine[1][0], f"two jobs at once on device {dev}: {mine}"
    for a, _, _ in spans:
        assert sum(1 for s0, s1, _ in spans if s0 <= a < s1) <= 2
    assert all(Path(j.log_file).is_file() for j in jobs)


def test_train_folds_reports_failed_folds_after_running_all(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_jobs(jobs, slots):
        calls.append(([j.fold for j in jobs], slots))
        for j in jobs:
            j.returncode, j.seconds = (1 if j.fold == 1 else 0), 1.0
        return jobs

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "train.json").write_text(json.dumps({"epochs": 1}))
    monkeypatch.setattr(train_mod, "bundle_for", lambda task, model, plan: bundle)
    monkeypatch.setattr(train_mod, "run_jobs", fake_run_jobs)
    with pytest.raises(train_mod.FoldsFailed, match=r"1 of 3 fold\(s\) failed \(fold 1: exit code 1"):
        train_mod.train_folds("000", [0, 1, 2, 1], overrides={"epochs": 1}, slots=[None])
    assert calls == [([0, 1, 2], [None])]
    table = capsys.readouterr().out
    assert "FAILED (1)" in table and table.count(" ok ") == 2
    with pytest.raises(ValueError, match="unknown override"):
        train_mod.train_folds("000", [0, 1], overrides={"epochz": 1}, slots=[None])


def test_cli_passes_gpus_and_nodes_through(monkeypatch):
    from workflow.cli import stages

    seen = {}
    monkeypatch.setattr(stages, "train", lambda task, **kw: seen.update(kw) or Path("/x/fold0"))
    stages.train_main(["000", "--fold", "1", "--gpus", "4", "--nnodes", "2", "--node_rank", "1", "--rdzv_endpoint",
                       "h:29500"])
    assert (seen["fold"], seen["gpus"], seen["nnodes"], seen["node_rank"], seen["rdzv_endpoint"]) == \
        (1, 4, 2, 1, "h:29500")
    ran = {}
    monkeypatch.setattr("workflow.train.train_folds", lambda task, folds, **kw: ran.update(folds=folds, **kw))
    monkeypatch.setattr("workflow.models.bundle_for", lambda task, model, plan: Path("/x"))
    stages.train_main(["000", "--folds", "0", "1", "2", "--gpus", "2"])
    assert ran["folds"] == [0, 1, 2] and ran["gpus"] == 2
    with pytest.raises(SystemExit):
        stages.train_main(["000", "--folds", "0", "1", "--nnodes", "2"])


@pytest.mark.parametrize("script", ["train_fold_multinode.sbatch", "train_folds_array.sbatch"])
def test_slurm_examples_are_valid_bash_and_run_our_commands(script):
    import subprocess

    path = Path(__file__).resolve().parents[2] / "docs" / "slurm" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    assert "#SBATCH" in text and "srun" in text
    if "multinode" in script:
        # the overlay pair, node rank per srun task, node 0 as the rendezvous
        assert "torchrun" in text and "['configs/train.json','configs/multi_gpu_train.json']" in text
        assert "--node_rank \\$SLURM_NODEID" in text and "--rdzv_endpoint $HEAD:$PORT" in text
    else:
        assert "--array=0-4" in text and '--fold "$SLURM_ARRAY_TASK_ID"' in text
