"""Preprocessing: the transforms on synthetic arrays, and preprocess_task on a tiny NIfTI task."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from planner.bundle import generate_bundle
from planner.dataset import DatasetError
from planner.preprocess.run import preprocess_task, unpack
from planner.preprocess.transforms import (
    CropForegroundNonzerod,
    NormalizePerModalityd,
    ResampleToSpacingd,
    compute_new_shape,
    normalize_channel,
    resample_image,
    resample_labels,
)
from tests.planner.helpers import Case, write_task
from tests.planner.test_bundle import make_dataset, make_plan

CT_PROPS = {"mean": 40.0, "std": 30.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0}


# ------------------------------------------------------------------------------------ normalisation
def test_ct_normalisation_matches_direct_numpy():
    x = np.random.default_rng(0).normal(20, 150, (6, 7, 8)).astype(np.float32)
    expected = (np.clip(x, -100.0, 200.0) - 40.0) / 30.0
    np.testing.assert_allclose(normalize_channel(x, "CT", CT_PROPS, None, False), expected, rtol=1e-5, atol=1e-5)
    mask = np.zeros(x.shape, bool)
    mask[1:5] = True
    got = normalize_channel(x, "CT", CT_PROPS, mask, True)
    np.testing.assert_allclose(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert (got[~mask] == 0).all()


def test_ct2_uses_case_statistics_inside_the_clip_window():
    x = np.random.default_rng(1).normal(20, 150, (5, 6, 7)).astype(np.float64)
    inside = (x > -100) & (x < 200)
    c = np.clip(x, -100, 200)
    expected = (c - c[inside].mean()) / c[inside].std()
    got = normalize_channel(x.astype(np.float32), "CT2", CT_PROPS, None, False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_nonct_zscore_with_and_without_mask():
    rng = np.random.default_rng(2)
    x = rng.normal(3, 2, (6, 6, 6)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[1:5, 2:6, :] = True
    got = normalize_channel(x, "nonCT", {}, mask, True)
    xm = x[mask].astype(np.float64)
    np.testing.assert_allclose(got[mask], (xm - xm.mean()) / (xm.std() + 1e-8), rtol=1e-5, atol=1e-5)
    assert (got[~mask] == 0).all()
    whole = normalize_channel(x, "nonCT", {}, mask, False)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(whole, (xd - xd.mean()) / (xd.std() + 1e-8), rtol=1e-5, atol=1e-5)
    for arr in (x, np.swapaxes(x, 0, 2)):  # bit-identical to the statistics over x[all-True mask]
        everything = np.ones(arr.shape, bool)
        vals = arr[everything]
        ref = np.empty_like(arr)
        ref[everything] = (vals - float(vals.mean(dtype=np.float64))) / (float(vals.std(dtype=np.float64)) + 1e-8)
        got = normalize_channel(arr, "nonCT", {}, None, False)
        assert got.dtype == np.float32 and np.array_equal(got, ref)


def test_normalise_per_modality_transform_and_bad_scheme():
    rng = np.random.default_rng(3)
    img = np.stack([rng.normal(0, 200, (4, 5, 6)), rng.normal(5, 2, (4, 5, 6))]).astype(np.float32)
    mask = np.ones((1, 4, 5, 6), bool)
    t = NormalizePerModalityd("image", ["CT", "nonCT"], [CT_PROPS, {}], [False, True])
    out = t({"image": img, "mask": mask})["image"]
    np.testing.assert_allclose(out[0], normalize_channel(img[0], "CT", CT_PROPS, None, False))
    assert abs(out[1].mean()) < 1e-5 and abs(out[1].std() - 1) < 1e-4
    with pytest.raises(ValueError, match="unknown normalisation scheme"):
        NormalizePerModalityd("image", ["MR"], [{}], [False])


# -------------------------------------------------------------------------------------- resampling
def test_resampled_shape_is_rounded_shape_times_spacing_over_target():
    image = np.random.default_rng(4).random((1, 11, 13, 7)).astype(np.float32)
    # raw spacing (0.7, 0.9, 3.0), transposed [2, 0, 1] -> (3.0, 0.7, 0.9) on arrays of shape (7, 11, 13)
    arr = np.transpose(image, (0, 3, 1, 2))
    t = ResampleToSpacingd(["image"], target_spacing=[2.0, 1.0, 1.0], transpose_forward=[2, 0, 1], order=3)
    out = t({"image": arr, "spacing": [0.7, 0.9, 3.0]})
    expect = [round(7 * 3.0 / 2.0), round(11 * 0.7), round(13 * 0.9)]
    assert list(out["image"].shape[1:]) == expect == out["shape_after_resampling"]
    assert compute_new_shape([7, 11, 13], [3.0, 0.7, 0.9], [2.0, 1.0, 1.0]) == expect
    np.testing.assert_allclose(out["spacing_after_resampling"], [7 * 3.0 / expect[0], 11 * 0.7 / expect[1],
                                                                   13 * 0.9 / expect[2]])


def test_spline_resampling_uses_pixel_edge_alignment():
    # a linear ramp must be reproduced at the output voxel centres (j + 0.5) * n / m - 0.5
    n, m = 20, 50
    ramp = np.tile(np.arange(n, dtype=np.float32)[:, None], (1, 4))[None]
    out = resample_image(ramp, [m, 4])[0][:, 0]
    centres = (np.arange(m) + 0.5) * n / m - 0.5
    inner = (centres > 5) & (centres < n - 6)  # away from the edge-mode boundary of the spline
    np.testing.assert_allclose(out[inner], centres[inner], atol=1e-3)
    assert out.min() >= 0 and out.max() <= n - 1  # clipped to the input range
    nan = ramp.copy()
    nan[0, 3, 2] = np.nan
    assert np.isfinite(resample_image(nan, [m, 8])).all()


def test_resampling_equals_nnunet_skimage_resize():
    """nnU-Net/nnDetection resample with skimage's resize(order 3 / 0, mode edge, no anti-aliasing)."""
    resize = pytest.importorskip("skimage.transform").resize
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (1, 13, 17, 9)).astype(np.float32)
    s = rng.integers(0, 5, (13, 17, 9))
    for shape in [(20, 11, 14), (7, 30, 9)]:
        ref = resize(x[0].astype(np.float64), shape, order=3, mode="edge", anti_aliasing=False)
        np.testing.assert_allclose(resample_image(x, shape)[0], ref, atol=1e-5)
        ref_s = resize(s.astype(float), shape, order=0, mode="edge", anti_aliasing=False).astype(int)
        np.testing.assert_array_equal(resample_labels(s[None], shape)[0], ref_s)


