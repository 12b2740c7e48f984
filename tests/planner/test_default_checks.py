"""The default `nndet_prep` (no --full_check) stops on bad data it loads anyway for the fingerprint, before
writing anything, with the file and the fix; float label maps near integers are read as the integers.

Each of these went through silently before (exit 0, a valid-looking fingerprint and plans)."""

from __future__ import annotations

import numpy as np
import pytest

from planner.dataset import DatasetError
from planner.fingerprint import compute_fingerprint
from planner.nifti import label_to_int
from planner.prep import fingerprint_path, run_prep
from tests.planner.helpers import cube_case, det_env, write_nifti, write_task


def _task(tmp_path, **change):
    cases = [cube_case(f"case_{i}", seed=i) for i in range(3)]
    task = write_task(tmp_path, cases=cases)
    labels = task / "raw_splitted" / "labelsTr"
    images = task / "raw_splitted" / "imagesTr"
    return task, images, labels, cases


def _problems(task) -> list[tuple[str, str]]:
    with pytest.raises(DatasetError) as e:
        compute_fingerprint(task)
    return e.value.problems


def test_nan_voxels_are_a_problem(tmp_path):
    task, images, _, cases = _task(tmp_path)
    img = cases[1].images[0].copy()
    img[3, 3, 3] = np.nan
    write_nifti(images / "case_1_0000.nii.gz", img)
    (f, why), = _problems(task)
    assert f.endswith("case_1_0000.nii.gz") and "NaN/inf" in why


def test_label_header_origin_or_spacing_differing_from_the_image(tmp_path):
    task, _, labels, cases = _task(tmp_path)
    write_nifti(labels / "case_0.nii.gz", cases[0].seg, affine=np.diag([1.0, 1.0, 1.0, 1.0]) + np.eye(4, k=3) * 5)
    write_nifti(labels / "case_2.nii.gz", cases[2].seg, spacing=(1.0, 1.0, 2.0))
    problems = dict(_problems(task))
    assert "origin/direction" in problems[str(labels / "case_0.nii.gz")]
    assert "spacing" in problems[str(labels / "case_2.nii.gz")]


def test_non_integer_and_negative_labels(tmp_path):
    task, _, labels, cases = _task(tmp_path)
    half = cases[0].seg.astype(np.float32)
    half[half > 0] = 0.5
    write_nifti(labels / "case_0.nii.gz", half)
    neg = cases[1].seg.astype(np.int16)
    neg[0, 0, 0] = -1
    write_nifti(labels / "case_1.nii.gz", neg)
    problems = dict(_problems(task))
    assert "non-integer" in problems[str(labels / "case_0.nii.gz")]
    assert "negative" in problems[str(labels / "case_1.nii.gz")]


def test_shape_mismatch_is_a_check_problem_and_nothing_is_written(tmp_path, monkeypatch):
    det_env(monkeypatch, tmp_path)
    task, _, labels, cases = _task(tmp_path / "data")
    write_nifti(labels / "case_2.nii.gz", np.zeros((16, 16, 15), np.uint8))
    with pytest.raises(DatasetError) as e:
        run_prep(task.name, preset="cpu")
    assert any(f.endswith("case_2.nii.gz") and "shape" in why for f, why in e.value.problems)
    assert not fingerprint_path(task).exists()
    assert not (task / "preprocessed").exists() or not any((task / "preprocessed").rglob("*.json"))


def test_a_float_label_near_an_integer_keeps_its_instance(tmp_path):
    task, _, labels, cases = _task(tmp_path)
    almost = cases[0].seg.astype(np.float32) * np.float32(0.9999999)
    write_nifti(labels / "case_0.nii.gz", almost)
    fp = compute_fingerprint(task)
    assert [c.instance_ids for c in fp.cases] == [[1], [1], [1]]
    with pytest.raises(DatasetError, match="non-integer"):
        label_to_int(np.array([0.0, 1.4]), "x.nii.gz")
    assert label_to_int(np.array([0.0, 0.9999999, 2.0004]), "x").tolist() == [0, 1, 2]


def test_a_task_without_any_object_fails_and_one_case_warns(tmp_path, caplog):
    empty = [cube_case(f"case_{i}", seed=i, boxes=[]) for i in range(2)]
    for c in empty:
        c.instances = {}
    task = write_task(tmp_path / "a", cases=empty)
    (f, why), = _problems(task)
    assert f.endswith("labelsTr") and "no object in any of the 2 training case(s)" in why
    one = write_task(tmp_path / "b", cases=[cube_case("case_0")])
    with caplog.at_level("WARNING"):
        compute_fingerprint(one)
    assert "only 1 training case" in caplog.text and "add annotated cases" in caplog.text
