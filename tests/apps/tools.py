"""External programs the DICOM tests use (dciodvfy, node): skipped with the reason on a developer machine
that lacks them, a failure under CI (``CI=true``), whose ``.ci/run`` installs them from Debian."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

INSTALL_HINT = "apt-get install dicom3tools nodejs npm dcmtk orthanc (what .ci/run installs)"


def require(program: str) -> str:
    """The path of ``program``; skips the test (fails it under CI) when it is not on PATH."""
    path = shutil.which(program)
    if path is None:
        message = f"{program} is not installed: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def dciodvfy_errors(path: str | Path) -> list[str]:
    """The ``Error`` lines dicom3tools' ``dciodvfy`` prints for one DICOM file (warnings are not errors)."""
    exe = require("dciodvfy")
    p = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (p.stdout + p.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]
