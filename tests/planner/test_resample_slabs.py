"""The preprocessing worker's memory savings (issue 17, item 6) leave every output as it was.

``_whole_channel_resample`` is ``resample_image`` as it was before it went slab by slab (a float64 copy
of the whole channel, then the dense zoom matrix product per axis): the oracle of the slab version.
Slab sizes are forced small through ``work_bytes`` so that each code path of ``_resample_channel`` runs
with many slabs; a spy on ``_apply_along`` checks which path ran. The other tests compare the in-place
normalisation, the no-copy crop and label resampling, the slab-wise hole filling of the crop,
``load_case(compact=True)`` and the bundle chain as ``preprocess_case`` now runs it with what they
replace.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Sequence

import numpy as np
import pytest
import torch

import planner.preprocess.transforms as T
from planner.crop import crop_case
from planner.dataset import CaseFiles
from planner.nifti import load_case
from planner.preprocess.transforms import (
    NormalizePerModalityd,
    normalize_channel,
    resample_image,
    resample_labels,
)
from tests.planner.helpers import write_nifti

_APPLY = T._apply_along  # the oracle must not go through the spy
CT_PROPS = {"mean": 40.0, "std": 30.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0}


# --------------------------------------------------------------------------------------- the oracle
def _whole_channel_resample(image: np.ndarray, new_shape: Sequence[int], order: int = 3) -> np.ndarray:
    """``resample_image`` before the slabs: float32 input, whole-channel float64 dense products."""
    image = np.asarray(image, dtype=np.float32)
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(image.shape[1:]) == new_shape:
        return np.ascontiguousarray(np.nan_to_num(image, nan=0.0))
    axes = T._separable_order(image.shape[1:], new_shape)
    out = np.empty((image.shape[0], *new_shape), dtype=np.float32)
    for c in range(image.shape[0]):
        channel = image[c]
        lo, hi = channel.min(), channel.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            channel = np.nan_to_num(channel, nan=0.0)
            lo, hi = channel.min(), channel.max()
        x = np.array(channel, dtype=np.float64)
        for a in axes:
            x = _APPLY(x, T._zoom_matrix(image.shape[1 + a], new_shape[a], order), a)
        out[c] = x
        np.clip(out[c], lo, hi, out=out[c])
    return out


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of two float32 arrays in units in the last place (0 where equal, +0 and -0 included)."""
    ia, ib = (np.asarray(v, dtype=np.float32).view(np.int32).astype(np.int64) for v in (a, b))
    ia, ib = (np.where(i < 0, -(2**31) - i, i) for i in (ia, ib))  # float order as integer order
    return np.abs(ia - ib)


def _assert_as_before(got: np.ndarray, ref: np.ndarray, exact: bool) -> None:
    assert got.dtype == np.float32 and got.shape == ref.shape and got.flags.c_contiguous
    if exact:
        np.testing.assert_array_equal(got, ref)
    else:
        u = _ulps(got, ref)
        assert u.max() <= 1, f"{int((u > 1).sum())} voxels more than 1 ulp off (max {int(u.max())})"
        assert (u == 0).mean() >= 0.999


@pytest.fixture
def contractions(monkeypatch):
    """(shape of the contracted array, axis) per ``_apply_along`` call of ``resample_image``."""
    calls: list[tuple[tuple[int, ...], int]] = []

    def spy(x, m, axis):
        calls.append((x.shape, axis))
        return _APPLY(x, m, axis)

    monkeypatch.setattr(T, "_apply_along", spy)
    return calls


def _path(calls, shape: Sequence[int], new_shape: Sequence[int], channels: int) -> str:
    """Which branch of ``_resample_channel`` made ``calls`` (one channel's worth is enough)."""
    axes = T._separable_order(shape, new_shape)
    first, axis = calls[0]
    if len(calls) == len(axes) * channels and first == tuple(shape):
        return "whole"
    assert axis == axes[0]
    if first[axis] == shape[axis]:  # slabs across an axis that keeps its size
        cut = [a for a in range(len(shape)) if first[a] != shape[a]]
        assert len(cut) == 1 and shape[cut[0]] == new_shape[cut[0]]
        return "unchanged"
    assert first[axis] < shape[axis]  # the band of input rows of a slab of output rows
    return "band" if all(first[a] == shape[a] for a in range(len(shape)) if a != axis) else "band+chunks"


