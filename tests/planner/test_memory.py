"""GPU memory estimate without a GPU: monotonicity, plausible range, and the network facts it reads
off the template's network (channels, convs, parameter count), which follow network.py when it changes."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from planner.bundle import TEMPLATE_DIR
from planner.plan import network_facts as nf
from planner.plan.memory import (
    CUDA_CONTEXT_BYTES,
    WORKSPACE_OFFSET_BYTES,
    count_parameters,
    estimate_training_memory,
    memory_breakdown,
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
              "loss_activations"):
        assert two[k] == pytest.approx(2 * one[k], abs=2)
    # the matcher works on one image at a time: the peak's transient grows with the batch, but less than 2x
    assert one["peak_transient"] < two["peak_transient"] < 2 * one["peak_transient"]
    assert two["parameters"] == one["parameters"] and two["weight_copies"] == one["weight_copies"]


def test_channels_and_layers_are_read_from_the_network():
    arch, _ = _arch([1.0, 1.0, 1.0], [128, 128, 128])
    facts = nf.network_facts(arch, 27)
    # nnDetection's rules, as the template's network implements them: encoder 32 x 2**s capped at 320,
    # FPN 128 from the first decoder level (2) up, halved per level below it
    assert facts.encoder_channels == (32, 64, 128, 256, 320, 320)
    assert facts.fpn_channels == (32, 64, 128, 128, 128, 128)
    assert facts.encoder_convs == (2,) * 6
    assert facts.fpn_output_levels == (0, 2, 3, 4, 5)  # decoder levels and P0 (segmentation)
    assert (facts.cls_head_convs, facts.reg_head_convs, facts.head_channels) == (2, 2, 128)
    assert (facts.cls_out_channels, facts.reg_out_channels, facts.seg_classes) == (27 * 1, 27 * 6, 2)
    assert memory_breakdown(arch, [128, 128, 128], 4, 27)["num_parameters"] == facts.num_parameters


def test_parameter_count_grows_by_one_output_channel_per_class():
    arch, _ = _arch([1.0, 1.0, 1.0], [64, 64, 64])
    more = dataclasses.replace(arch, num_classes=arch.num_classes + 1)
    a = 27
    # one more class = A more classifier output channels: A x head_channels x 3^3 weights + A biases
    assert count_parameters(more, a) - count_parameters(arch, a) == a * arch.head_channels * 27 + a


@pytest.mark.parametrize(("spacing", "patch", "num_decoder", "num_classes", "kw"), [
    ([1.0, 1.0, 1.0], [128, 128, 128], 4, 1, {}),
    ([3.0, 0.8, 0.8], [40, 192, 192], 4, 3, {"in_channels": 2}),
    ([1.0, 1.0], [256, 256], 5, 2, {"start_channels": 12, "max_channels": 120, "fpn_channels": 48,
                                    "head_channels": 48}),
])
def test_count_equals_the_built_networks(spacing, patch, num_decoder, num_classes, kw):
    """The count is torch's count of the same network built for real (initialised, on the CPU)."""
    in_channels = kw.pop("in_channels", 1)
    arch, _ = _arch(spacing, patch, 4 if len(spacing) == 3 else 8, num_decoder, num_classes, **kw)
    arch = dataclasses.replace(arch, in_channels=in_channels)
    a = 3 ** len(spacing)
    net = nf.build_network(arch, a, device="cpu")
    assert {p.device.type for p in net.parameters()} == {"cpu"}
    assert count_parameters(arch, a) == sum(p.numel() for p in net.parameters())
    assert nf.measure(net) == nf.network_facts(arch, a)  # meta (init skipped) and real builds agree


def test_meta_build_is_cached_per_architecture():
    arch, patch = _arch([1.0, 1.0, 1.0], [96, 96, 96])
    arch = dataclasses.replace(arch, start_channels=24)  # an architecture no other test builds
    nf._facts.cache_clear()
    for p in ([96, 96, 96], [96, 96, 64], [64, 96, 96]):
        memory_breakdown(arch, p, 2, 27)
    memory_breakdown(dataclasses.replace(arch, class_weight=[0.5, 0.5]), patch, 2, 27)  # not a network argument
    assert nf._facts.cache_info().misses == 1
    memory_breakdown(dataclasses.replace(arch, num_classes=2), patch, 2, 27)
    assert nf._facts.cache_info().misses == 2
    assert {p.device.type for p in nf.build_network(arch, 27).parameters()} == {"meta"}