def _scipy_zoom(x: np.ndarray, new_shape, order: int) -> np.ndarray:
    """The nD ``ndimage.zoom`` call the separable resampling replaces (reference)."""
    from scipy import ndimage

    zoom = np.asarray(new_shape, dtype=np.float64) / np.asarray(x.shape, dtype=np.float64)
    out = np.empty(tuple(new_shape), dtype=x.dtype)
    ndimage.zoom(x, zoom, output=out, order=order, mode="nearest", grid_mode=True)
    return out


@pytest.mark.parametrize(
    ("shape", "new_shape"),
    [((13, 17, 9), (20, 11, 14)), ((7, 30, 9), (7, 31, 9)), ((1, 5, 5), (3, 5, 5)), ((5, 1, 6), (5, 1, 2)),
     ((12, 13), (30, 5)), ((40, 24, 32), (91, 20, 33))],
)
def test_separable_resampling_equals_nd_scipy_zoom(shape, new_shape):
    rng = np.random.default_rng(7)
    x = (rng.normal(0, 300, (2, *shape)) - 500).astype(np.float32)
    x = np.ascontiguousarray(np.swapaxes(x, 1, -1)).swapaxes(1, -1)  # a strided view, as after Transposed
    got = resample_image(x, new_shape)
    for c in range(2):
        ref = np.clip(_scipy_zoom(x[c], new_shape, 3), x[c].min(), x[c].max())
        np.testing.assert_allclose(got[c], ref, rtol=1e-6, atol=1e-6 * np.abs(x).max())
    seg = rng.integers(-1, 7, (1, *shape)).astype(np.int16)
    np.testing.assert_array_equal(resample_labels(seg, new_shape)[0], _scipy_zoom(seg[0], new_shape, 0))
    np.testing.assert_array_equal(resample_labels(seg >= 0, new_shape)[0],
                                  _scipy_zoom((seg[0] >= 0).astype(np.uint8), new_shape, 0).astype(bool))


