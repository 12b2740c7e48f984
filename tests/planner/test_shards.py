"""Shards of cases over processes (``planner.shards``): the round-robin split, the device of each process (GPU
count mocked), and the processes themselves: each gets its device's environment, a failing or dying shard is
reported without stopping the others, and no shard outlives a killed parent."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from planner.shards import ShardDevice, WrittenCounter, assign_devices, run_shards, split_round_robin
from tests.planner.test_kill import kill_parent_and_check_children

ROOT = Path(__file__).resolve().parents[2]


def test_round_robin_of_the_sorted_items():
    assert split_round_robin(["c", "a", "e", "b", "d"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert split_round_robin(["b", "a"], 4) == [["a"], ["b"]]  # never an empty shard
    assert split_round_robin([], 3) == []
    assert split_round_robin([{"id": 2}, {"id": 1}], 2, key=lambda d: d["id"]) == [[{"id": 1}], [{"id": 2}]]
    with pytest.raises(ValueError, match="at least 1"):
        split_round_robin(["a"], 0)


@pytest.mark.parametrize("count", [2, 3, 8])
def test_one_gpu_per_process_when_there_are_enough(monkeypatch, count):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    devices = assign_devices(2)
    assert [d.device for d in devices] == ["cuda:0", "cuda:1"] and [d.index for d in devices] == [0, 1]
    assert [d.local_device for d in devices] == ["cuda:0", "cuda:0"]  # each process sees only its own
    assert all(d.threads is None for d in devices)
    assert [d.device for d in assign_devices(count, device_count=count)] == [f"cuda:{k}" for k in range(count)]


def test_fewer_gpus_than_processes_is_an_error_naming_the_count(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(ValueError, match=r"--gpus 3: .*needs 3 CUDA devices, but 2 are visible "
                                         r"\(CUDA_VISIBLE_DEVICES=3,5\); ask for at most 2"):
        assign_devices(3)
    with pytest.raises(ValueError, match="at least 1"):
        assign_devices(0, device_count=0)


def test_cpu_processes_share_the_cores_when_there_is_no_gpu(monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with caplog.at_level(logging.INFO, logger="planner.shards"):
        devices = assign_devices(3, cores=8)
    assert [(d.device, d.threads) for d in devices] == [("cpu", 2)] * 3
    assert "no CUDA device: 3 CPU process(es) with 2 torch thread(s) each" in caplog.text
    assert [d.threads for d in assign_devices(4, cores=2)] == [1] * 4  # at least one thread each
    monkeypatch.setenv("det_torch_threads", "6")  # default cores: det_torch_threads
    assert [d.threads for d in assign_devices(2)] == [3, 3]
    # device="cpu" keeps the GPUs out of it
    assert [d.device for d in assign_devices(2, device="cpu", device_count=4, cores=4)] == ["cpu", "cpu"]


def test_a_process_sees_only_its_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert ShardDevice(1, "cuda:1").environ() == {"CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # the parent's k-th visible GPU
    assert ShardDevice(1, "cuda:1").environ() == {"CUDA_VISIBLE_DEVICES": "6"}
    assert ShardDevice(0, "cpu", 3).environ() == {"det_torch_threads": "3", "CUDA_VISIBLE_DEVICES": ""}


def report_env(items, device, tag):
    """A shard: what its process is and sees."""
    return {"items": items, "device": device, "tag": tag, "pid": os.getpid(),
            "threads": os.environ.get("det_torch_threads"), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "tqdm": os.environ.get("TQDM_DISABLE")}


def fail_or_die(items, device):
    if items == ["raise"]:
        raise OSError("disk full")
    if items == ["die"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return items


def test_each_shard_runs_in_its_own_process_with_its_device():
    devices = [ShardDevice(0, "cpu", 1), ShardDevice(1, "cpu", 1)]
    outcomes = run_shards(report_env, [["a", "c"], ["b"]], devices, ("x",))
    got = [o.result for o in outcomes]
    assert [o.error for o in outcomes] == [None, None] and [o.items for o in outcomes] == [["a", "c"], ["b"]]
    assert [g["items"] for g in got] == [["a", "c"], ["b"]] and {g["tag"] for g in got} == {"x"}
    assert {g["device"] for g in got} == {"cpu"} and {g["threads"] for g in got} == {"1"}
    assert {g["cuda"] for g in got} == {""} and {g["tqdm"] for g in got} == {"1"}  # one progress bar: the parent's
    assert len({g["pid"] for g in got} | {os.getpid()}) == 3
    assert "TQDM_DISABLE" not in os.environ or os.environ["TQDM_DISABLE"] != "1"  # the parent's env is restored


def test_a_failing_or_dying_shard_does_not_stop_the_others():
    devices = [ShardDevice(k, "cpu", 1) for k in range(3)]
    outcomes = run_shards(fail_or_die, [["raise"], ["ok"], ["die"]], devices)
    assert outcomes[0].result is None and outcomes[0].error == "OSError: disk full"
    assert outcomes[1].result == ["ok"] and outcomes[1].error is None
    assert outcomes[2].result is None and "SIGKILL" in outcomes[2].error


def test_progress_counts_the_outputs_written_since_the_start(tmp_path):
    old, new, later = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "later.json"
    old.write_text("{}")
    t0 = old.stat().st_mtime_ns + 1
    count = WrittenCounter([old, new, later], t0)
    assert count() == 0  # an output of an earlier run is not progress
    new.write_text("{}")
    os.utime(new, ns=(t0, t0))
    assert count() == 1 and count.pending == [old, later]
    later.write_text("{}")
    os.utime(later, ns=(t0 + 5, t0 + 5))
    assert count() == 2


SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from planner.shards import assign_devices, run_shards

def work(items, device):
    open(os.path.join({out!r}, f"{{os.getpid()}}.pid"), "w").close()
    time.sleep(60)

if __name__ == "__main__":
    run_shards(work, [["a"], ["b"]], assign_devices(2, device="cpu"))
"""


def test_shards_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    log = tmp_path / "stderr.txt"  # the killed parent's resource tracker warns about its queue's semaphores
    with log.open("w") as err:
        parent = subprocess.Popen([sys.executable, str(script)], start_new_session=True, stderr=err)
    kill_parent_and_check_children(parent, tmp_path, start_s=120, what="shards", log=log)
