"""Whole-case inference: tiling, position weights, mirror TTA, member consolidation, WBC ensembling,
raw-result files and restoring boxes to original voxel / world space."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Transposed

from bundles.retinaunet_template.scripts.detector import build_detector
from bundles.retinaunet_template.scripts.inference import (
    DEFAULT_PARAMS,
    GRIDS,
    Detections,
    check_params,
    consolidate_member,
    ensemble_members,
    flip_images,
    load_raw_predictions,
    mirror_transforms,
    pad_to_patch,
    position_weights,
    postprocess_members,
    predict_case,
    predict_member_raw,
    restore_boxes,
    save_raw_predictions,
    tile_starts,
    unflip_boxes,
    voxel_boxes_to_world,
)
from planner.fingerprint import instance_boxes
from planner.preprocess.transforms import CropForegroundNonzerod, ResampleToSpacingd, to_numpy


class ThresholdDetector:
    """Fake detector: per tile, the half-open bbox of channel-0 voxels > 0.5 (label 0).

    Score ``0.9 * visible voxels / full_volume`` (a box cut by the tile border scores lower). Records
    the batch shapes it was called with.
    """

    def __init__(self, full_volume: float = 1.0) -> None:
        self.full_volume = full_volume
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self.calls.append(tuple(images.shape))
        out = []
        dim = images.dim() - 2
        for img in images:
            mask = img[0] > 0.5
            if not mask.any():
                out.append({"boxes": torch.zeros(0, 2 * dim), "scores": torch.zeros(0),
                            "labels": torch.zeros(0, dtype=torch.long)})
                continue
            idx = torch.nonzero(mask)
            box = torch.cat([idx.min(0).values, idx.max(0).values + 1]).float()
            score = 0.9 * float(mask.sum()) / self.full_volume
            out.append({"boxes": box[None], "scores": torch.tensor([score]),
                        "labels": torch.zeros(1, dtype=torch.long)})
        return out


def cube_image(shape, box) -> np.ndarray:
    """[1, *shape] float32 noise-free image with ones inside the half-open ``box``."""
    d = len(shape)
    img = np.zeros((1, *shape), np.float32)
    img[(0, *(slice(box[a], box[a + d]) for a in range(d)))] = 1.0
    return img


def volume(box) -> float:
    d = len(box) // 2
    return float(np.prod([box[a + d] - box[a] for a in range(d)]))


# ------------------------------------------------------------------------------------ tiling
@pytest.mark.parametrize("grid", ["nndetection", "even"])
def test_tile_starts_cover_every_voxel_and_stay_inside(grid):
    rng = np.random.default_rng(0)
    for _ in range(200):
        dim = int(rng.integers(2, 4))
        patch = rng.integers(2, 40, size=dim)
        shape = patch + rng.integers(0, 90, size=dim)
        overlap = float(rng.choice([0.0, 0.25, 0.5, 0.75]))
        starts = np.asarray(tile_starts(shape, patch, overlap, grid))
        assert len({tuple(s) for s in starts}) == len(starts), "no duplicate tiles"
        for a in range(dim):
            axis = sorted(set(starts[:, a]))
            assert axis[0] == 0 and axis[-1] == shape[a] - patch[a]
            covered = np.zeros(shape[a], bool)
            for s in axis:
                covered[s:s + patch[a]] = True
            assert covered.all()
            step = patch[a] - int(patch[a] * overlap)
            assert all(b - a_ <= step for a_, b in zip(axis[:-1], axis[1:], strict=True))
        assert len(starts) == np.prod([len(set(starts[:, a])) for a in range(dim)])


def test_tile_starts_follow_the_symmetric_shifted_grid():
    assert tile_starts([100], [64]) == [(0,), (2,), (34,), (36,)]  # start (100 % 32 - 64) // 2 = -30
    assert tile_starts([128], [64]) == [(0,), (32,), (64,)]  # -32 and 0 both shift to 0: kept once
    assert tile_starts([64, 70], [64, 64]) == [(0, 0), (0, 3), (0, 6)]
    with pytest.raises(ValueError, match="pad it first"):
        tile_starts([10], [16])
    with pytest.raises(ValueError, match="overlap"):
        tile_starts([32], [16], overlap=1.0)


def test_pad_to_patch_is_symmetric_and_a_no_op_when_large_enough():
    img = np.arange(2 * 11 * 20, dtype=np.float32).reshape(2, 11, 20) + 1
    padded, lower = pad_to_patch(img, (16, 16))
    assert padded.shape == (2, 16, 20) and lower == (3, 0)  # 5 missing: 3 before, 2 after
    np.testing.assert_array_equal(padded[:, 3:14], img)
    assert (padded[:, :3] == 0).all() and (padded[:, 14:] == 0).all()
    same, lower = pad_to_patch(img, (8, 8))
    assert same is img and lower == (0, 0)


def test_position_weights_plateau_and_corner():
    patch = (32, 32, 16)

    def box_at(centre, start=(0, 0, 0)):
        c = np.asarray(centre, float) + start
        return np.concatenate([c - 1, c + 1])[None]

    half = np.asarray(patch) / 2
    assert position_weights(box_at(half), (0, 0, 0), patch)[0] == pytest.approx(1.0)
    assert position_weights(box_at((0, 0, 0)), (0, 0, 0), patch)[0] == pytest.approx(0.5)
    assert position_weights(box_at(half * 1.4), (0, 0, 0), patch)[0] == pytest.approx(1.0)  # d/dmax 0.4
    assert position_weights(box_at(half * 1.75), (0, 0, 0), patch)[0] == pytest.approx(0.75)
    # the tile origin is honoured: the same box in a tile starting at (10, 20, 30)
    assert position_weights(box_at(half, (10, 20, 30)), (10, 20, 30), patch)[0] == pytest.approx(1.0)
    assert position_weights(box_at(half), (10, 20, 30), patch)[0] < 1.0


# ------------------------------------------------------------------------------------ mirroring
def test_mirror_transforms_in_nndetection_order():
    assert mirror_transforms(3, 8) == [(), (0,), (1,), (0, 1), (2,), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_transforms(2, 4) == [(), (0,), (1,), (0, 1)]
    assert mirror_transforms(3, 1) == [()]
    with pytest.raises(ValueError):
        mirror_transforms(2, 8)
    with pytest.raises(ValueError):
        mirror_transforms(3, 2)


def test_unflip_recovers_the_box_detected_on_a_flipped_image():
    shape, truth = (20, 16, 12), [2, 3, 4, 9, 7, 6]
    img = torch.from_numpy(cube_image(shape, truth))[None]
    det = ThresholdDetector(volume(truth))
    for axes in mirror_transforms(3, 8):
        found = det(flip_images(img, axes))[0]["boxes"].numpy()
        if axes:  # the flip really moves the box, so the test can fail
            assert not np.allclose(found, [truth])
        np.testing.assert_allclose(unflip_boxes(found, axes, shape), [truth])


def test_member_raw_is_unmirrored_and_in_volume_coordinates():
    shape, truth = (40, 36, 20), [5, 22, 3, 13, 31, 9]
    img = cube_image(shape, truth)
    for axes in mirror_transforms(3, 8):
        raw = predict_member_raw(ThresholdDetector(volume(truth)), img, (16, 16, 16), 4, axes)
        full = raw.select(raw.scores == raw.scores.max())
        np.testing.assert_allclose(full.boxes, np.repeat([truth], len(full), 0))


# ------------------------------------------------------------------------------------ tiles -> case
def test_even_grid_needs_no_more_tiles_and_fewer_on_a_ct():
    """The even grid keeps the overlap (checked above) with at most as many tiles as nnDetection's, and fewer
    where the symmetric grid overhangs: the 512x512x256 CT's default plan (patch 96x160x160, transposed axes)
    takes 5 x 6 x 6 = 180 tiles instead of 6 x 7 x 7 = 294."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        patch = int(rng.integers(2, 200))
        size = patch + int(rng.integers(0, 600))
        overlap = float(rng.choice([0.0, 0.25, 0.5]))
        assert len(tile_starts([size], [patch], overlap, "even")) <= len(tile_starts([size], [patch], overlap))
    assert len(tile_starts([256, 512, 512], [96, 160, 160])) == 294
    assert len(tile_starts([256, 512, 512], [96, 160, 160], grid="even")) == 180
    assert tile_starts([512], [128], grid="even") == [(s,) for s in (0, 64, 128, 192, 256, 320, 384)]
    with pytest.raises(ValueError, match="grid"):
        tile_starts([64], [32], grid="monai")


