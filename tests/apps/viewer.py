"""Python side of the headless OHIF check (``tests/apps/viewer/read_sr.mjs``).

The Node script runs OHIF 3.13's own SR reading code, ``@cornerstonejs/adapters`` 5.6.8
(``MeasurementReport.generateToolState``, called as OHIF's ``hydrateStructuredReport`` calls it), on an SR and
the images it references, and prints the Cornerstone tool state as JSON (see the script's header for what it
mirrors and for what an SR needs to come back as ``RectangleROI``s).

* :func:`viewer_skip_reason`: why the check cannot run here (no ``node``, no ``node_modules``), or None.
* :func:`ensure_viewer_installed`: ``npm ci`` from the lock file when ``node_modules`` is missing (CI).
* :func:`ohif_tool_state`: run the script, return its JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

VIEWER_DIR = Path(__file__).resolve().parent / "viewer"
SCRIPT = VIEWER_DIR / "read_sr.mjs"
TIMEOUT_S = 60


def viewer_skip_reason() -> str | None:
    """None when ``node`` is on PATH and ``tests/apps/viewer/node_modules`` exists, else why not."""
    if shutil.which("node") is None:
        return "node is not on PATH (the OHIF SR check needs Node.js)"
    if not (VIEWER_DIR / "node_modules").is_dir():
        return f"{VIEWER_DIR / 'node_modules'} is missing (run `npm ci` in {VIEWER_DIR})"
    return None


def ensure_viewer_installed(timeout_s: float = 600) -> str | None:
    """Install the viewer packages with ``npm ci --no-audit --no-fund`` when ``node_modules`` is missing and
    npm is present; returns :func:`viewer_skip_reason` afterwards (None: ready)."""
    if viewer_skip_reason() is None:
        return None
    if shutil.which("node") is None:
        return viewer_skip_reason()
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not on PATH, cannot install the OHIF SR check's packages"
    try:
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=VIEWER_DIR, capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"npm ci failed: {e}"
    if proc.returncode != 0:
        return f"npm ci failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}"
    return viewer_skip_reason()


def ohif_tool_state(sr_path: str | Path, images_dir: str | Path) -> dict[str, Any]:
    """The tool state OHIF's SR adapters make of ``sr_path`` with the images under ``images_dir``.

    Returns the script's JSON: ``tools`` (tool type -> list of ``{trackingIdentifier,
    trackingUniqueIdentifier, sopInstanceUID, points (world LPS mm), pixelPoints (DICOM column, row), label,
    finding, ...}``), ``counts``, ``groups`` (OHIF's per-group view: graphic type, point count, adapters,
    ``rehydratable``), ``rehydratable`` and ``errors``.

    Raises:
        RuntimeError: the script failed (unreadable SR or images, generateToolState threw) or timed out.
    """
    reason = viewer_skip_reason()
    if reason is not None:
        raise RuntimeError(reason)
    cmd = ["node", str(SCRIPT), str(Path(sr_path).resolve()), str(Path(images_dir).resolve())]
    try:
        proc = subprocess.run(cmd, cwd=VIEWER_DIR, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"read_sr.mjs timed out after {TIMEOUT_S} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"read_sr.mjs failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"read_sr.mjs printed no JSON: {proc.stdout[-500:]!r}") from e
