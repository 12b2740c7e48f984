"""Encoder topology from spacing and patch size (nnU-Net's ``get_pool_and_conv_props``, as nnDetection uses it).

Our own implementation of the rule: at every step, pool (stride 2) the axes whose current spacing
is less than twice the finest current spacing and whose current feature map is at least twice the
minimal bottleneck size; the convolution of that stage uses kernel 3 on the largest group of axes
whose spacings are within a factor 2 of each other and kernel 1 elsewhere (so very coarse axes are
not convolved across before the field of view reaches them). The bottleneck stage always uses
kernel 3. Finally the patch is padded up to a multiple of the total stride per axis.

All lists are in transposed axis order (the order of the preprocessed arrays).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_NUM_POOL = 999  # per axis (nnDetection: effectively unlimited)
POOL_SPACING_RATIO = 2.0  # an axis pools only while its spacing is < 2 x the finest current spacing
KERNEL_PARTNER_RATIO = 2.0  # axes within this spacing ratio of each other get kernel 3


@dataclass(frozen=True)
class Topology:
    """Encoder stages for one patch size.

    Attributes:
        strides: [num_stages][dim] stride of the first conv of each stage; stage 0 is all ones.
        conv_kernels: [num_stages][dim] kernel size of both convs of each stage.
        num_pool_per_axis: [dim] number of stride-2 steps per axis.
        must_be_divisible_by: [dim] total stride per axis (2**num_pool).
        patch_size: [dim] the patch padded up to a multiple of ``must_be_divisible_by``.
    """

    strides: list[list[int]]
    conv_kernels: list[list[int]]
    num_pool_per_axis: list[int]
    must_be_divisible_by: list[int]
    patch_size: list[int]

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    def feature_map_sizes(self) -> list[list[int]]:
        """[num_stages][dim] feature map size of each stage for ``patch_size``."""
        cum = np.cumprod(np.asarray(self.strides, dtype=np.int64), axis=0)
        return [[int(x) for x in np.asarray(self.patch_size) // c] for c in cum]


def _kernel_axes(spacing: Sequence[float]) -> list[int]:
    """Largest group of axes whose spacings are pairwise-ish within ``KERNEL_PARTNER_RATIO`` of one axis."""
    best: list[int] = []
    for s in spacing:
        group = [i for i, t in enumerate(spacing) if max(t / s, s / t) < KERNEL_PARTNER_RATIO]
        if len(group) > len(best):
            best = group
    return best


def pad_to_multiple(shape: Sequence[int], divisor: Sequence[int]) -> list[int]:
    """Round every axis up to the next multiple of its divisor (unchanged if already a multiple)."""
    return [int(-(-int(s) // int(d)) * int(d)) for s, d in zip(shape, divisor, strict=True)]


def plan_topology(
    spacing_transposed: Sequence[float],
    patch_size: Sequence[int],
    min_feature_map_size: int,
    max_num_pool: int = MAX_NUM_POOL,
) -> Topology:
    """Pooling strides and conv kernels per encoder stage, and the divisible patch size.

    Args:
        spacing_transposed: [dim] target spacing (mm), transposed order.
        patch_size: [dim] requested patch (voxels).
        min_feature_map_size: minimal edge of the bottleneck feature map (3D 4, 2D 8).
        max_num_pool: maximal number of poolings per axis.

    Returns:
        The :class:`Topology`; every stage's feature map is >= ``min_feature_map_size`` on every
        axis that was pooled (axes too small to pool keep their size).
    """
    dim = len(spacing_transposed)
    spacing = [float(s) for s in spacing_transposed]
    size = [float(p) for p in patch_size]
    num_pool = [0] * dim
    strides: list[list[int]] = [[1] * dim]
    kernels: list[list[int]] = []
    while True:
        finest = min(spacing)
        axes3 = _kernel_axes(spacing)
        kernel = [3 if a in axes3 else 1 for a in range(dim)]
        pool_axes = [
            a
            for a in range(dim)
            if spacing[a] / finest < POOL_SPACING_RATIO
            and size[a] >= 2 * min_feature_map_size
            and num_pool[a] < max_num_pool
        ]
        # the kernel computed at this spacing belongs to the stage that still works at this resolution
        kernels.append(kernel)
        if not pool_axes:
            break
        stride = [2 if a in pool_axes else 1 for a in range(dim)]
        for a in pool_axes:
            num_pool[a] += 1
            spacing[a] *= 2
            size[a] = float(np.ceil(size[a] / 2))
        strides.append(stride)
    # the bottleneck stage always convolves every axis
    kernels[-1] = [3] * dim
    divisor = [2**n for n in num_pool]
    return Topology(
        strides=strides,
        conv_kernels=kernels,
        num_pool_per_axis=num_pool,
        must_be_divisible_by=divisor,
        patch_size=pad_to_multiple(patch_size, divisor),
    )


def decoder_levels(num_stages: int, num_decoder_levels: int, min_decoder_level: int = 2) -> list[int]:
    """Stages whose FPN maps feed the heads: ``range(min(max(1, n - k), min_level), n)``.

    With 6 stages and k = 4 this is [2, 3, 4, 5] (P2-P5); small networks start at level 1.
    """
    start = min(max(1, num_stages - num_decoder_levels), min_decoder_level)
    return list(range(start, num_stages))