@pytest.mark.parametrize("truth", [[20, 20, 20, 28, 28, 28], [10, 20, 3, 20, 28, 11], [40, 1, 30, 47, 9, 47]])
def test_both_grids_give_the_same_final_box(truth):
    """Tolerance: the same top box (the whole cube, consolidated over its tiles) from either grid."""
    shape = (48, 56, 48)
    out = {}
    for grid in GRIDS:
        raw = predict_member_raw(ThresholdDetector(volume(truth)), cube_image(shape, truth), (32, 32, 32), 4,
                                 grid=grid)
        member = consolidate_member(raw, shape)
        out[grid] = member.boxes[np.argmax(member.scores)]
    np.testing.assert_allclose(out["even"], out["nndetection"])
    np.testing.assert_allclose(out["even"], truth)


def test_tile_offsets_and_deduplication_across_overlapping_tiles():
    shape, truth = (48, 48, 48), [20, 20, 20, 28, 28, 28]
    det = ThresholdDetector(volume(truth))
    raw = predict_member_raw(det, cube_image(shape, truth), (32, 32, 32), 3)
    assert [c[0] for c in det.calls] == [3, 3, 2]  # 8 tiles (starts 0, 16 per axis), batched by 3
    assert all(c[2:] == (32, 32, 32) for c in det.calls)
    assert len(raw) == 8  # the cube lies fully inside every tile
    np.testing.assert_allclose(raw.boxes, np.repeat([truth], 8, 0))
    np.testing.assert_allclose(raw.weights, 1.0)  # centre 24 vs tile centres 16/32: d/dmax = 0.5
    member = consolidate_member(raw, shape)
    assert len(member) == 1
    np.testing.assert_allclose(member.boxes, [truth])


