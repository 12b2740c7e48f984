"""The device script (benchmarks/gpu_check.sh) cannot fail on a typo when the first GPU session runs it: the
script parses, and every flag it passes to our benchmarks is one they accept (the full --dry-run rehearsal
runs every step at tiny sizes: `make gpu-check-dry`)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=30).returncode == 0


def test_every_benchmark_flag_is_accepted():
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = re.findall(r'"\$PY" (benchmarks/\w+\.py)([^\n]*)', text)
    assert {c[0] for c in calls} == {"benchmarks/box_ops.py", "benchmarks/train_step.py", "benchmarks/inference.py"}
    for script, args in calls:
        flags = {a for a in shlex.split(args) if a.startswith("--")}
        help_text = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                                   timeout=120, cwd=ROOT).stdout
        missing = [f for f in flags if f not in help_text]
        assert missing == [], f"{script} does not take {missing}"