def test_resampling_replaces_nan_and_inf_as_nan_to_num():
    x = np.random.default_rng(8).random((1, 6, 7, 5)).astype(np.float32)
    x[0, 1, 2, 3], x[0, 4, 4, 4], x[0, 0, 0, 0] = np.nan, np.inf, -np.inf
    ref = np.nan_to_num(x, nan=0.0)
    got = resample_image(x, (9, 5, 5))[0]
    expected = np.clip(_scipy_zoom(ref[0], (9, 5, 5), 3), ref.min(), ref.max())
    assert np.isfinite(got).all()  # inf became the float32 extremes: only float64 rounding of those remains
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12 * float(np.finfo(np.float32).max))
    np.testing.assert_array_equal(resample_image(x, (6, 7, 5)), ref)  # unchanged shape: just the replacement


@pytest.mark.parametrize("new_shape", [[9, 7, 5], [30, 25, 19]])
def test_instance_ids_are_preserved_without_mixing(new_shape):
    rng = np.random.default_rng(5)
    seg = np.zeros((1, 16, 14, 10), np.int32)
    seg[0, :2] = -1
    for i, (a, b, c) in enumerate(rng.integers(2, 9, (6, 3)), start=1):
        seg[0, a:a + 5, b:b + 4, c:c + 3] = i  # overlapping boxes: neighbouring ids touch
    out = resample_labels(seg, new_shape)
    assert out.shape == (1, *new_shape) and out.dtype == seg.dtype
    before, after = set(np.unique(seg)), set(np.unique(out))
    assert after <= before  # no new (mixed/interpolated) id
    if np.prod(new_shape) > seg.size:
        assert after == before  # upsampling keeps every id
    mask = resample_labels(seg >= 0, new_shape)
    assert mask.dtype == bool and ((out >= 0) == mask).all()


def test_crop_marks_outside_body_and_keeps_body_mask():
    image = np.zeros((2, 10, 12, 8), np.float32)
    image[0, 2:8, 3:9, 1:7] = 1.0
    image[1, 2:8, 3:9, 1:7] = 2.0
    image[:, 4, 5, 3] = 0.0  # a hole inside: filled, stays body
    seg = np.zeros((1, 10, 12, 8), np.int32)
    seg[0, 3:5, 4:6, 2:4] = 1
    out = CropForegroundNonzerod("image")({"image": image, "seg": seg})
    assert out["crop_bbox"] == [[2, 8], [3, 9], [1, 7]] and out["shape_after_crop"] == [6, 6, 6]
    assert out["original_shape"] == [10, 12, 8]
    assert out["mask"].all() and (out["seg"] >= 0).all()
    image[0, 2, 3, 1] = image[1, 2, 3, 1] = 0.0  # a corner outside the body (not a hole)
    out = CropForegroundNonzerod("image")({"image": image})  # unlabeled input still gets the body mask
    assert not out["mask"][0, 0, 0, 0] and out["mask"].sum() == 6**3 - 1 and "seg" not in out