def test_boxes_cut_by_tile_borders_are_suppressed_by_the_full_box():
    shape, truth = (48, 48, 48), [10, 20, 20, 20, 28, 28]  # axis 0: inside tile 0, cut by tile 16
    raw = predict_member_raw(ThresholdDetector(volume(truth)), cube_image(shape, truth), (32, 32, 32), 4)
    seen = sum(1 for s in tile_starts(shape, (32,) * 3) if s[0] < 20 and s[0] + 32 > 10)
    assert len(raw) == seen == 8
    assert (raw.boxes[:, 0] == 16).sum() == 4  # tiles starting at 16 see the cube from x = 16
    member = consolidate_member(raw, shape)
    np.testing.assert_allclose(member.boxes, [truth])
    assert member.scores[0] == pytest.approx(0.9)


def test_volume_smaller_than_patch_is_padded_and_boxes_shifted_back():
    shape, truth = (10, 40, 7), [2, 30, 1, 6, 37, 5]
    det = ThresholdDetector(volume(truth))
    raw = predict_member_raw(det, cube_image(shape, truth), (16, 16, 16), 8)
    assert all(c[2:] == (16, 16, 16) for c in det.calls)
    member = consolidate_member(raw, shape)
    np.testing.assert_allclose(member.boxes, [truth])