def test_network_is_the_template_file_loaded_privately():
    module = nf.network_module()
    assert Path(module.__file__) == TEMPLATE_DIR / "scripts" / "network.py" == nf.NETWORK_FILE
    assert module.__name__ not in sys.modules  # executed by path, no package registered
    assert nf.network_module() is module  # loaded once


def _edited_network(tmp_path: Path, old: str, new: str) -> Path:
    text = nf.NETWORK_FILE.read_text()
    assert text.count(old) == 1, f"network.py no longer contains {old!r}: update this test's edit"
    path = tmp_path / "network.py"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(("old", "new", "changed"), [
    # the encoder's channel rule: start * 2**s -> start * 2**s + 8 (capped)
    ("return [min(start_channels * 2**s, max_channels)", "return [min(start_channels * 2**s + 8, max_channels)",
     "encoder_channels"),
    # one more conv+GN+ReLU block in every head tower
    ("seg_classes: int = 2,\n        num_head_convs: int = 2,", "seg_classes: int = 2,\n        num_head_convs: int = 3,",
     "cls_head_convs"),
    # output convs on every FPN level (as nnDetection builds them)
    ("self.decoder = UFPN(dim, enc_ch, dec_ch, conv_kernels, strides, [0, *self.decoder_levels])",
     "self.decoder = UFPN(dim, enc_ch, dec_ch, conv_kernels, strides, list(range(num_stages)))",
     "fpn_output_levels"),
])
def test_a_changed_network_changes_the_planner(tmp_path, monkeypatch, old, new, changed):
    """Edit a rule in (a copy of) network.py: the planner's facts, count and estimate follow it."""
    arch, patch = _arch([1.0, 1.0, 1.0], [128, 128, 128])  # decoder levels 2..5: level 1 has no output conv
    before_facts = nf.network_facts(arch, 27)
    before = memory_breakdown(arch, patch, 4, 27)
    edited = _edited_network(tmp_path, old, new)
    monkeypatch.setattr(nf, "NETWORK_FILE", edited)
    facts = nf.network_facts(arch, 27)
    assert getattr(facts, changed) != getattr(before_facts, changed)
    real = nf.build_network(arch, 27, device="cpu", network_file=edited)
    assert count_parameters(arch, 27) == sum(p.numel() for p in real.parameters()) != before["num_parameters"]
    assert memory_breakdown(arch, patch, 4, 27)["total"] > before["total"]


def test_saved_activations_follow_cuda_autocast_rules():
    """The meta pass counts, per voxel of a level, what CUDA AMP keeps: the encoder's conv output and norm/ReLU
    output in fp16 (InstanceNorm is on no autocast list), the heads' GroupNorm in fp32 (CUDA's float32 list:
    the fp32 copy of its input, its fp32 output, the next conv's fp16 cast = 10 bytes per channel)."""
    arch, _ = _arch([1.0, 1.0, 1.0], [128, 128, 128])
    facts = nf.network_facts(arch, 27)
    amp = nf.network_saved_activations(arch, 27, amp=True)
    fp32 = nf.network_saved_activations(arch, 27, amp=False)
    enc, dec, heads, seg = amp.per_voxel
    # stage 0: 2 convs x (conv output + norm/ReLU output) x 32 channels x 2 bytes, + the fp16 cast of the image
    assert enc[0] == 2 * 2 * 32 * 2 + arch.in_channels * 2
    assert fp32.per_voxel[0][0] == 2 * 2 * 32 * 4  # no cast of the image in fp32
    assert dec == tuple(c * 2 for c in facts.fpn_channels)  # the merged map of every level
    towers = facts.cls_head_convs + facts.reg_head_convs
    for lv in arch.decoder_levels:  # FPN output, towers, the regression output kept by its Scale
        assert heads[lv] == 128 * 2 + towers * 128 * (4 + 4 + 2) + facts.reg_out_channels * 2
    assert seg[0] == facts.fpn_channels[0] * 2 and not any(seg[1:])  # P0, kept by the 1x1 seg head
    # the convs keep the fp16 copy of their weight for backward (not of their bias: its gradient needs none)
    assert amp.weight_copies == 2 * sum(m.weight.numel() for m in nf.build_network(arch, 27).modules()
                                        if isinstance(m, torch.nn.modules.conv._ConvNd))
    assert fp32.weight_copies == 0