def test_fill_holes_and_crop_equal_scipy_binary_fill_holes():
    from scipy import ndimage

    from planner.crop import bbox_of_mask, crop_case, crop_to_bbox, fill_holes

    rng = np.random.default_rng(9)
    for trial in range(200):
        shape = tuple(int(n) for n in rng.integers(1, 9, rng.integers(1, 4)))
        mask = rng.random(shape) < rng.random()
        if trial % 3 == 0:
            mask = ndimage.binary_dilation(mask)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    for trial in range(100):
        data = (rng.random((2, *rng.integers(1, 10, 3))) < 0.3).astype(np.float32)
        if trial % 2:
            data = np.pad(data, ((0, 0), (2, 2), (1, 3), (0, 2)))
        seg = rng.integers(0, 3, data.shape[1:]).astype(np.int32)
        body = ndimage.binary_fill_holes(np.any(data != 0, axis=0))  # the rule on the whole volume
        bbox = bbox_of_mask(body)
        ref = crop_to_bbox(seg, bbox).copy()
        ref[(ref == 0) & ~crop_to_bbox(body, bbox)] = -1
        data_c, seg_c, got_bbox = crop_case(data, seg)
        assert got_bbox == bbox
        np.testing.assert_array_equal(data_c, crop_to_bbox(data, bbox))
        np.testing.assert_array_equal(seg_c, ref)


# ---------------------------------------------------------------------------------- whole task
def _body_case(case_id: str, seed: int, split: str = "Tr", label: bool = True) -> Case:
    """A 20x18x8 image, zero border and notch (exercise the crop), two cubes as instances 1 and 2."""
    rng = np.random.default_rng(seed)
    shape = (20, 18, 8)
    img = np.zeros(shape, np.float32)
    img[2:18, 1:17, 1:7] = rng.random((16, 16, 6)) + 0.1
    img[2:6, 1:5, 1:4] = 0.0  # a notch in a corner of the body: outside (-1), not a hole
    seg = np.zeros(shape, np.uint8)
    seg[4:9, 3:8, 2:5] = 1
    seg[11:16, 10:15, 3:6] = 2
    img[seg > 0] += 1.0
    return Case(case_id, [img], seg if label else None, {"1": 0, "2": 1} if label else None, split,
                spacing=(0.8, 0.8, 2.5))


@pytest.fixture()
def task(tmp_path):
    cases = [_body_case(f"case_{i}", i) for i in range(3)]
    cases += [_body_case("case_3", 3, "Ts", label=True), _body_case("case_4", 4, "Ts", label=False)]
    root = write_task(tmp_path / "data", "Task100D3_Test", cases=cases, labels={"0": "A", "1": "B"},
                      test_labels=True)
    plan = make_plan(target_spacing=[1.2, 1.2, 2.0], transpose_forward=[2, 0, 1], use_mask=[True])
    bundle = generate_bundle(plan, make_dataset(plan), tmp_path / "models" / plan.model_name)
    return root, bundle, plan


def _boxes_from_seg(seg: np.ndarray) -> dict[int, list[int]]:
    """Half-open StandardMode boxes per id from voxel coordinates (independent of find_objects)."""
    out = {}
    for i in np.unique(seg):
        if i <= 0:
            continue
        idx = np.argwhere(seg == i)
        out[int(i)] = [*idx.min(0).tolist(), *(idx.max(0) + 1).tolist()]
    return out


