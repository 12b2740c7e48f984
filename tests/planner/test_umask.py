"""Everything nndet_prep writes is readable by whoever the user's umask allows (atomic writes used to give
0600 files and 0700 folders whatever the umask, so a shared det_data was unreadable to colleagues)."""

from __future__ import annotations

import os
import stat

import pytest

from planner.io import make_temp_dir, save_json
from planner.prep import run_prep
from tests.planner.helpers import det_env, toy_task


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_files_and_temp_folders_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    f = save_json({"a": 1}, tmp_path / "x.json")
    d = make_temp_dir(prefix=".t", dir=tmp_path)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask


def test_prep_outputs_are_group_and_world_readable_with_umask_022(tmp_path, monkeypatch, umask):
    umask(0o022)
    det_env(monkeypatch, tmp_path)
    toy_task(tmp_path / "data", num_train=3, num_test=1)
    run_prep("000", preset="cpu")
    bad = []
    for root in (tmp_path / "data", tmp_path / "models"):
        for p in root.rglob("*"):
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode & 0o044 != 0o044 or (p.is_dir() and mode & 0o011 != 0o011):
                bad.append(f"{p.relative_to(tmp_path)} {oct(mode)}")
    assert bad == []
