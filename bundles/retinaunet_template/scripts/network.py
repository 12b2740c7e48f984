"""Retina U-Net network for 2D and 3D from the plan's topology (layout of nnDetection's ``RetinaUNetV001``).

The network only maps images to per-level maps; anchors, matching, losses and postprocessing live in
``detector.py`` (MONAI's split between network and detector).

Layout of the outputs (B batch, A anchors per location, C foreground classes, dim spatial dims):

- ``cls_logits``: one tensor per decoder level, ``[B, A * C, *level_spatial]``; channel ``a * C + c``
  is anchor ``a``, class ``c``.
- ``box_regression``: one tensor per decoder level, ``[B, A * 2 * dim, *level_spatial]``; channel
  ``a * 2 * dim + k`` is anchor ``a``, delta ``k`` (BoxCoder order: centre offsets, then log sizes).
- ``seg_logits``: ``[B, seg_classes, *input_spatial]`` from the full-resolution map P0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UnetBasicBlock
from torch import nn

INSTANCE_NORM = ("instance", {"affine": True, "eps": 1e-5})
RELU = ("relu", {"inplace": True})
GN_CHANNELS_PER_GROUP = 16
MIN_FPN_CHANNELS = 8
PRIOR_PROB = 0.01
HEAD_INIT_STD = 0.01


def encoder_channels(num_stages: int, start_channels: int = 32, max_channels: int = 320) -> list[int]:
    """Channels of each encoder stage: ``start * 2**s`` capped at ``max_channels``."""
    return [min(start_channels * 2**s, max_channels) for s in range(num_stages)]


def decoder_channels(num_stages: int, decoder_levels: Sequence[int], fpn_channels: int = 128) -> list[int]:
    """FPN channels per level: ``fpn_channels`` from the first decoder level up, halved per level below
    it (at least 8), so that the full-resolution level P0 exists for the segmentation head."""
    first = min(decoder_levels)
    return [
        fpn_channels if lvl >= first else max(MIN_FPN_CHANNELS, fpn_channels // 2 ** (first - lvl))
        for lvl in range(num_stages)
    ]


def _conv(
    dim: int, cin: int, cout: int, kernel: Sequence[int] | int, stride: Sequence[int] | int = 1
) -> Convolution:
    """Plain convolution (bias, no norm/act) with 'same' padding."""
    return Convolution(dim, cin, cout, strides=stride, kernel_size=kernel, conv_only=True, bias=True)


class Encoder(nn.Module):
    """Strided-conv encoder: per stage 2x (conv -> InstanceNorm(affine) -> ReLU), first conv strided.

    MONAI's ``UnetBasicBlock`` is exactly this block (nnU-Net's StackedConvBlock2 without dropout).
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        conv_kernels: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        channels: Sequence[int],
    ) -> None:
        super().__init__()
        stages = []
        cin = in_channels
        for kernel, stride, cout in zip(conv_kernels, strides, channels, strict=True):
            stages.append(
                UnetBasicBlock(dim, cin, cout, kernel, stride, norm_name=INSTANCE_NORM, act_name=RELU)
            )
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class UFPN(nn.Module):
    """U-Net-like FPN decoder: lateral 1x1, transposed-conv top-down path, output conv per used level.

    Output convs exist only for the levels somebody reads (decoder levels and P0); nnDetection also
    builds them for unused intermediate levels, whose outputs are discarded (same predictions).
    """

    def __init__(
        self,
        dim: int,
        enc_channels: Sequence[int],
        out_channels: Sequence[int],
        conv_kernels: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        output_levels: Sequence[int],
    ) -> None:
        super().__init__()
        n = len(enc_channels)
        self.output_levels = sorted(set(output_levels))
        self.lateral = nn.ModuleList(_conv(dim, enc_channels[s], out_channels[s], 1) for s in range(n))
        # up[s] maps level s+1 to level s: a transposed conv with kernel = stride = strides[s+1]
        # (MONAI's Convolution with is_transposed; padding 0 gives exactly in * stride).
        self.up = nn.ModuleList(
            Convolution(
                dim,
                out_channels[s + 1],
                out_channels[s],
                strides=strides[s + 1],
                kernel_size=strides[s + 1],
                conv_only=True,
                is_transposed=True,
                padding=0,
                output_padding=0,
            )
            for s in range(n - 1)
        )
        self.out = nn.ModuleDict(
            {
                str(s): _conv(dim, out_channels[s], out_channels[s], conv_kernels[s])
                for s in self.output_levels
            }
        )

    def forward(self, feats: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        inner = self.lateral[-1](feats[-1])
        outs: dict[int, torch.Tensor] = {}
        top = len(feats) - 1
        if top in self.output_levels:
            outs[top] = self.out[str(top)](inner)
        for s in range(top - 1, -1, -1):
            lat = self.lateral[s](feats[s])
            upsampled = self.up[s](inner)
            if upsampled.shape[2:] != lat.shape[2:]:
                raise ValueError(
                    f"FPN level {s}: upsampled shape {tuple(upsampled.shape[2:])} != lateral shape "
                    f"{tuple(lat.shape[2:])}; the input size must be divisible by the product of the strides"
                )
            inner = lat + upsampled
            if s in self.output_levels:
                outs[s] = self.out[str(s)](inner)
        return outs


class Scale(nn.Module):
    """Learnable scalar multiplier (one per decoder level for the regression head)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class SharedHead(nn.Module):
    """Head shared over levels: 2x (conv3 -> GroupNorm(16 ch/group) -> ReLU), then an output conv3."""

    def __init__(
        self, dim: int, in_channels: int, head_channels: int, out_channels: int, num_convs: int = 2
    ) -> None:
        super().__init__()
        groups = max(1, head_channels // GN_CHANNELS_PER_GROUP)
        layers = []
        cin = in_channels
        for _ in range(num_convs):
            layers.append(
                Convolution(
                    dim, cin, head_channels, kernel_size=3, act=RELU, norm=("group", {"num_groups": groups})
                )
            )
            cin = head_channels
        self.convs = nn.Sequential(*layers)
        self.out = _conv(dim, head_channels, out_channels, 3)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.normal_(m.weight, std=HEAD_INIT_STD)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def out_conv(self) -> nn.Module:
        return self.out.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.convs(x))


class RetinaUNet(nn.Module):
    """Retina U-Net as nnDetection builds it: encoder, UFPN decoder, shared cls/reg heads, fg/bg seg head.

    Args:
        dim: 2 or 3 spatial dims.
        in_channels: image channels (modalities).
        num_classes: foreground classes C (classifier outputs per anchor, no background channel).
        conv_kernels: per encoder stage kernel size per axis (plan order).
        strides: per encoder stage stride per axis; stage 0 is all ones.
        decoder_levels: stage indices whose FPN maps feed the detection heads.
        start_channels, max_channels: encoder width (start * 2**s, capped).
        fpn_channels: FPN channels on the decoder levels and above.
        head_channels: channels of the head convs.
        num_anchors: anchors per location A.
        seg_classes: segmentation head outputs (2: bg/fg).
        num_head_convs: conv+GN+ReLU blocks before each head's output conv.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        num_classes: int,
        conv_kernels: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        decoder_levels: Sequence[int],
        start_channels: int = 32,
        max_channels: int = 320,
        fpn_channels: int = 128,
        head_channels: int = 128,
        num_anchors: int = 27,
        seg_classes: int = 2,
        num_head_convs: int = 2,
    ) -> None:
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if len(conv_kernels) != len(strides):
            raise ValueError(
                f"conv_kernels ({len(conv_kernels)}) and strides ({len(strides)}) differ in stages"
            )
        if any(len(k) != dim for k in conv_kernels) or any(len(s) != dim for s in strides):
            raise ValueError(f"every kernel and stride needs {dim} entries: {conv_kernels}, {strides}")
        num_stages = len(strides)
        if not decoder_levels or min(decoder_levels) < 0 or max(decoder_levels) >= num_stages:
            raise ValueError(f"decoder_levels {list(decoder_levels)} must lie in 0..{num_stages - 1}")
        self.dim = dim
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.decoder_levels = [int(x) for x in decoder_levels]
        self.strides = [[int(v) for v in s] for s in strides]

        enc_ch = encoder_channels(num_stages, start_channels, max_channels)
        dec_ch = decoder_channels(num_stages, self.decoder_levels, fpn_channels)
        self.encoder = Encoder(dim, in_channels, conv_kernels, strides, enc_ch)
        self.decoder = UFPN(dim, enc_ch, dec_ch, conv_kernels, strides, [0, *self.decoder_levels])
        self.cls_head = SharedHead(
            dim, fpn_channels, head_channels, num_anchors * num_classes, num_head_convs
        )
        self.reg_head = SharedHead(dim, fpn_channels, head_channels, num_anchors * 2 * dim, num_head_convs)
        self.reg_scales = nn.ModuleList(Scale() for _ in self.decoder_levels)
        self.seg_head = _conv(dim, dec_ch[0], seg_classes, 1)
        nn.init.constant_(self.cls_head.out_conv.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def level_strides(self) -> list[list[int]]:
        """Cumulative stride (per axis) of every decoder level w.r.t. the input."""
        cum = [1] * self.dim
        out = []
        for s, stride in enumerate(self.strides):
            cum = [c * v for c, v in zip(cum, stride, strict=True)]
            if s in self.decoder_levels:
                out.append(list(cum))
        return out

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Args: images ``[B, in_channels, *spatial]``. Returns the dict in the module docstring."""
        feats = self.decoder(self.encoder(images))
        levels = [feats[s] for s in self.decoder_levels]
        return {
            "cls_logits": [self.cls_head(f) for f in levels],
            "box_regression": [
                scale(self.reg_head(f)) for scale, f in zip(self.reg_scales, levels, strict=True)
            ],
            "seg_logits": self.seg_head(feats[0]),
        }


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