def test_preprocess_task_writes_cases_with_boxes_in_preprocessed_coordinates(task):
    root, bundle, plan = task
    out = preprocess_task(root, bundle, plan)
    assert out == root / "preprocessed" / plan.plan_id
    shape_t = [6, 16, 16]  # crop (16, 16, 6), transposed [2, 0, 1]
    sp_t = [2.5, 0.8, 0.8]
    expect = [round(s * a / b) for s, a, b in zip(shape_t, sp_t, plan.target_spacing_transposed, strict=True)]
    for case in ("case_0", "case_1", "case_2"):
        data = np.load(out / "imagesTr" / f"{case}.npy", mmap_mode="r")
        seg = np.load(out / "imagesTr" / f"{case}_seg.npy", mmap_mode="r")
        props = json.loads((out / "imagesTr" / f"{case}.json").read_text())
        assert data.dtype == np.float32 and data.shape == (1, *expect)
        assert seg.shape == tuple(expect) and np.issubdtype(seg.dtype, np.signedinteger)
        assert seg.min() == -1 and seg[0, 0, 0] == -1
        assert props["crop_bbox"] == [[2, 18], [1, 17], [1, 7]] and props["shape_after_crop"] == [16, 16, 6]
        assert props["original_shape"] == [20, 18, 8] and props["transpose_forward"] == [2, 0, 1]
        assert props["shape_after_resampling"] == expect
        assert np.asarray(props["affine"]).shape == (4, 4)
        assert props["original_spacing"] == pytest.approx([0.8, 0.8, 2.5])
        boxes = _boxes_from_seg(np.asarray(seg))
        assert props["instance_ids"] == sorted(boxes) == [1, 2]
        assert props["boxes"] == [boxes[i] for i in props["instance_ids"]]
        assert props["classes"] == [0, 1]
        # body voxels were normalised over the mask (use_mask_for_norm), outside is 0
        body = np.asarray(seg) >= 0
        assert abs(float(data[0][body].mean())) < 1e-3 and (np.asarray(data[0])[~body] == 0).all()
    # test cases: labelled one with seg and boxes, unlabeled one image + json only
    ts = out / "imagesTs"
    assert json.loads((ts / "case_3.json").read_text())["classes"] == [0, 1]
    assert (ts / "case_3_seg.npy").is_file()
    p4 = json.loads((ts / "case_4.json").read_text())
    assert (ts / "case_4.npy").is_file() and not (ts / "case_4_seg.npy").exists()
    assert p4["boxes"] == [] and p4["has_label"] is False


def test_resume_skips_done_cases_overwrite_recomputes_and_parallel_equals_serial(task):
    root, bundle, plan = task
    out = preprocess_task(root, bundle, plan)
    files = sorted(out.rglob("*"))
    files = [f for f in files if f.is_file()]
    before = {f: f.stat().st_mtime_ns for f in files}
    arrays = {f: np.load(f) for f in files if f.suffix == ".npy"}
    jsons = {f: json.loads(f.read_text()) for f in files if f.suffix == ".json"}

    preprocess_task(root, bundle, plan)
    assert {f: f.stat().st_mtime_ns for f in files} == before

    # a case without its json (crashed mid-case) is redone, the others are not
    (out / "imagesTr" / "case_1.json").unlink()
    preprocess_task(root, bundle, plan)
    assert (out / "imagesTr" / "case_1.json").is_file()
    assert (out / "imagesTr" / "case_1.npy").stat().st_mtime_ns != before[out / "imagesTr" / "case_1.npy"]
    assert (out / "imagesTr" / "case_0.npy").stat().st_mtime_ns == before[out / "imagesTr" / "case_0.npy"]

    preprocess_task(root, bundle, plan, num_processes=2, overwrite=True)
    assert all(f.stat().st_mtime_ns != before[f] for f in files)
    for f, arr in arrays.items():
        np.testing.assert_array_equal(np.load(f), arr)
    for f, props in jsons.items():
        assert json.loads(f.read_text()) == props
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def test_bundle_of_another_plan_and_unknown_instance_are_refused(task, tmp_path):
    root, bundle, plan = task
    other = make_plan(target_spacing=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="regenerate the bundle"):
        preprocess_task(root, bundle, other)
    (root / "raw_splitted" / "labelsTr" / "case_0.json").write_text(json.dumps({"instances": {"1": 0}}))
    with pytest.raises(DatasetError, match="case_0.json"):
        preprocess_task(root, bundle, plan)
    assert not (root / "preprocessed" / plan.plan_id / "imagesTr" / "case_0.json").exists()


def test_unpack_checks_the_folder(task, tmp_path, caplog):
    root, bundle, plan = task
    with pytest.raises(FileNotFoundError, match="does not exist"):
        unpack(tmp_path / "nope")
    out = preprocess_task(root, bundle, plan)
    with caplog.at_level(logging.INFO):
        assert unpack(out) == out
    assert "nothing to unpack" in caplog.text and "5 preprocessed case" in caplog.text
