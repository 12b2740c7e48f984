"""Fold checkpoints follow the user's umask (ignite's atomic DiskSaver makes them 0600 plus group/other read
whatever the umask), like every other file we write (issue 18.5)."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest
import torch

from bundles.retinaunet_template.scripts.handlers import FoldCheckpoint


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_model_last_follows_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        ckpt = FoldCheckpoint(tmp_path / "fold0", {"network": torch.nn.Linear(2, 2)})
        ckpt.engine = SimpleNamespace(state=SimpleNamespace(epoch=1, iteration=5))
        ckpt.save_last(finished=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(ckpt.last_file.stat().st_mode) == 0o666 & ~mask
    assert torch.load(ckpt.last_file, weights_only=True)["iteration"] == 5