def test_predict_case_merges_tta_members_and_folds_with_wbc():
    shape, truth = (24, 24, 24), [8, 9, 10, 16, 15, 16]  # tiles start at 0 and 8: all 8 hold the cube
    img = cube_image(shape, truth)
    detectors = [ThresholdDetector(volume(truth)) for _ in range(2)]
    pred = predict_case(detectors, img, (16, 16, 16), 4, num_tta=8)
    assert len(pred.members) == 16 and pred.member_names[:2] == ["model0_t0", "model0_t1"]
    assert pred.member_names[-1] == "model1_t7" and pred.shape == shape
    assert len(pred.detections) == 1
    np.testing.assert_allclose(pred.detections.boxes, [truth], atol=1e-5)
    assert pred.detections.scores[0] == pytest.approx(0.9, abs=1e-6)  # 16 agreeing votes, none missing
    weighted = predict_case(detectors, img, (16, 16, 16), 4, num_tta=1, model_weights=[1.0, 0.25])
    np.testing.assert_allclose(weighted.members[1].weights, 0.25 * pred.members[0].weights)


# ------------------------------------------------------------------------------------ stage rules
def _iou(a, b, d):
    inter = np.prod([max(0.0, min(a[k + d], b[k + d]) - max(a[k], b[k])) for k in range(d)])
    va, vb = (np.prod([x[k + d] - x[k] for k in range(d)]) for x in (a, b))
    return inter / (va + vb - inter) if inter > 0 else 0.0


def reference_consolidate(raw, shape, model_iou, model_nms, model_score_thresh, remove_small_boxes,
                          model_topk, detections_per_image):
    """nnDetection's per-member (model x TTA) stage, written out in plain Python."""
    d = len(shape)
    order = sorted(range(len(raw)), key=lambda i: -float(raw.scores[i]))[:model_topk]
    order = [i for i in order if raw.scores[i] > model_score_thresh]
    items = []
    for i in order:
        b = [min(max(float(v), 0.0), shape[k % d]) for k, v in enumerate(raw.boxes[i])]
        if all(b[k + d] - b[k] >= remove_small_boxes for k in range(d)):
            items.append((i, b))
    key = (lambda i: float(raw.scores[i]) * float(raw.weights[i])) if model_nms == "weighted" else (
        lambda i: float(raw.scores[i]))
    items.sort(key=lambda t: -key(t[0]))
    kept = []
    for i, b in items:
        if all(raw.labels[j] != raw.labels[i] or _iou(b, bj, d) <= model_iou for j, bj in kept):
            kept.append((i, b))
    kept = kept[:detections_per_image]
    idx = [i for i, _ in kept]
    weights = np.ones(len(idx)) if model_nms == "weighted" else raw.weights[idx]
    return np.array([b for _, b in kept]).reshape(-1, 2 * d), raw.scores[idx], raw.labels[idx], weights


@pytest.mark.parametrize("dim", [2, 3])
def test_consolidate_member_matches_a_plain_python_reference(dim):
    rng = np.random.default_rng(dim)
    shape = (40, 30, 20)[:dim]
    grid = [
        {},
        {"model_nms": "plain"},
        {"model_iou": 1e-5, "remove_small_boxes": 2.0},
        {"model_iou": 0.3, "model_score_thresh": 0.4, "model_topk": 120, "detections_per_image": 15},
        {"model_nms": "plain", "model_iou": 0.5, "model_topk": 60, "remove_small_boxes": 5.0},
    ]
    for trial in range(4):
        n = 250
        centre = rng.uniform(-5, np.asarray(shape) + 5, size=(n, dim))
        size = rng.uniform(0.005, 14, size=(n, dim)) * (rng.random((n, 1)) < 0.9)
        raw = Detections(np.concatenate([centre - size / 2, centre + size / 2], 1), rng.random(n),
                         rng.integers(0, 3, n), rng.uniform(0.5, 1.0, n))
        for override in grid:
            kw = {k: DEFAULT_PARAMS[k] for k in inspect.signature(consolidate_member).parameters
                  if k in DEFAULT_PARAMS} | override
            got = consolidate_member(raw, shape, **kw)
            boxes, scores, labels, weights = reference_consolidate(raw, shape, **kw)
            assert len(got) == len(boxes) > 0, (trial, override)
            np.testing.assert_allclose(got.boxes, boxes, atol=1e-5)
            np.testing.assert_array_equal(got.scores, scores)
            np.testing.assert_array_equal(got.labels, labels)
            np.testing.assert_allclose(got.weights, weights)