def _image(dtype: type, shape: Sequence[int], channels: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.int16:
        x = rng.integers(-1024, 3000, (channels, *shape)).astype(np.int16)
        x[-1] //= 7  # channels of other ranges
    else:
        x = rng.normal(0, 300, (channels, *shape)).astype(dtype)
        x[-1] = x[-1] / 50 + 3
    return x


# shape, new shape, order, work_bytes, the path it takes. The banded shapes shrink a long axis (it is
# contracted first, so its halo of ~32 rows each side at order 3 is smaller than the axis)
CASES = [
    ((13, 17, 9), (20, 11, 14), 3, None, "whole"),
    ((12, 13), (30, 5), 3, None, "whole"),
    ((37, 41, 29), (37, 53, 31), 3, 8 * 3000, "unchanged"),
    ((37, 41, 29), (37, 53, 31), 1, 8 * 3000, "unchanged"),
    ((40, 30), (40, 77), 3, 8 * 1000, "unchanged"),
    ((400, 10, 10), (100, 30, 30), 3, 8 * 100_000, "band"),
    ((400, 10, 10), (100, 30, 30), 3, 8 * 5000, "band+chunks"),
    ((400, 10, 10), (100, 30, 30), 1, 8 * 30_000, "band"),
    ((400, 10, 10), (100, 30, 30), 0, 8 * 30_000, "band"),
    ((400, 10, 10), (100, 30, 30), 1, 8 * 1500, "band+chunks"),
    ((400, 6), (100, 60), 3, 8 * 6000, "band"),
    ((400, 12), (100, 50), 3, 8 * 3000, "band+chunks"),
    ((400, 12), (100, 50), 1, 8 * 2000, "band+chunks"),
]


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
@pytest.mark.parametrize(("shape", "new_shape", "order", "work_bytes", "path"), CASES)
def test_slabs_equal_the_whole_channel_products(contractions, dtype, shape, new_shape, order, work_bytes, path):
    x = _image(dtype, shape)
    got = resample_image(x, new_shape, order=order, work_bytes=work_bytes)
    assert _path(contractions, shape, new_shape, x.shape[0]) == path
    assert path == "whole" or len(contractions) >= 4 * x.shape[0]  # many slabs
    exact = order <= 1 or any(n == m for n, m in zip(shape, new_shape, strict=True))
    _assert_as_before(got, _whole_channel_resample(x, new_shape, order), exact=exact)


@pytest.mark.parametrize(("shape", "new_shape", "work_bytes"), [((40, 30), (40, 77), 8 * 1000),
                                                                ((400, 10, 10), (100, 30, 30), 8 * 20_000)])
def test_slabs_replace_nan_and_inf_as_before(shape, new_shape, work_bytes):
    x = _image(np.float32, shape)
    x[0].flat[[5, 77, 1111]] = np.nan, np.inf, -np.inf
    x[1].flat[-3] = np.inf
    got = resample_image(x, new_shape, work_bytes=work_bytes)
    assert np.isfinite(got).all()
    # inf becomes the float32 extremes, whose products leave float64 roundings at a far larger scale
    np.testing.assert_allclose(got, _whole_channel_resample(x, new_shape), rtol=1e-6,
                               atol=1e-12 * float(np.finfo(np.float32).max))
    if shape[0] == new_shape[0]:
        np.testing.assert_array_equal(got, _whole_channel_resample(x, new_shape))


def test_strided_input_and_unchanged_shape_as_before():
    x = np.ascontiguousarray(np.swapaxes(_image(np.int16, (30, 20, 400)), 1, -1)).swapaxes(1, -1)  # Transposed
    assert not x.flags.c_contiguous
    got = resample_image(x, (30, 20, 100), work_bytes=8 * 5000)
    _assert_as_before(got, _whole_channel_resample(x, (30, 20, 100)), exact=True)
    same = resample_image(x, x.shape[1:])
    assert same.dtype == np.float32 and not np.shares_memory(same, x)
    np.testing.assert_array_equal(same, x.astype(np.float32))


def test_the_comparison_catches_a_halo_one_row_short(monkeypatch):
    """The oracle tests can fail: a band one input row short at either end (order 1: exact band) or a
    cut halo at order 3 changes the output."""
    shape, new_shape = (400, 10, 10), (100, 30, 30)
    x = _image(np.float32, shape)
    band = T._zoom_band
    for cut, order in (((1, 0), 1), ((0, 1), 1), ((26, 0), 3)):
        monkeypatch.setattr(T, "_zoom_band", lambda n_in, n_out, o, cut=cut: (band(n_in, n_out, o)[0] + cut[0],
                                                                            band(n_in, n_out, o)[1] - cut[1]))
        got = resample_image(x, new_shape, order=order, work_bytes=8 * 30_000)
        with pytest.raises(AssertionError):
            _assert_as_before(got, _whole_channel_resample(x, new_shape, order), exact=order <= 1)


def test_work_memory_stays_near_work_bytes():
    """Besides input and output only ~work_bytes of float64 are alive (the whole-channel version held a
    float64 copy of the channel and its intermediates: ~3 times the input's size in float64)."""
    x = _image(np.int16, (200, 100, 80), channels=1)
    new_shape, work = (100, 117, 91), 2**20
    resample_image(x[:, :8, :8, :8], (4, 9, 9), work_bytes=work)  # zoom matrices of other sizes: warm-up
    tracemalloc.start()
    try:
        out = resample_image(x, new_shape, work_bytes=work)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    matrices = sum(8 * m * n for n, m in zip(x.shape[1:], new_shape, strict=True))
    assert peak - out.nbytes <= 3 * work + 2 * matrices, peak
    assert 8 * x[0].size > 6 * work  # the old whole-channel copy alone would exceed the bound


# ------------------------------------------------------------------------------------ normalisation
def _normalize_as_before(x, scheme, props, mask, use_mask):
    """``normalize_channel`` before ``out=`` (new arrays at every step)."""
    x = np.asarray(x, dtype=np.float32)
    if scheme in ("CT", "CT2"):
        lb, ub = float(props["percentile_00_5"]), float(props["percentile_99_5"])
        if scheme == "CT":
            mean, std = float(props["mean"]), float(props["std"])
            out = np.clip(x, lb, ub)
        else:
            inside = (x > lb) & (x < ub)
            out = np.clip(x, lb, ub)
            vals = out[inside]
            mean = float(vals.mean(dtype=np.float64)) if vals.size else 0.0
            std = float(vals.std(dtype=np.float64)) if vals.size else 0.0
        out = ((out - mean) / max(std, T.NORM_EPS)).astype(np.float32)
        if use_mask:
            out[~mask] = 0
        return out
    vals = x[mask] if use_mask else np.ravel(x)
    mean, std = float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64))
    if not use_mask:
        return ((vals - mean) / (std + T.NORM_EPS)).reshape(x.shape)
    out = np.zeros_like(x)
    out[mask] = (vals - mean) / (std + T.NORM_EPS)
    return out


