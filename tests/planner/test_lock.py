"""One run per task and stage: a second nndet_prep (or nndet_train of the same fold) refuses while the first
runs, naming its pid and host; a lock left by a killed run is taken over (issue 18.6)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from planner.io import TaskLocked, exclusive_lock
from planner.prep import run_prep
from tests.planner.helpers import det_env, toy_task


def test_a_second_holder_is_refused_with_pid_and_host(tmp_path):
    lock = tmp_path / ".x.lock"
    with exclusive_lock(lock, "nndet_prep of Task000"):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid()
        # another live process of this host holds it: use a child that sleeps
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            lock.write_text(json.dumps({**holder, "pid": child.pid}))
            with pytest.raises(TaskLocked, match=rf"already running \(pid {child.pid} on host {socket.gethostname()}"):
                with exclusive_lock(lock, "nndet_prep of Task000"):
                    pass
        finally:
            child.kill()
            child.wait()
    assert lock.exists()  # not ours any more (we rewrote it as the child's): left alone


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    lock = tmp_path / ".x.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": time.time()}))
    with caplog.at_level("WARNING"), exclusive_lock(lock, "x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and not lock.exists()


def test_prep_refuses_while_another_prep_of_the_task_runs(tmp_path, monkeypatch):
    det_env(monkeypatch, tmp_path)
    task = toy_task(tmp_path / "data", num_train=3, num_test=1)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (task / ".nndet_prep.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                           "started": time.time()}))
        with pytest.raises(TaskLocked, match="nndet_prep of Task000D3_Example is already running"):
            run_prep("000", preset="cpu", preprocess=False)
        assert not (task / "preprocessed").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    run_prep("000", preset="cpu", preprocess=False)  # the holder is gone: taken over
    assert not (task / ".nndet_prep.lock").exists()


def test_a_second_nndet_train_of_a_running_fold_refuses_and_other_folds_may_run(tmp_path, monkeypatch):
    """Two real ``nndet_train`` runs of fold 0 at once: the second refuses (exit 2, the first's pid named) and
    writes nothing; fold 1's lock is free meanwhile; after the first is stopped the fold can be taken again."""
    from workflow.models import bundle_for

    det_env(monkeypatch, tmp_path, num_threads=0)
    toy_task(tmp_path / "data", num_train=6, num_test=0)
    run_prep("000", preset="cpu")
    bundle = bundle_for("000", plan="D3V001CPU_3d")
    long = ["-o", "epochs=500", "-o", "iterations=4", "-o", "warmup=1", "-o", "swa_epochs=0", "-o", "num_workers=0"]
    first = subprocess.Popen([sys.executable, "-c", "import sys; from workflow.cli import train_main; "
                              "train_main(sys.argv[1:])", "000", "--plan", "D3V001CPU_3d", "--fold", "0", *long],
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.err", "w"))
    lock = bundle / ".fold0.train.lock"
    try:
        deadline = time.time() + 120
        while not (bundle / "fold0" / "model_last.pt").is_file():  # it holds the lock and has saved an epoch
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.err").read_text()[-3000:]
            time.sleep(0.5)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = subprocess.run([sys.executable, "-c", "import sys; from workflow.cli import train_main; "
                                 "train_main(sys.argv[1:])", "000", "--plan", "D3V001CPU_3d", "--fold", "0", *long],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"already running (pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first one goes on
        with exclusive_lock(bundle / ".fold1.train.lock", "nndet_train of fold 1"):
            pass  # another fold is not locked by fold 0's run
    finally:
        first.terminate()
        first.wait(timeout=60)
    # the first run is gone (its lock released, or left stale by the signal): the fold can be trained again
    with exclusive_lock(lock, "nndet_train of fold 0"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