def test_weighted_nms_prefers_the_central_box_and_keeps_original_scores():
    boxes = [[0, 0, 10, 10], [1, 0, 11, 10]]
    raw = Detections(np.array(boxes), [0.9, 0.8], [0, 0], [0.5, 1.0])
    weighted = consolidate_member(raw, (20, 20))
    np.testing.assert_array_equal(weighted.boxes, [boxes[1]])
    assert weighted.scores[0] == pytest.approx(0.8) and weighted.weights[0] == 1.0
    plain = consolidate_member(raw, (20, 20), model_nms="plain")
    np.testing.assert_array_equal(plain.boxes, [boxes[0]])
    assert plain.weights[0] == 0.5  # plain NMS keeps the position weight for WBC
    with pytest.raises(ValueError, match="model_nms"):
        consolidate_member(raw, (20, 20), model_nms="soft")


def test_small_box_removal_keeps_sides_equal_to_the_minimum():
    raw = Detections(np.array([[0, 0, 2, 5], [5, 5, 6.99, 9], [10, 10, 15, 12]]), [0.9, 0.8, 0.7], [0, 0, 0])
    kept = consolidate_member(raw, (20, 20), remove_small_boxes=2.0)
    np.testing.assert_array_equal(kept.scores, np.float32([0.9, 0.7]))


def test_ensemble_members_wbc_averages_and_dampens_missing_votes():
    a, b = np.array([0, 0, 0, 10, 10, 10.0]), np.array([1, 1, 1, 11, 11, 11.0])
    m1, m2 = Detections(a[None], [0.8], [1]), Detections(b[None], [0.6], [1])
    out = ensemble_members([m1, m2])
    iou = 9**3 / (2 * 1000 - 9**3)
    w = np.array([1.0, iou])
    s = np.array([0.8, 0.6])
    assert len(out) == 1 and out.labels[0] == 1
    np.testing.assert_allclose(out.boxes[0], (w[0] * s[0] * a + w[1] * s[1] * b) / (w * s).sum(), rtol=1e-6)
    assert out.scores[0] == pytest.approx((w * s).sum() / w.sum(), rel=1e-6)
    alone = ensemble_members([m1, Detections.empty(3)])  # one of two members missed the object
    assert alone.scores[0] == pytest.approx(0.8 / 2)
    half = ensemble_members([m1, Detections(b[None], [0.6], [1], [0.5])])  # plain NMS keeps weights
    w = np.array([1.0, 0.5 * iou])
    assert half.scores[0] == pytest.approx((w * s).sum() / w.sum(), rel=1e-6)
    assert len(ensemble_members([m1, m2], ensemble_iou=0.6)) == 2  # IoU 0.57 does not cluster
    assert len(ensemble_members([Detections.empty(3)])) == 0


def test_params_are_checked_and_match_the_function_defaults():
    sig = {**inspect.signature(consolidate_member).parameters, **inspect.signature(ensemble_members).parameters}
    assert {k: sig[k].default for k in DEFAULT_PARAMS} == DEFAULT_PARAMS
    with pytest.raises(ValueError, match="unknown"):
        check_params({"model_ious": 0.2})


