"""Fingerprint on tiny synthetic tasks whose boxes, crops and intensities are known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from planner.crop import crop_case
from planner.dataset import DatasetError
from planner.fingerprint import (
    INTENSITY_SUBSAMPLE,
    Fingerprint,
    compute_fingerprint,
    instance_boxes,
)

SPACING_3D = (0.8, 0.9, 2.5)


def _write_nifti(arr: np.ndarray, spacing: tuple[float, ...], path: Path) -> None:
    affine = np.diag([*spacing, *([1.0] * (4 - len(spacing)))])
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def _write_task(root: Path, dim: int, cases: dict[str, dict], num_modalities: int, spacing) -> Path:
    """cases: id -> {"images": [array per modality], "seg": array, "instances": {id: class}}."""
    raw = root / "raw_splitted"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "task": root.name, "dim": dim, "labels": {"0": "a", "1": "b"},
        "modalities": {str(m): f"MR{m}" for m in range(num_modalities)},
    }))
    for cid, c in cases.items():
        extra = (lambda a: a[..., None]) if dim == 2 else (lambda a: a)  # 2D stored as (X, Y, 1)
        for m, img in enumerate(c["images"]):
            _write_nifti(extra(img.astype(np.float32)), spacing, raw / "imagesTr" / f"{cid}_{m:04d}.nii.gz")
        _write_nifti(extra(c["seg"].astype(np.int16)), spacing, raw / "labelsTr" / f"{cid}.nii.gz")
        (raw / "labelsTr" / f"{cid}.json").write_text(
            json.dumps({"instances": {str(k): v for k, v in c["instances"].items()}})
        )
    return root


def _case_3d(rng, shape, body, cubes) -> dict:
    """Two modalities nonzero inside ``body`` (zero outside), cubes (slices, id, class) brighter."""
    bs = tuple(slice(lo, hi) for lo, hi in body)
    img0, img1 = np.zeros(shape), np.zeros(shape)
    img0[bs] = rng.uniform(1.0, 2.0, size=img0[bs].shape)
    img1[bs] = rng.uniform(-3.0, -1.0, size=img1[bs].shape)
    seg = np.zeros(shape, dtype=np.int16)
    for sl, iid, _ in cubes:
        seg[sl] = iid
        img0[sl] += 5.0
        img1[sl] *= 2.0
    return {"images": [img0, img1], "seg": seg, "instances": {iid: k for _, iid, k in cubes}}


@pytest.fixture(scope="module")
def task3d(tmp_path_factory):
    rng = np.random.default_rng(0)
    shape = (20, 24, 16)
    cases = {
        # two cubes, body cropped to [2,18) x [3,21) x [1,15)
        "case_0": _case_3d(rng, shape, [[2, 18], [3, 21], [1, 15]], [
            (np.s_[4:8, 5:10, 2:6], 1, 0),
            (np.s_[10:16, 12:20, 8:14], 2, 1),
        ]),
        # no crop (body everywhere), one cube at the corner of the volume
        "case_1": _case_3d(rng, shape, [[0, 20], [0, 24], [0, 16]], [(np.s_[0:3, 0:5, 0:2], 1, 1)]),
        # no foreground at all
        "case_2": _case_3d(rng, shape, [[5, 15], [5, 15], [5, 15]], []),
    }
    for img in cases["case_0"]["images"]:  # a zero hole inside the body: filled by crop_case, same bbox
        img[12:14, 5:7, 3:5] = 0.0
    root = _write_task(tmp_path_factory.mktemp("t") / "Task901_Fp", 3, cases, 2, SPACING_3D)
    return root, cases


def test_instance_boxes_half_open_ignores_negative_and_missing_ids():
    seg = np.full((6, 7), -1, dtype=np.int32)
    seg[1:4, 2:3] = 1  # rows 1..3, col 2
    seg[5, 0:7] = 3  # id 2 absent
    seg[0, 0] = 0
    ids, boxes = instance_boxes(seg)
    assert ids == [1, 3]
    assert boxes == [[1, 2, 4, 3], [5, 0, 6, 7]]
    assert instance_boxes(np.zeros((3, 3, 3), dtype=np.int32)) == ([], [])


def test_fingerprint_3d_two_modalities(task3d):
    root, cases = task3d
    fp = compute_fingerprint(root)
    assert fp.dim == 3 and fp.task == root.name
    assert [c.case_id for c in fp.cases] == ["case_0", "case_1", "case_2"]
    c0, c1, c2 = fp.cases

    # crop bbox and size reduction from the construction
    assert c0.shape == [20, 24, 16] and c0.spacing == pytest.approx(SPACING_3D)
    assert c0.crop_bbox == [[2, 18], [3, 21], [1, 15]]
    assert c0.shape_after_crop == [16, 18, 14]
    assert c0.size_reduction == pytest.approx(16 * 18 * 14 / (20 * 24 * 16))
    assert c1.crop_bbox == [[0, 20], [0, 24], [0, 16]] and c1.size_reduction == 1.0
    assert c2.crop_bbox == [[5, 15], [5, 15], [5, 15]]
    for cfp in (c0, c1, c2):  # the frame preprocessing crops to (boxes must live in the same one)
        assert cfp.crop_bbox == crop_case(np.stack(cases[cfp.case_id]["images"]), None)[2]

    # boxes: StandardMode half-open, in cropped coordinates (raw cube minus crop start)
    assert c0.instance_ids == [1, 2] and c0.box_classes == [0, 1]
    assert c0.boxes == [[4 - 2, 5 - 3, 2 - 1, 8 - 2, 10 - 3, 6 - 1], [10 - 2, 12 - 3, 8 - 1, 16 - 2, 20 - 3, 14 - 1]]
    assert c1.boxes == [[0, 0, 0, 3, 5, 2]] and c1.box_classes == [1]
    assert c2.boxes == [] and c2.box_classes == [] and c2.intensity == [] and c2.volume_per_class == {}

    vox = float(np.prod(SPACING_3D))
    assert c0.volume_per_class == pytest.approx({"0": 4 * 5 * 4 * vox, "1": 6 * 8 * 6 * vox})
    assert fp.num_instances == {"0": 1, "1": 2}

    # box sizes in mm (derived view) from the cube edges
    np.testing.assert_allclose(fp.box_sizes_mm(), np.array([[4, 5, 4], [6, 8, 6], [3, 5, 2]]) * SPACING_3D)

    # intensity statistics against a direct numpy computation on the raw arrays
    for m in range(2):
        pooled_parts = []
        for cid, cfp in zip(("case_0", "case_1"), (c0, c1), strict=True):
            c = cases[cid]
            vals = c["images"][m].astype(np.float32)[c["seg"] > 0].astype(np.float64)
            s = cfp.intensity[m]
            assert s.num_voxels == vals.size
            assert s.mean == pytest.approx(vals.mean(), rel=1e-6)
            assert s.std == pytest.approx(vals.std(), rel=1e-6)
            assert s.median == pytest.approx(np.median(vals), rel=1e-6)
            assert (s.min, s.max) == pytest.approx((vals.min(), vals.max()))
            pooled_parts.append(vals[::INTENSITY_SUBSAMPLE])
        pooled = np.concatenate(pooled_parts)
        p = fp.intensity[m]
        assert p.num_voxels == pooled.size
        assert p.mean == pytest.approx(pooled.mean(), rel=1e-6)
        assert p.std == pytest.approx(pooled.std(), rel=1e-6)
        assert p.percentile_00_5 == pytest.approx(np.percentile(pooled, 0.5), rel=1e-6)
        assert p.percentile_99_5 == pytest.approx(np.percentile(pooled, 99.5), rel=1e-6)
        assert p.median == pytest.approx(np.median(pooled), rel=1e-6)
    # modality 1 is negative inside the body: the stats are not those of modality 0
    assert fp.intensity[1].max < 0 < fp.intensity[0].min


def test_fingerprint_json_round_trip(task3d, tmp_path):
    fp = compute_fingerprint(task3d[0])
    path = fp.to_json(tmp_path / "fp.json")
    assert Fingerprint.from_json(path) == fp
    json.loads(path.read_text())  # plain JSON (no NaN, no pickle)


def test_fingerprint_parallel_equals_serial(task3d):
    assert compute_fingerprint(task3d[0], num_processes=2) == compute_fingerprint(task3d[0], num_processes=0)


def test_fingerprint_2d(tmp_path):
    rng = np.random.default_rng(1)
    shape = (30, 20)
    img = np.zeros(shape)
    img[3:27, 2:20] = rng.uniform(0.5, 1.0, size=(24, 18))
    seg = np.zeros(shape, dtype=np.int16)
    seg[5:9, 4:15] = 1
    seg[20:26, 10:12] = 2
    cases = {"img_a": {"images": [img], "seg": seg, "instances": {1: 1, 2: 0}}}
    fp = compute_fingerprint(_write_task(tmp_path / "Task902_Fp2D", 2, cases, 1, (0.5, 0.7)))
    (c,) = fp.cases
    assert fp.dim == 2 and c.shape == [30, 20] and c.spacing == pytest.approx([0.5, 0.7])
    assert c.crop_bbox == [[3, 27], [2, 20]]
    assert c.boxes == [[5 - 3, 4 - 2, 9 - 3, 15 - 2], [20 - 3, 10 - 2, 26 - 3, 12 - 2]]
    assert c.box_classes == [1, 0] and fp.num_instances == {"0": 1, "1": 1}
    np.testing.assert_allclose(fp.box_sizes_mm(), [[4 * 0.5, 11 * 0.7], [6 * 0.5, 2 * 0.7]])
    assert fp.intensity[0].num_voxels == len(img[seg > 0][::INTENSITY_SUBSAMPLE])


def test_instance_missing_from_json_names_the_file(tmp_path):
    shape = (8, 8, 8)
    img = np.arange(512, dtype=np.float64).reshape(shape) + 1  # not constant: that would be a problem of its own
    seg = np.zeros(shape, dtype=np.int16)
    seg[1:3, 1:3, 1:3] = 1
    seg[5:7, 5:7, 5:7] = 2
    root = _write_task(tmp_path / "Task903_Bad", 3, {"c": {"images": [img], "seg": seg, "instances": {1: 0}}},
                       1, (1.0, 1.0, 1.0))
    with pytest.raises(DatasetError) as err:
        compute_fingerprint(root)
    (problem,) = err.value.problems
    assert problem[0].endswith("c.json") and "[2]" in problem[1]
