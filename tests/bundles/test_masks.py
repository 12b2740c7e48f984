"""A mask per finding (``scripts/masks.py``): the tile average of the segmentation head, masks restored to the
original voxels inside their boxes, their file, the instance map and Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundles.retinaunet_template.scripts import inference
from bundles.retinaunet_template.scripts.masks import (
    FindingMask,
    SegAccumulator,
    dice,
    finding_masks,
    load_masks,
    paint_masks,
    save_masks,
)


class FieldDetector:
    """Detects nothing; its foreground probability is a fixed field of the case (tile-independent), mirrored
    like the input, so the tile average over any tiling and TTA must give the field back."""

    def __init__(self, field: np.ndarray, starts_of: dict) -> None:
        self.field = torch.from_numpy(field)
        self.starts_of = starts_of

    def __call__(self, batch: torch.Tensor, return_seg: bool = False):
        out = []
        for tile in batch:
            # the tile's probability is its first channel, which holds the field itself (see the test)
            d = {"boxes": torch.zeros(0, 6), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
            if return_seg:
                d["seg_probs"] = tile[0].clone()
            out.append(d)
        return out


@pytest.mark.parametrize("num_tta", [1, 8])
def test_tile_average_over_tiles_mirrors_and_models_is_the_field(num_tta):
    rng = np.random.default_rng(0)
    field = rng.random((20, 17, 9)).astype(np.float32)  # smaller than the patch along k: padded there
    det = FieldDetector(field, {})
    pred = inference.predict_case([det, det], field[None], (8, 8, 12), 3, num_tta=num_tta, masks=True, amp=False)
    assert pred.seg_prob.shape == field.shape
    np.testing.assert_allclose(pred.seg_prob, field, atol=1e-5)
    assert inference.predict_case([det], field[None], (8, 8, 12), 3, num_tta=1).seg_prob is None


def test_accumulator_counts_overlaps():
    acc = SegAccumulator()
    starts = inference.tile_starts((12,), (8,), 0.5)  # [0, 4]: voxels 4..7 covered twice
    acc.start((12,), (0,), (12,), starts, (8,))
    for st in starts:
        acc.add(np.full(8, 1.0 if st[0] == 0 else 0.0, np.float32), st)
    acc.end_member()
    np.testing.assert_allclose(acc.probability(), [1] * 4 + [0.5] * 4 + [0] * 4)


def _props(original, crop_lo, crop_shape, resampled, tf):
    return {"crop_bbox": [[lo, lo + n] for lo, n in zip(crop_lo, crop_shape, strict=True)],
            "shape_after_crop": list(crop_shape), "transpose_forward": list(tf),
            "shape_after_resampling": list(resampled), "original_shape": list(original)}


def test_finding_masks_restore_crop_transpose_and_resampling():
    """An object drawn in the original image, carried through crop, transpose and 2x downsampling by the
    preprocessing's rules, comes back as the same voxels (up to the resampling's edge voxels)."""
    from planner.preprocess.transforms import resample_labels

    original = (40, 30, 20)
    obj = np.zeros(original, bool)
    obj[10:22, 6:14, 4:12] = True
    obj[15:18, 8:11, 4:12] = False  # a hole: not a box
    crop_lo, crop_shape = (2, 0, 0), (36, 30, 20)
    tf = (2, 0, 1)
    cropped = obj[2:38]
    transposed = np.transpose(cropped, tf)  # (20, 36, 30)
    resampled_shape = (10, 18, 15)
    prob = resample_labels(transposed.astype(np.int16)[None], resampled_shape)[0].astype(np.float32)
    props = _props(original, crop_lo, crop_shape, resampled_shape, tf)
    boxes = np.array([[10, 6, 4, 22, 14, 12], [30, 20, 15, 34, 24, 18]], float)  # the object and empty space
    masks = finding_masks(prob, boxes, props, original)
    assert masks[0].offset == (10, 6, 4) and masks[0].mask.shape == (12, 8, 8)
    full = np.zeros(original, bool)
    full[masks[0].region()] = masks[0].mask
    assert dice(masks[0], obj) > 0.85
    assert not full[16, 9, 6]  # the hole stays a hole
    assert masks[1].voxels == 0


def test_largest_component_only():
    prob = np.zeros((10, 10), np.float32)
    prob[1:4, 1:4] = 1
    prob[6:9, 6:8] = 1
    props = _props((10, 10), (0, 0), (10, 10), (10, 10), (0, 1))
    (m,) = finding_masks(prob, np.array([[0, 0, 10, 10]], float), props, (10, 10))
    assert m.voxels == 9 and m.mask[1:4, 1:4].all()


def test_mask_file_round_trip_paint_and_dice(tmp_path):
    a = FindingMask((1, 2), np.array([[1, 1, 0], [0, 1, 1]], bool))
    b = FindingMask((0, 0), np.ones((3, 3), bool))
    empty = FindingMask((5, 5), np.zeros((0, 2), bool))
    save_masks([a, b, empty], tmp_path / "c_masks.npz", (6, 7))
    got, shape = load_masks(tmp_path / "c_masks.npz")
    assert shape == (6, 7) and [g.offset for g in got] == [(1, 2), (0, 0), (5, 5)]
    for g, m in zip(got, [a, b, empty], strict=True):
        np.testing.assert_array_equal(g.mask, m.mask)
    seg = paint_masks(got, shape, keep=[1, 0], scores=[0.9, 0.5, 0.1])  # instance 1 = b, 2 = a; a scores higher
    assert seg[1, 2] == 2 and seg[0, 0] == 1 and seg[2, 2] == 1  # (2, 2) is outside a's mask: b keeps it
    ref = np.zeros((6, 7), bool)
    ref[1, 2:4] = True
    assert dice(a, ref) == pytest.approx(2 * 2 / (4 + 2))
    assert dice(empty, np.zeros((6, 7), bool)) == 1.0