def test_raw_predictions_round_trip_through_npz(tmp_path):
    shape, truth = (24, 20, 18), [3, 4, 5, 12, 10, 9]
    pred = predict_case([ThresholdDetector(volume(truth))], cube_image(shape, truth), (16, 16, 16), 2, num_tta=4,
                        params={"model_iou": np.float32(0.25)})  # numpy scalars survive the JSON
    path = save_raw_predictions(pred, tmp_path / "case_boxes.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_boxes.npz"]  # no temp file left
    back = load_raw_predictions(path)
    assert back.member_names == pred.member_names and back.shape == shape and back.params == pred.params
    for m, n in zip(back.members, pred.members, strict=True):
        for f in ("boxes", "scores", "labels", "weights"):
            np.testing.assert_array_equal(getattr(m, f), getattr(n, f))
    again = postprocess_members(back.members, back.shape, back.params)
    np.testing.assert_array_equal(again.boxes, pred.detections.boxes)
    np.testing.assert_array_equal(back.detections.scores, pred.detections.scores)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a raw prediction"):
        load_raw_predictions(tmp_path / "other.npz")


# ------------------------------------------------------------------------------------ restoring
def test_restore_boxes_hand_computed():
    props = {
        "transpose_forward": [2, 0, 1],  # preprocessed axes (k, i, j)
        "shape_after_crop": [30, 20, 10],  # raw order
        "shape_after_resampling": [20, 15, 40],  # transposed order: k 10->20, i 30->15, j 20->40
        "crop_bbox": [[5, 35], [2, 22], [1, 11]],
    }
    pre = np.array([[2.0, 3.0, 4.0, 6.0, 9.0, 10.0]])  # (k1, i1, j1, k2, i2, j2)
    expected = [[5 + 3 * 2, 2 + 4 / 2, 1 + 2 / 2, 5 + 9 * 2, 2 + 10 / 2, 1 + 6 / 2]]
    np.testing.assert_allclose(restore_boxes(pre, props), expected)
    with pytest.raises(KeyError, match="crop_bbox"):
        restore_boxes(pre, {k: v for k, v in props.items() if k != "crop_bbox"})


@pytest.mark.parametrize(
    "spacing, target_raw, exact",
    [([1.0, 1.0, 3.0], [2.0, 2.0, 1.5], False),  # downsample in-plane, upsample z, transpose z first
     ([2.0, 1.0, 1.0], [1.0, 0.5, 0.5], True)],  # x2 upsampling: nearest neighbour maps edges exactly
)
def test_restore_boxes_inverts_the_planner_preprocessing(spacing, target_raw, exact):
    shape = (40, 36, 12)
    transpose_forward = [int(a) for a in np.argsort(-np.asarray(spacing), kind="stable")]
    rng = np.random.default_rng(0)
    image = np.zeros(shape, np.float32)
    image[3:37, 4:34, 1:11] = rng.random((34, 30, 10)) + 1  # body: cropped to this region
    seg = np.zeros(shape, np.int16)
    seg[10:22, 8:20, 3:7] = 1
    seg[25:31, 20:30, 2:5] = 2
    chain = Compose([
        CropForegroundNonzerod(keys="image"),
        Transposed(keys=["image", "seg", "mask"], indices=[0] + [a + 1 for a in transpose_forward]),
        ResampleToSpacingd(keys=["image", "seg", "mask"], target_spacing=[target_raw[a] for a in transpose_forward],
                           transpose_forward=transpose_forward, order=[3, 0, 0]),
    ])
    out = chain({"image": image[None], "seg": seg[None], "spacing": spacing})
    props = {k: out[k] for k in ("transpose_forward", "shape_after_crop", "shape_after_resampling", "crop_bbox")}
    assert props["crop_bbox"] == [[3, 37], [4, 34], [1, 11]]
    ids, pre_boxes = instance_boxes(to_numpy(out["seg"])[0].astype(np.int64))
    raw_ids, raw_boxes = instance_boxes(seg)
    assert ids == raw_ids == [1, 2]
    restored = restore_boxes(np.asarray(pre_boxes, float), props)
    back = np.argsort(transpose_forward)
    voxel = np.asarray(props["shape_after_crop"]) / np.asarray(props["shape_after_resampling"])[back]
    err = np.abs(restored - np.asarray(raw_boxes, float))
    if exact:
        np.testing.assert_allclose(restored, raw_boxes, atol=1e-9)
    else:  # within one preprocessed voxel (nearest-neighbour label resampling), per raw axis
        assert (err <= np.concatenate([voxel, voxel]) + 1e-9).all(), err


