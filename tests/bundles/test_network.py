"""Retina U-Net network: output shapes for 3D/2D/anisotropic plans, channel rules, head init."""

from __future__ import annotations

import math

import pytest
import torch

from bundles.retinaunet_template.scripts.network import (
    RetinaUNet,
    count_parameters,
    decoder_channels,
    encoder_channels,
)

TINY = {"start_channels": 4, "max_channels": 16, "fpn_channels": 8, "head_channels": 8}


def _net(dim, strides, decoder_levels, kernels=None, num_classes=2, num_anchors=27, in_channels=1):
    kernels = kernels or [[3] * dim for _ in strides]
    return RetinaUNet(
        dim, in_channels, num_classes, kernels, strides, decoder_levels, num_anchors=num_anchors, **TINY
    )


def _expected_level_shapes(size, strides, levels):
    shapes, cum = [], list(size)
    for s, st in enumerate(strides):
        cum = [c // v for c, v in zip(cum, st, strict=True)]
        if s in levels:
            shapes.append(cum)
    return shapes


@pytest.mark.parametrize(
    ("dim", "strides", "levels", "kernels", "size", "in_ch"),
    [
        (3, [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [1, 2, 3], None, (32, 32, 16), 1),
        (2, [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]], [2, 3, 4], None, (64, 48), 2),
        (
            3,
            [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
            [2, 3],
            [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
            (16, 32, 32),
            1,
        ),
    ],
    ids=["3d", "2d", "3d-anisotropic"],
)
def test_output_shapes(dim, strides, levels, kernels, size, in_ch):
    num_classes, num_anchors = 2, 27 if dim == 3 else 9
    net = _net(dim, strides, levels, kernels, num_classes, num_anchors, in_channels=in_ch)
    out = net(torch.randn(2, in_ch, *size))
    expected = _expected_level_shapes(size, strides, levels)
    assert [tuple(t.shape) for t in out["cls_logits"]] == [
        (2, num_anchors * num_classes, *s) for s in expected
    ]
    assert [tuple(t.shape) for t in out["box_regression"]] == [
        (2, num_anchors * 2 * dim, *s) for s in expected
    ]
    assert tuple(out["seg_logits"].shape) == (2, 2, *size)
    cum = [1] * dim
    level_strides = []
    for s, st in enumerate(strides):
        cum = [c * v for c, v in zip(cum, st, strict=True)]
        if s in levels:
            level_strides.append(cum)
    assert net.level_strides() == level_strides


def test_channel_rules():
    assert encoder_channels(6, 32, 320) == [32, 64, 128, 256, 320, 320]
    # below the first decoder level channels halve per level; P0 exists for segmentation
    assert decoder_channels(6, [2, 3, 4, 5], 128) == [32, 64, 128, 128, 128, 128]
    assert decoder_channels(5, [4], 32) == [8, 8, 8, 16, 32]  # min 8


def test_encoder_uses_plan_strides_and_instance_norm():
    net = _net(3, [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [1, 2], [[1, 3, 3], [3, 3, 3], [3, 3, 3]])
    stage1 = net.encoder.stages[1]
    assert tuple(stage1.conv1.conv.stride) == (1, 2, 2)
    assert tuple(stage1.conv2.conv.stride) == (1, 1, 1)
    assert tuple(net.encoder.stages[0].conv1.conv.kernel_size) == (1, 3, 3)
    assert isinstance(stage1.norm1, torch.nn.InstanceNorm3d) and stage1.norm1.affine
    # transposed-conv upsampling with kernel = stride of the coarser level
    assert isinstance(net.decoder.up[0].conv, torch.nn.ConvTranspose3d)
    assert tuple(net.decoder.up[0].conv.stride) == (1, 2, 2)


def test_prior_probability_bias_and_head_init():
    net = _net(3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [1, 2], num_classes=3)
    bias = net.cls_head.out_conv.bias
    assert torch.allclose(bias, torch.full_like(bias, -math.log(99.0)))
    w = net.cls_head.out_conv.weight
    assert abs(w.std().item() - 0.01) < 0.002
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16, 16))
    probs = torch.sigmoid(out["cls_logits"][0])
    # head weights are tiny, so the initial foreground probability is the prior 0.01
    assert abs(probs.mean().item() - 0.01) < 0.002
    groups = net.cls_head.convs[0].adn.N
    assert isinstance(groups, torch.nn.GroupNorm)


def test_regression_scale_per_level_is_learnable():
    net = _net(2, [[1, 1], [2, 2], [2, 2]], [1, 2], num_anchors=4)
    assert len(net.reg_scales) == 2
    x = torch.randn(1, 1, 16, 16)
    out = net(x)
    sum(t.sum() for t in out["box_regression"]).backward()
    assert all(s.scale.grad is not None and s.scale.grad.abs() > 0 for s in net.reg_scales)
    with torch.no_grad():
        net.reg_scales[1].scale.fill_(2.0)
        again = net(x)["box_regression"]
    assert torch.allclose(again[0], out["box_regression"][0].detach())
    assert torch.allclose(again[1], 2 * out["box_regression"][1].detach(), atol=1e-6)


def test_all_parameters_receive_gradients():
    net = _net(2, [[1, 1], [2, 2], [2, 2]], [1, 2], num_anchors=4)
    out = net(torch.randn(2, 1, 16, 16))
    loss = (
        sum(t.float().pow(2).mean() for t in out["cls_logits"] + out["box_regression"])
        + out["seg_logits"].mean()
    )
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []


def test_indivisible_input_is_a_clear_error():
    net = _net(2, [[1, 1], [2, 2], [2, 2]], [1, 2], num_anchors=4)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 18, 16))


def test_bad_plan_is_rejected():
    with pytest.raises(ValueError, match="decoder_levels"):
        _net(2, [[1, 1], [2, 2]], [2])
    with pytest.raises(ValueError, match="entries"):
        _net(3, [[1, 1], [2, 2]], [1])


def test_count_parameters():
    net = _net(2, [[1, 1], [2, 2]], [1], num_anchors=4)
    total = sum(p.numel() for p in net.parameters())
    assert count_parameters(net) == total
    net.seg_head.conv.weight.requires_grad_(False)
    assert count_parameters(net) == total - net.seg_head.conv.weight.numel()
    assert count_parameters(net, trainable_only=False) == total
