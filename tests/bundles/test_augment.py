"""Augmentation: instance ids survive spatial transforms, footprints cover the transform, flips move boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bundles.retinaunet_template.scripts.augment import (
    DetectionAugmentation,
    footprint_size,
    rotation_matrix,
)
from bundles.retinaunet_template.scripts.data import boxes_from_instance_map

NO_INTENSITY = dict(p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_gamma_inverted=0, p_gamma=0)


def _instance_volume(shape, rng, n=5):
    seg = np.zeros(shape, dtype=np.int32)
    for i in range(1, n + 1):
        lo = [rng.integers(0, s - 6) for s in shape]
        seg[tuple(slice(a, a + int(rng.integers(3, 6))) for a in lo)] = i
    seg[(slice(0, 2),) * len(shape)] = -1
    return seg


def test_rotation_matrix_orthonormal():
    for angles in ([0.3], [0.1, -0.4, 1.2]):
        r = rotation_matrix(angles)
        np.testing.assert_allclose(r @ r.T, np.eye(len(r)), atol=1e-12)
        assert np.isclose(np.linalg.det(r), 1.0)


def test_footprint_identity_and_parity():
    assert footprint_size((64, 48, 33), None) == (64, 48, 33)
    size = footprint_size((64, 48, 33), rotation_matrix([0.2, 0.3, 0.1]) * 1.3, margin=2)
    assert all((s - p) % 2 == 0 and s >= p for s, p in zip(size, (64, 48, 33), strict=True))


def test_generator_patch_size_covers_every_draw():
    aug = DetectionAugmentation(dim=3, p_rotation=1, p_scale=1)
    patch = (40, 32, 24)
    gen = np.asarray(aug.generator_patch_size(patch))
    rng = np.random.default_rng(0)
    for _ in range(300):
        assert np.all(np.asarray(aug.input_size(patch, aug.sample_spatial(rng))) <= gen)
    # 45 degrees in 2D: the bound is the rotated square's diagonal, times the 1/0.7 scale
    g2 = DetectionAugmentation(dim=2, rotation_deg=45).generator_patch_size((100, 100))
    assert g2[0] >= math.ceil(99 * math.sqrt(2) / 0.7)


def test_dummy_2d_keeps_the_slow_axis():
    aug = DetectionAugmentation(dim=3, p_rotation=1, p_scale=1, dummy_2d_axis=0)
    rng = np.random.default_rng(1)
    for _ in range(20):
        m = aug.sample_spatial(rng)
        np.testing.assert_allclose(m[0], [1, 0, 0], atol=1e-12)
        np.testing.assert_allclose(m[:, 0], [1, 0, 0], atol=1e-12)
    assert aug.generator_patch_size((8, 64, 64))[0] == 8 + 2 * 2


@pytest.mark.parametrize("dim", [2, 3])
def test_spatial_keeps_instance_ids_exact(dim):
    rng = np.random.default_rng(dim)
    patch = (24,) * dim
    aug = DetectionAugmentation(dim=dim, p_rotation=1, p_scale=1, **NO_INTENSITY, p_mirror=0)
    for _ in range(5):
        m = aug.sample_spatial(rng)
        size = aug.input_size(patch, m)
        seg = _instance_volume(size, rng)[None] * 1000  # large ids: no rounding tricks
        img = rng.normal(size=(2, *size)).astype(np.float32)
        out_img, out_seg = aug.spatial(img, seg, patch, m)
        assert out_img.shape == (2, *patch) and out_seg.shape == (1, *patch)
        assert out_seg.dtype == np.int32
        assert set(np.unique(out_seg)) <= set(np.unique(seg)) | {-1}


def test_identity_is_exact_centre_crop_and_scale_zooms_out():
    aug = DetectionAugmentation(dim=3, **NO_INTENSITY, p_mirror=0)
    seg = np.zeros((1, 30, 30, 30), np.int32)
    seg[0, 13:17, 13:17, 13:17] = 3
    img = seg.astype(np.float32)
    i, s = aug.spatial(img, seg, (20, 20, 20), None)
    np.testing.assert_array_equal(s, seg[:, 5:25, 5:25, 5:25])
    _, s2 = aug.spatial(img, seg, (20, 20, 20), np.eye(3) * 2.0)
    assert 0 < (s2 == 3).sum() < (s == 3).sum()  # scale > 1 shows more field of view: the object shrinks


def test_border_is_minus_one_then_removed():
    aug = DetectionAugmentation(dim=2, **NO_INTENSITY, p_mirror=0)
    seg = np.full((1, 20, 20), 2, np.int32)
    img = np.ones((1, 20, 20), np.float32)
    m = rotation_matrix([math.pi / 4])
    out_i, out_s = aug.spatial(img, seg, (20, 20), m)  # input smaller than the footprint: corners empty
    assert out_s[0, 0, 0] == -1 and out_i[0, 0, 0] == 0
    _, final = aug(img, seg, (20, 20), np.random.default_rng(0), m)
    assert final.min() == 0 and final[0, 10, 10] == 2


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([2, 3]))
def test_flipping_a_patch_flips_its_boxes(seed, dim):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(10, 20, size=dim))
    seg = np.maximum(_instance_volume(shape, rng), 0)[None]
    classes = {i: i % 2 for i in range(1, 6)}
    boxes, labels = boxes_from_instance_map(seg[0], classes)
    aug = DetectionAugmentation(dim=dim, **NO_INTENSITY, p_rotation=0, p_scale=0, p_mirror=1.0)
    img = rng.normal(size=(1, *shape)).astype(np.float32)
    out_img, out_seg = aug(img, seg, shape, rng)
    np.testing.assert_array_equal(out_seg, np.flip(seg, axis=tuple(range(1, dim + 1))))
    np.testing.assert_array_equal(out_img, np.flip(img, axis=tuple(range(1, dim + 1))))
    fboxes, flabels = boxes_from_instance_map(out_seg[0], classes)
    size = np.asarray(shape, dtype=np.float32)
    expected = np.concatenate([size - boxes[:, dim:], size - boxes[:, :dim]], axis=1)
    np.testing.assert_array_equal(fboxes, expected)
    np.testing.assert_array_equal(flabels, labels)


def test_intensity_probabilities_and_shapes():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 16, 16, 16)).astype(np.float32)
    off = DetectionAugmentation(dim=3, **NO_INTENSITY)
    np.testing.assert_array_equal(off.intensity(img, rng), img)
    on = DetectionAugmentation(
        dim=3,
        p_noise=1,
        p_blur=1,
        p_blur_per_channel=1,
        p_brightness=1,
        p_contrast=1,
        p_gamma_inverted=1,
        p_gamma=1,
    )
    out = on.intensity(img, rng)
    assert out.shape == img.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.allclose(out, img)
    # gamma with retained stats keeps mean and std per channel
    g = DetectionAugmentation(dim=3, **{**NO_INTENSITY, "p_gamma": 1})
    out = g.intensity(img, rng)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), img.mean(axis=(1, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), img.std(axis=(1, 2, 3)), rtol=1e-3)


def test_noise_strength_is_the_drawn_value_as_std():
    # batchgenerators' GaussianNoiseTransform (nnDetection) uses the value drawn from noise_variance as the
    # standard deviation; a square root would give sqrt(0.04) = 0.2 here instead of 0.04
    zeros = np.zeros((1, 32, 32, 32), np.float32)
    fixed = DetectionAugmentation(dim=3, **{**NO_INTENSITY, "p_noise": 1, "noise_variance": (0.04, 0.04)})
    assert fixed.intensity(zeros, np.random.default_rng(0)).std() == pytest.approx(0.04, rel=0.02)
    default = DetectionAugmentation(dim=3, **{**NO_INTENSITY, "p_noise": 1})
    for seed in range(3):
        draws = np.random.default_rng(seed)
        draws.random()  # the p_noise coin
        value = draws.uniform(0.0, 0.1)  # the default range U(0, 0.1)
        std = default.intensity(zeros, np.random.default_rng(seed)).std()
        assert std == pytest.approx(value, rel=0.02) and abs(std - math.sqrt(value)) > 0.1