def test_voxel_boxes_to_world_uses_voxel_edges():
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    box = np.array([[1, 2, 3, 4, 6, 8]])
    expected = [[10 + 2 * 0.5, 20 + 3 * 1.5, 30 + 4 * 2.5, 10 + 2 * 3.5, 20 + 3 * 5.5, 30 + 4 * 7.5]]
    np.testing.assert_allclose(voxel_boxes_to_world(box, affine), expected)
    one = voxel_boxes_to_world(np.array([[5, 5, 5, 6, 6, 6]]), affine)[0]  # one voxel: centred on it
    np.testing.assert_allclose((one[:3] + one[3:]) / 2, affine[:3, :3] @ [5, 5, 5] + affine[:3, 3])
    np.testing.assert_allclose(one[3:] - one[:3], [2, 3, 4])


def test_voxel_boxes_to_world_with_rotation_matches_all_corners():
    from nibabel.affines import apply_affine

    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([-0.8, 0.8, 2.5])  # flip, rotate, scale
    affine = np.eye(4)
    affine[:3, :3] = rot[[1, 0, 2]]  # permute axes too
    affine[:3, 3] = [-100, 50, 7]
    rng = np.random.default_rng(1)
    lo = rng.uniform(0, 50, (20, 3))
    boxes = np.concatenate([lo, lo + rng.uniform(0.5, 20, (20, 3))], 1)
    got = voxel_boxes_to_world(boxes, affine)
    for b, g in zip(boxes, got, strict=True):
        corners = [[(b[a] if pick[a] == 0 else b[a + 3]) - 0.5 for a in range(3)]
                   for pick in itertools.product((0, 1), repeat=3)]
        world = apply_affine(affine, np.asarray(corners))
        np.testing.assert_allclose(g, np.concatenate([world.min(0), world.max(0)]), atol=1e-9)
    flat = voxel_boxes_to_world(np.array([[2, 3, 6, 9]]), np.diag([0.5, 0.7, 5.0, 1.0]))  # 2D box, 3D affine
    np.testing.assert_allclose(flat, [[0.75, 1.75, -2.5, 2.75, 5.95, 2.5]])


# ------------------------------------------------------------------------------------ real network
TINY = {"start_channels": 4, "max_channels": 8, "fpn_channels": 8, "head_channels": 8}


def _tiny(dim):
    torch.manual_seed(0)
    sizes = [[[3, 5] for _ in range(dim)], [[6, 10] for _ in range(dim)]]
    return build_detector(dim, 1, 2, [[3] * dim] * 3, [[1] * dim, [2] * dim, [2] * dim], [1, 2], sizes,
                          topk_candidates=200, **TINY)


@pytest.mark.parametrize("dim, shape, patch, num_tta", [
    (3, (20, 18, 24), (16, 16, 16), 4),
    (2, (40, 12), (32, 16), 4),  # axis 1 smaller than the patch: padded
])
def test_predict_case_with_an_untrained_tiny_retina_unet(dim, shape, patch, num_tta):
    det = _tiny(dim)
    image = torch.randn(1, *shape)
    pred = predict_case([det], image, patch, 2, num_tta=num_tta, params={"model_score_thresh": 0.0})
    assert not det.training
    assert len(pred.members) == num_tta and all(len(m) > 0 for m in pred.members)
    out = pred.detections
    assert 0 < len(out) <= 1000 and out.boxes.shape == (len(out), 2 * dim)
    assert np.isfinite(out.boxes).all() and np.isfinite(out.scores).all()
    assert (out.boxes[:, :dim] >= 0).all() and (out.boxes[:, dim:] <= np.asarray(shape) + 1e-4).all()
    assert ((out.scores > 0) & (out.scores <= 1)).all() and set(out.labels.tolist()) <= {0, 1}
    for m in pred.members:
        assert ((m.weights >= 0.5 - 1e-6) & (m.weights <= 1)).all()
