"""Encoder topology (pooling strides, conv kernels, divisible patch) on known cases and invariants."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.plan.topology import decoder_levels, pad_to_multiple, plan_topology


def test_isotropic_128_pools_five_times_to_4():
    t = plan_topology([1.0, 1.0, 1.0], [128, 128, 128], min_feature_map_size=4)
    assert t.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert t.conv_kernels == [[3, 3, 3]] * 6
    assert t.patch_size == [128, 128, 128]
    assert t.must_be_divisible_by == [32, 32, 32]
    assert t.feature_map_sizes()[-1] == [4, 4, 4]


def test_anisotropic_skips_the_coarse_axis_until_spacings_are_close():
    t = plan_topology([3.0, 0.8, 0.8], [40, 192, 192], min_feature_map_size=4)
    # 3 / 0.8 > 2: the first pooling is in-plane only and stage 0 does not convolve across slices
    assert t.strides[1] == [1, 2, 2]
    assert t.conv_kernels[0] == [1, 3, 3]
    # in-plane spacing 1.6 after one pooling: 3 / 1.6 < 2 -> all axes pool, all kernels 3
    assert t.strides[2] == [2, 2, 2]
    assert t.conv_kernels[1] == [3, 3, 3]
    # axis 0: 40 -> 20 -> 10 -> 5 stops (5 < 2 x 4); in-plane 192 -> ... -> 6
    assert t.num_pool_per_axis == [3, 5, 5]
    assert t.feature_map_sizes()[-1] == [5, 6, 6]
    assert t.conv_kernels[-1] == [3, 3, 3]
    for fm in t.feature_map_sizes():
        assert min(fm) >= 4
    assert all(p % d == 0 for p, d in zip(t.patch_size, t.must_be_divisible_by, strict=True))


def test_patch_is_padded_up_to_divisibility():
    t = plan_topology([1.0, 1.0, 1.0], [100, 100, 100], min_feature_map_size=4)
    # 100 -> 50 -> 25 -> 13 -> 7 (7 < 8 stops): 4 poolings, divisible by 16 -> 112
    assert t.num_pool_per_axis == [4, 4, 4]
    assert t.patch_size == [112, 112, 112]


def test_2d_defaults_min_feature_map_8():
    t = plan_topology([1.0, 1.0], [512, 512], min_feature_map_size=8)
    assert t.num_stages == 7  # 512 -> 8 in 6 poolings
    assert t.feature_map_sizes()[-1] == [8, 8]
    assert decoder_levels(t.num_stages, 5) == [2, 3, 4, 5, 6]


def test_decoder_levels():
    assert decoder_levels(6, 4) == [2, 3, 4, 5]  # P2-P5
    assert decoder_levels(5, 4) == [1, 2, 3, 4]
    assert decoder_levels(4, 4) == [1, 2, 3]
    assert decoder_levels(2, 4) == [1]
    assert decoder_levels(8, 4) == [2, 3, 4, 5, 6, 7]  # never starts above level 2


def test_pad_to_multiple():
    assert pad_to_multiple([96, 97, 1], [32, 32, 1]) == [96, 128, 1]


@settings(max_examples=200, deadline=None)
@given(
    spacing=st.lists(st.floats(0.3, 6.0), min_size=2, max_size=3),
    patch=st.lists(st.integers(4, 400), min_size=3, max_size=3),
    m=st.sampled_from([4, 8]),
)
def test_topology_invariants(spacing, patch, m):
    dim = len(spacing)
    patch = patch[:dim]
    t = plan_topology(spacing, patch, m)
    assert len(t.strides) == len(t.conv_kernels) == t.num_stages
    assert t.strides[0] == [1] * dim
    assert t.conv_kernels[-1] == [3] * dim
    div = np.prod(np.asarray(t.strides), axis=0)
    assert list(div) == t.must_be_divisible_by
    for p, q, d in zip(patch, t.patch_size, div, strict=True):
        assert q % d == 0 and p <= q < p + d
    bottleneck = np.asarray(t.patch_size) // div
    for a in range(dim):
        assert bottleneck[a] >= min(m, patch[a])
    # an axis is pooled only while its spacing is < 2 x the finest current spacing
    cur = np.asarray(spacing, dtype=float)
    for s in t.strides[1:]:
        pooled = np.asarray(s) == 2
        assert (cur[pooled] / cur.min() < 2).all()
        cur = cur * np.asarray(s)
