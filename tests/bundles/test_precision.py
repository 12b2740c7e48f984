"""The ``amp`` switch: float16 on CUDA, bfloat16 on a CPU with native support, float32 otherwise."""

from __future__ import annotations

import logging

import pytest
import torch

from bundles.retinaunet_template.scripts import precision


@pytest.fixture(autouse=True)
def fresh_cache():
    precision.cpu_bf16.cache_clear()
    yield
    precision.cpu_bf16.cache_clear()


def test_dtype_per_device_and_switch(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision.amp_dtype("cuda") is torch.float16
    assert precision.amp_dtype("cpu") is torch.bfloat16
    assert precision.amp_dtype("cpu", amp=False) is None and precision.amp_dtype("cuda", amp=False) is None
    with precision.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    with precision.autocast("cpu", amp=False):
        assert not torch.is_autocast_enabled("cpu")


def test_cpu_without_native_bf16_stays_float32_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        assert precision.amp_dtype("cpu") is None
    assert "neither AVX512-BF16 nor AMX" in caplog.text
    with precision.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_environment_switch_turns_the_cpu_part_off(monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("det_cpu_amp", "0")
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        assert precision.amp_dtype("cpu") is None
    assert "det_cpu_amp=0" in caplog.text
    assert precision.amp_dtype("cuda") is torch.float16  # the GPU part is the config's amp alone


def test_losses_stay_float32_under_bf16_autocast():
    from bundles.retinaunet_template.scripts.losses import SegLoss, bce_onehot_loss, giou_loss

    logits = torch.randn(6, 2, dtype=torch.bfloat16)
    boxes = torch.tensor([[0, 0, 0, 4, 4, 4], [1, 1, 1, 5, 6, 7]], dtype=torch.bfloat16)
    seg = torch.randn(1, 2, 4, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bce_onehot_loss(logits, torch.tensor([0, 1, 2, 0, 1, 0])).dtype is torch.float32
        assert giou_loss(boxes, boxes.flip(0)).dtype is torch.float32
        assert all(v.dtype is torch.float32 for v in SegLoss()(seg, torch.ones(1, 1, 4, 4, 4)).values())


def test_channels_last_only_for_3d_bfloat16_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision.memory_format("cpu", True, 3) is torch.channels_last_3d
    assert precision.memory_format("cpu", True, 2) is torch.contiguous_format
    assert precision.memory_format("cpu", False, 3) is torch.contiguous_format  # float32: not measured faster
    assert precision.memory_format("cuda", True, 3) is torch.contiguous_format
    monkeypatch.setenv("det_channels_last", "0")
    assert precision.memory_format("cpu", True, 3) is torch.contiguous_format