@pytest.mark.parametrize("scheme", ["CT", "CT2", "nonCT"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_normalize_into_out_equals_new_arrays(scheme, use_mask):
    rng = np.random.default_rng(11)
    x = rng.normal(20, 150, (9, 10, 11)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[1:7, 2:9] = True
    ref = _normalize_as_before(x, scheme, CT_PROPS, mask, use_mask)
    keep = x.copy()
    np.testing.assert_array_equal(normalize_channel(x, scheme, CT_PROPS, mask, use_mask), ref)
    out = np.full(x.shape, np.nan, np.float32)
    assert normalize_channel(x, scheme, CT_PROPS, mask, use_mask, out=out) is out
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(x, keep)  # only ``out`` is written
    assert normalize_channel(x, scheme, CT_PROPS, mask, use_mask, out=x) is x  # in place
    np.testing.assert_array_equal(x, ref)


def _normalize_d(in_place: bool) -> NormalizePerModalityd:
    return NormalizePerModalityd("image", ["CT", "nonCT"], [CT_PROPS, {}], [False, True], in_place=in_place)


def test_normalize_in_place_gives_the_same_values_into_the_array_it_owns():
    rng = np.random.default_rng(12)
    img = np.stack([rng.normal(0, 200, (6, 7, 8)), rng.normal(5, 2, (6, 7, 8))]).astype(np.float32)
    mask = np.zeros((1, 6, 7, 8), bool)
    mask[0, 1:5] = True
    ref = _normalize_d(False)({"image": img.copy(), "mask": mask})["image"]
    own = img.copy()
    out = _normalize_d(True)({"image": own, "mask": mask})["image"]
    assert out is own
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("kind", ["read-only", "float64", "strided", "view", "tensor"])
def test_normalize_in_place_leaves_arrays_it_does_not_own(kind):
    rng = np.random.default_rng(13)
    img = np.stack([rng.normal(0, 200, (6, 7, 8)), rng.normal(5, 2, (6, 7, 8))]).astype(np.float32)
    mask = np.ones((1, 6, 7, 8), bool)
    ref = _normalize_d(False)({"image": img.copy(), "mask": mask})["image"]
    if kind == "read-only":
        given = img.copy()
        given.flags.writeable = False
    elif kind == "float64":
        given = img.astype(np.float64)
    elif kind == "strided":
        given = np.ascontiguousarray(np.swapaxes(img, 1, 3)).swapaxes(1, 3)
    elif kind == "view":  # C-contiguous, writable, but memory of another array
        given = np.concatenate([img, img])[:2]
    else:
        given = torch.from_numpy(img.copy())
    before = np.array(T.to_numpy(given), copy=True)
    out = _normalize_d(True)({"image": given, "mask": mask})["image"]
    np.testing.assert_array_equal(T.to_numpy(given), before)
    np.testing.assert_array_equal(out, ref)


# ----------------------------------------------------------------------------- crop and label maps
@pytest.mark.parametrize("new_shape", [(5, 6, 7), (9, 4, 7)])
def test_resample_labels_never_writes_the_callers_array(new_shape):
    seg = np.random.default_rng(14).integers(-3, 5, (1, 5, 6, 7)).astype(np.int16)
    keep = seg.copy()
    out = resample_labels(seg, new_shape)
    np.testing.assert_array_equal(seg, keep)
    assert out.min() >= -1 and not np.shares_memory(out, seg)
    if new_shape == seg.shape[1:]:
        np.testing.assert_array_equal(out, np.where(keep < -1, 0, keep))
    clean = np.clip(keep, -1, None)
    same = resample_labels(clean, clean.shape[1:])
    assert same is clean  # nothing to change: no copy of a whole map


def test_crop_with_nothing_to_crop_returns_the_arrays_themselves():
    rng = np.random.default_rng(15)
    data = rng.integers(1, 100, (1, 6, 7, 8)).astype(np.int16)  # nonzero everywhere: nothing to crop
    seg = rng.integers(0, 3, (6, 7, 8)).astype(np.int16)
    data_c, seg_c, bbox = crop_case(data, seg)
    assert bbox == [[0, 6], [0, 7], [0, 8]]
    assert np.shares_memory(data_c, data) and np.shares_memory(seg_c, seg)  # views of the whole arrays
    np.testing.assert_array_equal(seg_c, seg)  # no -1: all inside the body
    f_data, f_seg = np.asfortranarray(data), np.asfortranarray(seg)  # as NIfTI arrives: C-ordered copies
    data_f, seg_f, _ = crop_case(f_data, f_seg)
    assert data_f.flags.c_contiguous and seg_f.flags.c_contiguous
    np.testing.assert_array_equal(data_f, data)
    np.testing.assert_array_equal(seg_f, seg)
    keep = seg.copy()
    data[0, 0] = 0  # a slab of air: cropped away, nothing left to mark (a contiguous view)
    data_c, seg_c, bbox = crop_case(data, seg)
    assert bbox == [[1, 6], [0, 7], [0, 8]] and seg_c.flags.c_contiguous
    np.testing.assert_array_equal(seg_c, seg[1:])
    data[0, 1, 0] = 0  # a line of air on a face inside the bbox: marked -1 in a copy, not in ``seg``
    data_c, seg_c, bbox = crop_case(data, seg)
    assert bbox == [[1, 6], [0, 7], [0, 8]] and not np.shares_memory(seg_c, seg)
    np.testing.assert_array_equal(seg_c[0, 0], np.where(keep[1, 0] == 0, -1, keep[1, 0]))
    np.testing.assert_array_equal(seg, keep)


@pytest.mark.parametrize("slab_voxels", [1, 30, 200, 10**9])
def test_fill_holes_in_slabs_equals_scipy(slab_voxels):
    from scipy import ndimage

    from planner.crop import fill_holes

    rng = np.random.default_rng(18)
    for _ in range(40):
        shape = tuple(int(n) for n in rng.integers(1, 13, rng.choice([2, 3])))
        mask = rng.random(shape) < rng.uniform(0.3, 0.9)
        if rng.random() < 0.5:
            mask = ndimage.binary_dilation(mask)  # blobs with enclosed holes
        np.testing.assert_array_equal(fill_holes(mask, slab_voxels=slab_voxels), ndimage.binary_fill_holes(mask))


def test_fill_holes_joins_background_across_slabs():
    """A background tunnel reaches the border only through the slabs above it: not a hole."""
    from planner.crop import fill_holes

    mask = np.ones((6, 5, 5), bool)
    mask[0:4, 2, 2] = False  # open at the axis-0 face of the first slab only
    mask[4, 2, 2] = False
    mask[3, 2, 2] = True  # ... and a closed hole below a wall
    for slab_voxels in (25, 50, 10**9):  # slabs of 1 and 2 rows, and the whole volume
        got = fill_holes(mask, slab_voxels=slab_voxels)
        assert not got[0:3, 2, 2].any() and got[4, 2, 2] and got.sum() == mask.size - 3


# --------------------------------------------------------------------------------------- load_case
def _case(tmp_path, image: np.ndarray | list[np.ndarray], label: np.ndarray | None) -> CaseFiles:
    images = image if isinstance(image, list) else [image]
    paths = tuple(write_nifti(tmp_path / f"c_{i:04d}.nii.gz", im, (0.7, 0.8, 1.5)) for i, im in enumerate(images))
    lab = js = None
    if label is not None:
        lab = write_nifti(tmp_path / "c.nii.gz", label, (0.7, 0.8, 1.5))
        js = tmp_path / "c.json"
        js.write_text(json.dumps({"instances": {str(i): 0 for i in np.unique(label) if i > 0}}))
    return CaseFiles("c", paths, lab, js)


@pytest.mark.parametrize("kind", ["int16+uint8", "float32", "two int16 modalities", "uint16 label > int16"])
def test_compact_load_gives_the_same_values(tmp_path, kind):
    rng = np.random.default_rng(16)
    shape = (9, 8, 7)
    image = rng.integers(-1024, 3000, shape).astype(np.int16)
    label = rng.integers(0, 4, shape).astype(np.uint8)
    if kind == "float32":
        image = rng.normal(0, 1, shape).astype(np.float32)
    elif kind == "two int16 modalities":
        image = [image, image // 3]
    elif kind == "uint16 label > int16":
        label = label.astype(np.uint16) * 20_000
    files = _case(tmp_path, image, label)
    plain, compact = load_case(files, 3), load_case(files, 3, compact=True)
    np.testing.assert_array_equal(compact.data, plain.data)
    np.testing.assert_array_equal(compact.seg, plain.seg)
    assert plain.data.dtype == np.float32 and plain.seg.dtype == np.int32
    assert compact.data.flags.c_contiguous and compact.seg.flags.c_contiguous
    assert compact.data.dtype == (np.int16 if kind in ("int16+uint8", "uint16 label > int16") else np.float32)
    assert compact.seg.dtype == (np.int32 if kind == "uint16 label > int16" else np.int16)
    assert compact.instances == plain.instances and compact.spacing == plain.spacing
    np.testing.assert_array_equal(compact.affine, plain.affine)


@pytest.mark.parametrize("air", [-1024, 0])  # nothing cropped (the whole arrays go on), or a crop with -1
def test_bundle_chain_on_compact_load_equals_the_plain_chain(tmp_path, air):
    """What ``preprocess_case`` now runs (compact load, in-place normalisation of the bundle chain, slab
    resampling) gives the arrays the float32 load and the out-of-place normalisation give."""
    from planner.bundle import generate_bundle
    from planner.preprocess.run import load_preprocessing
    from tests.planner.test_bundle import make_dataset, make_plan

    rng = np.random.default_rng(17)
    shape = (40, 36, 12)
    image = np.full(shape, air, np.int16)
    image[3:37, 2:34, 1:11] = rng.integers(-200, 1500, (34, 32, 10))
    label = np.zeros(shape, np.uint8)
    label[10:16, 8:14, 3:7], label[24:30, 20:27, 5:9] = 1, 2
    files = _case(tmp_path, image, label)
    plan = make_plan(target_spacing=[1.1, 0.9, 1.0], transpose_forward=[2, 0, 1], schemes=["CT"], use_mask=[True],
                     modalities={"0": "CT"}, intensity=[CT_PROPS])
    chain = load_preprocessing(generate_bundle(plan, make_dataset(plan), tmp_path / "bundle"))
    norm = chain.transforms[-1]
    assert isinstance(norm, NormalizePerModalityd) and norm.in_place
    outs = []
    for compact, in_place in ((False, False), (True, True)):
        case = load_case(files, 3, compact=compact)
        norm.in_place = in_place
        out = chain({"image": case.data, "seg": case.seg[None], "spacing": case.spacing})
        outs.append((T.to_numpy(out["image"]), T.to_numpy(out["seg"]), out["crop_bbox"]))
        np.testing.assert_array_equal(case.data, load_case(files, 3, compact=compact).data)  # input not written
    (img0, seg0, bbox0), (img1, seg1, bbox1) = outs
    assert bbox0 == bbox1 and img1.dtype == img0.dtype == np.float32
    assert (seg0.min() == -1) == (air == 0)
    np.testing.assert_array_equal(img1, img0)
    np.testing.assert_array_equal(seg1, seg0)


def _body_case(seed: int = 0):
    """[1, 20, 24, 18] int16 image with air around a body box, and an instance map inside and outside it."""
    rng = np.random.default_rng(seed)
    image = np.zeros((1, 20, 24, 18), np.int16)
    image[0, 3:17, 2:22, 4:15] = rng.integers(1, 500, (14, 20, 11))
    image[0, 3:6, 2:6, 4:7] = 0  # air in a corner of the body's bbox: background there becomes -1
    seg = np.zeros((20, 24, 18), np.int16)
    seg[5:9, 5:9, 6:10] = 1
    seg[0:2, 0:3, 0:2] = 2  # in the air: kept as 2 (only background becomes -1)
    return image, seg


def test_crop_marks_in_place_only_when_given_the_map():
    image, seg = _body_case()
    before = seg.copy()
    _, plain, _ = crop_case(image, seg)
    np.testing.assert_array_equal(seg, before)  # not given: never written
    assert (plain == -1).any() and not np.shares_memory(plain, seg)
    full = np.zeros((1, 20, 24, 18), np.int16)
    full[0] = image[0]
    full[0, 0, 0, 0], full[0, -1, -1, -1] = 7, 7  # the body's bbox is now the whole scan: its crop is the map itself
    _, plain2, _ = crop_case(full, seg)
    _, given, _ = crop_case(full, seg, seg_in_place=True)
    np.testing.assert_array_equal(given, plain2)
    assert np.shares_memory(given, seg)  # written into the map it was given: no second whole map


@pytest.mark.parametrize("consume", [False, True])
def test_consuming_crop_and_resample_give_the_same_values(consume):
    image, seg = _body_case(1)
    crop = T.CropForegroundNonzerod(consume=consume)
    res = T.ResampleToSpacingd(keys=[T.IMAGE_KEY, T.SEG_KEY, T.MASK_KEY], target_spacing=[1.5, 1.0, 2.0],
                               order=[3, 0, 0], consume=consume)
    given = {T.IMAGE_KEY: image.copy(), T.SEG_KEY: seg[None].copy(), T.SPACING_KEY: [1.0, 1.0, 1.0]}
    kept = {k: np.copy(v) for k, v in given.items()}
    out = res(crop(dict(given) if not consume else given))
    ref = T.ResampleToSpacingd(keys=[T.IMAGE_KEY, T.SEG_KEY, T.MASK_KEY], target_spacing=[1.5, 1.0, 2.0],
                               order=[3, 0, 0])(T.CropForegroundNonzerod()(dict(kept)))
    for k in (T.IMAGE_KEY, T.SEG_KEY, T.MASK_KEY):
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]))
    if not consume:  # the caller's dict and arrays are left as they were
        assert set(given) == set(kept)
        for k in (T.IMAGE_KEY, T.SEG_KEY):
            np.testing.assert_array_equal(given[k], kept[k])
    else:  # the chain's own dict now holds the outputs, not the inputs
        assert given[T.SEG_KEY].shape == out[T.SEG_KEY].shape
