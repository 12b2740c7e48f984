"""A killed run leaves no worker running: pool workers (prep, checks, fingerprint, toy data) and training's
loader workers die with their parent; a rerun after a kill before the planner plots writes them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from planner.prep import PLOTS_DONE, run_prep
from tests.planner.helpers import det_env, toy_task

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from planner import paths

def work(i):
    open(os.path.join({out!r}, f"{{os.getpid()}}.pid"), "w").close()
    time.sleep(60)

if __name__ == "__main__":
    with paths.worker_pool(2) as pool:
        pool.map(work, range(2))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie waiting for its reaper counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_pool_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    parent = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        end = time.monotonic() + 60
        while len(list(tmp_path.glob("*.pid"))) < 2:
            assert time.monotonic() < end, "workers did not start"
            time.sleep(0.1)
        workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        end = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < end:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived their killed parent"
    finally:
        for p in tmp_path.glob("*.pid"):
            try:
                os.kill(int(p.stem), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_rerun_writes_planner_plots_a_killed_run_did_not_finish(tmp_path, monkeypatch):
    det_env(monkeypatch, tmp_path)
    toy_task(tmp_path / "data", num_train=3, num_test=1)
    first = run_prep("000", preset="cpu", preprocess=False)
    analysis = first.plan_files[0].parent / "analysis"
    assert (analysis / PLOTS_DONE).is_file()
    for png in analysis.rglob("*.png"):  # as if the run was killed before the plots were written
        png.unlink()
    (analysis / PLOTS_DONE).unlink()
    again = run_prep("000", preset="cpu", preprocess=False)
    assert again.plots and all(Path(p).is_file() for p in again.plots)
    assert (analysis / PLOTS_DONE).is_file()


def test_a_pool_ends_even_when_the_parent_caught_sigterm(tmp_path):
    """Found in the full suite: after the Deploy app ran in-process (holoscan catches SIGTERM), every later
    pool hung at exit because its forked workers inherited the handler and survived Pool.terminate()."""
    script = tmp_path / "pool.py"
    script.write_text(f"""
import signal, sys
sys.path.insert(0, {str(ROOT)!r})
signal.signal(signal.SIGTERM, lambda *a: None)  # as holoscan does
from planner import paths
with paths.worker_pool(2) as pool:
    print(sum(pool.map(abs, [-1, -2, -3])))
""")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "6", p.stderr
