"""Toy data generator: layout, determinism, object geometry, options and safety."""

from __future__ import annotations

import filecmp
import json

import nibabel as nib
import numpy as np
import pytest

from planner.crop import bbox_of_mask
from planner.presets import PRESET_NAMES
from planner.toy import (
    PRESETS,
    case_counts,
    generate_example,
    make_case,
    resolve_spec,
)


def _load(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_layout_and_dataset_json(tmp_path):
    task = generate_example(tmp_path, preset="cpu", num_train=3, num_test=2, size=24)
    assert task == tmp_path / "Task000D3_Example"
    meta = json.loads((task / "dataset.json").read_text())
    assert meta == {
        "task": "Task000D3_Example", "name": "Example", "target_class": None, "test_labels": True,
        "labels": {"0": "Square", "1": "SquareHole"}, "modalities": {"0": "MRI"}, "dim": 3,
    }
    raw = task / "raw_splitted"
    # training ids 0..2, test ids continue at 3
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == [f"case_{i}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (raw / "imagesTs").iterdir()) == [f"case_{i}_0000.nii.gz" for i in (3, 4)]
    for split, ids in (("Tr", range(3)), ("Ts", (3, 4))):
        names = sorted(p.name for p in (raw / f"labels{split}").iterdir())
        assert names == sorted([f"case_{i}.nii.gz" for i in ids] + [f"case_{i}.json" for i in ids])
        for i in ids:
            inst = json.loads((raw / f"labels{split}" / f"case_{i}.json").read_text())["instances"]
            assert list(inst) == ["1"] and inst["1"] in (0, 1)
            assert set(np.unique(_load(raw / f"labels{split}" / f"case_{i}.nii.gz"))) == {0, 1}
    # the files hold make_case's arrays in (i, j, k) order, spacing in the affine
    spec = resolve_spec("cpu", 3, 24, None, "MRI")
    for i, split in ((0, "Tr"), (4, "Ts")):
        case = make_case(i, spec)
        img = nib.load(str(raw / f"images{split}" / f"case_{i}_0000.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), case.image)
        np.testing.assert_array_equal(_load(raw / f"labels{split}" / f"case_{i}.nii.gz"), case.mask)
        np.testing.assert_allclose(img.affine, np.eye(4))
    # nothing but the task folder is left in det_data (the temp folder was renamed)
    assert [p.name for p in tmp_path.iterdir()] == ["Task000D3_Example"]


def test_counts_default_full_and_explicit():
    assert case_counts(False, None, None) == (10, 10)
    assert case_counts(True, None, None) == (1000, 1000)
    assert case_counts(True, 5, None) == (5, 1000)
    with pytest.raises(ValueError):
        case_counts(False, 0, 1)


def test_default_counts_written(tmp_path):
    task = generate_example(tmp_path, preset="cpu", size=16)
    assert len(list((task / "raw_splitted" / "imagesTr").iterdir())) == 10
    assert len(list((task / "raw_splitted" / "imagesTs").iterdir())) == 10


def test_same_case_bytes_across_runs_and_process_counts(tmp_path):
    a = generate_example(tmp_path / "a", preset="cpu", num_train=3, num_test=1, size=24)
    b = generate_example(tmp_path / "b", preset="cpu", num_train=3, num_test=1, size=24, num_processes=2)
    files = sorted(p.relative_to(a) for p in (a / "raw_splitted").rglob("*") if p.is_file())
    assert len(files) == 12
    for f in files:
        assert filecmp.cmp(a / f, b / f, shallow=False), f


def test_seed_offset_changes_cases(tmp_path):
    spec = resolve_spec("cpu", 3, 32, None, "MRI")
    shifted = resolve_spec("cpu", 3, 32, None, "MRI", seed_offset=1)
    assert not np.array_equal(make_case(0, spec).image, make_case(0, shifted).image)
    # the offset only shifts the seed: case 1 equals case 0 with offset 1
    assert np.array_equal(make_case(1, spec).image, make_case(0, shifted).image)
    assert not np.array_equal(make_case(0, spec).image, make_case(1, spec).image)


def _find_cases(spec, n=40):
    cases = [make_case(i, spec) for i in range(n)]
    filled = [c for c in cases if c.cls == 0]
    holes = [c for c in cases if c.cls == 1]
    assert filled and holes, "40 seeds should give both classes"
    return filled, holes


@pytest.mark.parametrize("preset,size", [("cpu", None), ("cpu", 32), ("default", 96)])
def test_object_geometry_3d(preset, size):
    spec = resolve_spec(preset, 3, size, None, "MRI")
    filled, holes = _find_cases(spec)
    w = spec.width
    for c in filled + holes:
        box = bbox_of_mask(c.mask.astype(bool))
        edges = {hi - lo for lo, hi in box}
        assert len(edges) == 1, f"mask bbox {box} is not a cube"
        edge = edges.pop()
        assert spec.edge_lo <= edge < spec.edge_hi
        assert tuple(lo for lo, _ in box) + tuple(hi for _, hi in box) == c.box
        # object voxels are shifted by +0.4 and clipped, so they are never below 0.4
        assert c.image[c.mask > 0].min() >= 0.4 - 1e-6
        assert c.image.min() >= 0 and c.image.max() <= 1 and c.image.dtype == np.float32
    for c in filled:
        edge = c.box[3] - c.box[0]
        assert c.mask.sum() == edge**3
    for c in holes:
        edge = c.box[3] - c.box[0]
        inner = edge - 2 * w
        assert c.mask.sum() == edge**3 - edge * inner**2
        # the tunnel runs along the last axis (k): every k-slice of the box has the same ring
        x1, y1, z1, x2, y2, z2 = c.box
        rings = c.mask[x1:x2, y1:y2, z1:z2]
        assert (rings == rings[..., :1]).all()
        ring = rings[..., 0]
        assert ring[w:-w, w:-w].sum() == 0 and ring.sum() == edge**2 - inner**2
        # and the hole line through the centre is empty over the whole image
        assert c.mask[(x1 + x2) // 2, (y1 + y2) // 2, :].sum() == 0


def test_presets_follow_nndetection_and_scale():
    assert {name for name, _ in PRESETS} == set(PRESET_NAMES)  # the planner's preset names
    assert PRESETS[("default", 3)].size == 256
    spec = resolve_spec("default", 3, None, None, "MRI")
    assert (spec.edge_lo, spec.edge_hi, spec.width) == (16, 32, 4)
    # the former name "nndet" still means nnDetection's sizes (old command lines keep working)
    assert resolve_spec("nndet", 3, None, None, "MRI") == spec
    assert resolve_spec("nndet", 2, None, None, "MRI") == resolve_spec("default", 2, None, None, "MRI")
    cpu = resolve_spec("cpu", 3, None, None, "MRI")
    assert (cpu.size, cpu.edge_lo, cpu.edge_hi, cpu.width) == (64, 8, 16, 2)
    small = resolve_spec("cpu", 3, 32, None, "MRI")
    assert small.edge_lo >= 4 and small.edge_hi < 32 and small.edge_lo - 2 * small.width >= 2
    with pytest.raises(ValueError, match="too small"):
        resolve_spec("cpu", 3, 5, None, "MRI")
    with pytest.raises(ValueError, match="preset"):
        resolve_spec("gpu", 3, None, None, "MRI")


def test_no_overwrite_without_flag(tmp_path):
    task = generate_example(tmp_path, preset="cpu", num_train=1, num_test=0, size=16)
    marker = task / "raw_splitted" / "imagesTr" / "case_0_0000.nii.gz"
    before = marker.read_bytes()
    with pytest.raises(FileExistsError) as exc:
        generate_example(tmp_path, preset="cpu", num_train=2, num_test=0, size=16, seed_offset=5)
    assert str(task) in str(exc.value) and "overwrite" in str(exc.value)
    assert marker.read_bytes() == before
    generate_example(tmp_path, preset="cpu", num_train=2, num_test=0, size=16, seed_offset=5, overwrite=True)
    assert marker.read_bytes() != before
    assert len(list((task / "raw_splitted" / "imagesTr").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [task.name]


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    import planner.toy as toy

    def boom(job):
        raise RuntimeError("disk full")

    monkeypatch.setattr(toy, "_write_case", boom)
    with pytest.raises(RuntimeError):
        generate_example(tmp_path, preset="cpu", num_train=1, num_test=0, size=16)
    assert list(tmp_path.iterdir()) == []


def test_2d_task(tmp_path):
    task = generate_example(tmp_path, preset="cpu", num_train=6, num_test=1, size=48, dim=2)
    assert task.name == "Task001D2_Example"
    assert json.loads((task / "dataset.json").read_text())["dim"] == 2
    img = nib.load(str(task / "raw_splitted" / "imagesTr" / "case_0_0000.nii.gz"))
    assert img.shape == (48, 48, 1)
    spec = resolve_spec("cpu", 2, 48, None, "MRI")
    filled, holes = _find_cases(spec)
    for c in filled + holes:
        edge = c.box[2] - c.box[0]
        assert c.box[3] - c.box[1] == edge and spec.edge_lo <= edge < spec.edge_hi
        assert [list(b) for b in bbox_of_mask(c.mask.astype(bool))] == [[c.box[0], c.box[2]], [c.box[1], c.box[3]]]
    for c in holes:  # a square ring: walls of `width`, empty inside
        edge = c.box[2] - c.box[0]
        assert c.mask.sum() == edge**2 - (edge - 2 * spec.width) ** 2


def test_ct_like_anisotropic(tmp_path):
    task = generate_example(tmp_path, preset="cpu", num_train=3, num_test=0, size=32, spacing=(0.8, 0.8, 3.0),
                            modality="CT", task_name="Task101D3_CTLike", spacing_jitter=0.1)
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["modalities"] == {"0": "CT"} and meta["task"] == "Task101D3_CTLike"
    spacings = []
    for i in range(3):
        img = nib.load(str(task / "raw_splitted" / "imagesTr" / f"case_{i}_0000.nii.gz"))
        seg = nib.load(str(task / "raw_splitted" / "labelsTr" / f"case_{i}.nii.gz"))
        np.testing.assert_allclose(img.affine, seg.affine)
        sp = np.asarray(img.header.get_zooms())
        assert np.allclose(sp, [0.8, 0.8, 3.0], rtol=0.1 + 1e-6)
        spacings.append(tuple(sp))
        arr, mask = np.asanyarray(img.dataobj), np.asanyarray(seg.dataobj) > 0
        assert arr.dtype == np.int16
        assert arr[mask].min() >= 100 and arr[mask].max() <= 300
        assert arr[~mask].min() >= -1000 and arr[~mask].max() <= -800
    assert len(set(spacings)) == 3, "per-case jitter should give different spacings"


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="spacing"):
        generate_example(tmp_path, preset="cpu", size=16, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="task_name"):
        generate_example(tmp_path, preset="cpu", size=16, task_name="Task1.0_Bad")
    with pytest.raises(ValueError, match="dim"):
        generate_example(tmp_path, preset="cpu", size=16, dim=4)
