"""Shared fixtures: nnDetection env variables in tmp folders and tiny toy tasks (session-scoped).

The session tasks are shared between tests: treat them as read-only (``tests.planner.helpers.copy_task``
gives a private copy to modify).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.planner.helpers import toy_task


@dataclass(frozen=True)
class DetEnv:
    data: Path
    models: Path


@pytest.fixture()
def det_env(tmp_path, monkeypatch) -> DetEnv:
    """``det_data`` / ``det_models`` pointing at fresh tmp folders (created)."""
    env = DetEnv(tmp_path / "det_data", tmp_path / "det_models")
    env.data.mkdir()
    env.models.mkdir()
    monkeypatch.setenv("det_data", str(env.data))
    monkeypatch.setenv("det_models", str(env.models))
    return env


@pytest.fixture(scope="session")
def toy_task_3d(tmp_path_factory) -> Path:
    """Task000D3_Example, cpu preset at 32^3: 4 train + 2 test cases."""
    return toy_task(tmp_path_factory.mktemp("toy3d"), dim=3, size=32)


@pytest.fixture(scope="session")
def toy_task_2d(tmp_path_factory) -> Path:
    """Task001D2_Example, cpu preset at 48^2: 4 train + 2 test cases."""
    return toy_task(tmp_path_factory.mktemp("toy2d"), dim=2, size=48)


@pytest.fixture(scope="session")
def ct_like_task(tmp_path_factory) -> Path:
    """Anisotropic CT-like task: spacing ~(0.8, 0.8, 3.0) mm with +-10 % per-case jitter, HU intensities."""
    return toy_task(tmp_path_factory.mktemp("ctlike"), dim=3, size=40, spacing=(0.8, 0.8, 3.0), modality="CT",
                    spacing_jitter=0.1, task_name="Task101D3_CTLike")
