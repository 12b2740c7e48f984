"""GPU memory estimate without a GPU: monotonicity, plausible range, parameter counting."""

from __future__ import annotations

import dataclasses

import pytest

from planner.plan.memory import (
    CUDA_CONTEXT_BYTES,
    WORKSPACE_OFFSET_BYTES,
    count_parameters,
    estimate_training_memory,
    fpn_channels,
    memory_breakdown,
    stage_channels,
)
from planner.plan.plan import ArchitecturePlan
from planner.plan.topology import decoder_levels, plan_topology

GIB = 2**30


def _arch(spacing, patch, min_fm=4, num_decoder=4, num_classes=1, **kw) -> tuple[ArchitecturePlan, list[int]]:
    t = plan_topology(spacing, patch, min_fm)
    arch = ArchitecturePlan(
        arch_name="RetinaUNetV001", dim=len(spacing), in_channels=1, num_classes=num_classes,
        conv_kernels=t.conv_kernels, strides=t.strides,
        decoder_levels=decoder_levels(t.num_stages, num_decoder), **kw,
    )
    return arch, t.patch_size


def test_default_3d_plan_is_in_a_plausible_range():
    arch, patch = _arch([1.0, 1.0, 1.0], [128, 128, 128])
    total = estimate_training_memory(arch, patch, 4, 27)
    assert 6 * GIB < total < 11 * GIB


def test_bigger_patch_or_batch_needs_more():
    arch, patch = _arch([1.0, 1.0, 1.0], [128, 128, 128])
    base = estimate_training_memory(arch, patch, 4, 27)
    assert estimate_training_memory(arch, patch, 5, 27) > base
    assert estimate_training_memory(arch, [128, 128, 160], 4, 27) > base
    assert estimate_training_memory(arch, patch, 4, 27, amp=False) > base
    small_arch, small_patch = _arch([1.0, 1.0, 1.0], [64, 64, 64])
    assert estimate_training_memory(small_arch, small_patch, 4, 27) < base


def test_breakdown_adds_up_and_activations_scale_with_batch():
    arch, patch = _arch([3.0, 0.8, 0.8], [40, 192, 192])
    one = memory_breakdown(arch, patch, 1, 27)
    two = memory_breakdown(arch, patch, 2, 27)
    parts = [k for k in one if k not in ("total", "num_parameters")]
    assert one["total"] == pytest.approx(sum(one[k] for k in parts), abs=1)
    assert one["cuda_context"] == CUDA_CONTEXT_BYTES and one["workspace_offset"] == WORKSPACE_OFFSET_BYTES
    for k in ("encoder_activations", "decoder_activations", "head_activations", "seg_head_activations",
              "backward_transient"):
        assert two[k] == 2 * one[k]
    assert two["parameters"] == one["parameters"]


def test_channels_follow_the_spec():
    arch, _ = _arch([1.0, 1.0, 1.0], [128, 128, 128])
    assert stage_channels(arch) == [32, 64, 128, 256, 320, 320]
    # fpn 128 from the first decoder level (2) up, halved per level below it
    assert fpn_channels(arch) == [32, 64, 128, 128, 128, 128]


def test_parameter_count_grows_by_one_output_channel_per_class():
    arch, _ = _arch([1.0, 1.0, 1.0], [64, 64, 64])
    more = dataclasses.replace(arch, num_classes=arch.num_classes + 1)
    a = 27
    # one more class = A more classifier output channels: A x head_channels x 3^3 weights + A biases
    assert count_parameters(more, a) - count_parameters(arch, a) == a * arch.head_channels * 27 + a


def test_encoder_parameters_match_torch_layers():
    """The encoder part of the count equals torch's own count for the same conv/norm layers."""
    torch = pytest.importorskip("torch")
    arch, _ = _arch([3.0, 0.8, 0.8], [40, 192, 192])
    layers = []
    c_in = arch.in_channels
    for c, k in zip(stage_channels(arch), arch.conv_kernels, strict=True):
        layers += [torch.nn.Conv3d(c_in, c, k), torch.nn.InstanceNorm3d(c, affine=True),
                   torch.nn.Conv3d(c, c, k), torch.nn.InstanceNorm3d(c, affine=True)]
        c_in = c
    expected = sum(p.numel() for layer in layers for p in layer.parameters())
    no_enc = dataclasses.replace(arch, start_channels=0, max_channels=0)
    # with zero encoder channels only the non-encoder parts (and zero-size encoder layers) remain
    enc_count = count_parameters(arch, 27) - count_parameters(no_enc, 27)
    lateral = sum(c * f for c, f in zip(stage_channels(arch), fpn_channels(arch), strict=True))
    assert enc_count == expected + lateral
