"""Dataset checks: valid tasks pass; every bad input gets a problem naming its file; all at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from planner.checks import assert_task_ok
from planner.dataset import DatasetError
from tests.planner.helpers import copy_task, cube_case, write_nifti, write_task


def _problems(task: Path, full: bool = True, num_processes: int = 0) -> list[tuple[str, str]]:
    with pytest.raises(DatasetError) as exc:
        assert_task_ok(task, full=full, num_processes=num_processes)
    return exc.value.problems


def _for(problems, path: Path) -> list[str]:
    """Reasons reported for exactly this file."""
    return [r for f, r in problems if f == str(path)]


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------- valid
@pytest.mark.parametrize("fixture", ["toy_task_3d", "toy_task_2d", "ct_like_task"])
def test_valid_tasks_pass_quick_and_full(fixture, request):
    task = request.getfixturevalue(fixture)
    before = _snapshot(task)
    assert_task_ok(task)
    assert_task_ok(task, full=True)
    assert _snapshot(task) == before, "checks must not write anything"


def test_full_check_in_parallel_finds_the_same(tmp_path):
    cases = [cube_case(f"case_{i}", seed=i) for i in range(4)]
    cases[2].images[0][:] = 0.0
    task = write_task(tmp_path, cases=cases)
    serial = _problems(task, num_processes=0)
    parallel = _problems(task, num_processes=2)
    assert serial == parallel and len(serial) == 1


def test_written_helper_task_passes(tmp_path):
    task = write_task(tmp_path, modalities={"0": "T1", "1": "T2"}, test_labels=True, cases=[
        cube_case("a", num_modalities=2), cube_case("b", num_modalities=2, boxes=[(0, 0, 0, 3, 3, 3),
                                                                                  (8, 8, 8, 12, 12, 12)],
                                                    classes=[0, 1]),
        cube_case("t", num_modalities=2, split="Ts"),
    ])
    assert_task_ok(task, full=True)


# ------------------------------------------------------------------------------------ dataset.json
def test_bad_dataset_json_syntax(tmp_path):
    task = write_task(tmp_path)
    (task / "dataset.json").write_text('{"task": "x", ')
    probs = _problems(task)
    assert _for(probs, task / "dataset.json") and "parsed" in _for(probs, task / "dataset.json")[0]


def test_bad_dataset_json_content(tmp_path):
    task = write_task(tmp_path, dataset={"task": "T", "dim": 4, "labels": {"1": "a"}, "modalities": {"0": "CT"}})
    reasons = " | ".join(_for(_problems(task), task / "dataset.json"))
    assert "dim" in reasons and "consecutive" in reasons


def test_missing_dataset_json_and_images(tmp_path):
    task = tmp_path / "Task100D3_Empty"
    (task / "raw_splitted").mkdir(parents=True)
    probs = _problems(task, full=False)
    assert _for(probs, task / "dataset.json")
    assert _for(probs, task / "raw_splitted" / "imagesTr")


def test_images_folder_without_cases(tmp_path):
    task = write_task(tmp_path, cases=[])
    assert "no cases" in _for(_problems(task), task / "raw_splitted" / "imagesTr")[0]


# ---------------------------------------------------------------------------------------- files
def test_missing_modality_file(tmp_path):
    task = write_task(tmp_path, modalities={"0": "T1", "1": "T2"},
                      cases=[cube_case(f"case_{i}", num_modalities=2) for i in range(2)])
    missing = task / "raw_splitted" / "imagesTr" / "case_1_0001.nii.gz"
    missing.unlink()
    reasons = _for(_problems(task, full=False), missing)
    assert reasons and "missing" in reasons[0]


def test_missing_label_and_json_and_stray_files(tmp_path):
    task = write_task(tmp_path)
    lab = task / "raw_splitted" / "labelsTr"
    (lab / "case_0.nii.gz").unlink()
    (lab / "case_1.json").unlink()
    write_nifti(lab / "orphan.nii.gz", np.zeros((16, 16, 16), np.uint8))
    img = task / "raw_splitted" / "imagesTr"
    write_nifti(img / "nosuffix.nii.gz", np.ones((16, 16, 16), np.float32))
    write_nifti(img / "case_0_0003.nii.gz", np.ones((16, 16, 16), np.float32))
    probs = _problems(task, full=False)
    assert "label map" in _for(probs, lab / "case_0.nii.gz")[0]
    assert "instance json" in _for(probs, lab / "case_1.json")[0]
    assert "stray" in _for(probs, lab / "orphan.nii.gz")[0]
    assert "modality suffix" in _for(probs, img / "nosuffix.nii.gz")[0]
    assert "modality 0003" in _for(probs, img / "case_0_0003.nii.gz")[0]


def test_test_labels_true_needs_labels_ts(tmp_path):
    task = write_task(tmp_path, test_labels=True, cases=[cube_case("a"), cube_case("t", split="Ts")])
    for f in (task / "raw_splitted" / "labelsTs").iterdir():
        f.unlink()
    (task / "raw_splitted" / "labelsTs").rmdir()
    assert _for(_problems(task, full=False), task / "raw_splitted" / "labelsTs")
    # without test labels the same task is fine
    meta = json.loads((task / "dataset.json").read_text())
    (task / "dataset.json").write_text(json.dumps({**meta, "test_labels": False}))
    assert_task_ok(task, full=True)


def test_dot_in_task_folder_and_case_name(tmp_path):
    task = write_task(tmp_path, name="Task100D3_Te.st", cases=[cube_case("case.1"), cube_case("case_2")])
    probs = _problems(task, full=False)
    assert "'.'" in _for(probs, task)[0]
    assert _for(probs, task / "raw_splitted" / "imagesTr" / "case.1_0000.nii.gz")


def test_dot_above_the_task_only_warns(tmp_path, caplog):
    task = write_task(tmp_path / "data.v1")
    with caplog.at_level("WARNING", logger="planner.checks"):
        assert_task_ok(task, full=True)
    assert "data.v1" in caplog.text and "nnDetection" in caplog.text


# -------------------------------------------------------------------------------- instance json
def test_non_consecutive_instance_ids(tmp_path):
    case = cube_case("case_0", boxes=[(0, 0, 0, 4, 4, 4), (8, 8, 8, 12, 12, 12)])
    case.seg[case.seg == 2] = 3
    case.instances = {"1": 0, "3": 0}
    task = write_task(tmp_path, cases=[case])
    reasons = _for(_problems(task, full=False), task / "raw_splitted" / "labelsTr" / "case_0.json")
    assert any("consecutive" in r for r in reasons)


def test_ids_must_start_at_one(tmp_path):
    case = cube_case("case_0")
    case.seg[case.seg == 1] = 2
    case.instances = {"2": 0}
    task = write_task(tmp_path, cases=[case])
    reasons = _for(_problems(task, full=False), task / "raw_splitted" / "labelsTr" / "case_0.json")
    assert any("start at 1" in r for r in reasons)


def test_wrong_class_and_types_in_json(tmp_path):
    task = write_task(tmp_path, cases=[cube_case("a", classes=[5]), cube_case("b"), cube_case("c")])
    lab = task / "raw_splitted" / "labelsTr"
    (lab / "b.json").write_text(json.dumps({"instances": {"1": "0"}}))
    (lab / "c.json").write_text(json.dumps({"objects": {"1": 0}}))
    probs = _problems(task, full=False)
    assert "class 5" in _for(probs, lab / "a.json")[0] and "not defined" in _for(probs, lab / "a.json")[0]
    assert "integer" in _for(probs, lab / "b.json")[0]
    assert "instances" in _for(probs, lab / "c.json")[0]


# ----------------------------------------------------------------------------------- full checks
def test_label_ids_not_in_json_and_json_ids_not_in_label(tmp_path):
    extra_in_map = cube_case("a", boxes=[(0, 0, 0, 4, 4, 4), (8, 8, 8, 12, 12, 12)])
    extra_in_map.instances = {"1": 0}
    extra_in_json = cube_case("b")
    extra_in_json.instances = {"1": 0, "2": 1}
    task = write_task(tmp_path, cases=[extra_in_map, extra_in_json])
    lab = task / "raw_splitted" / "labelsTr"
    assert_task_ok(task, full=False)  # only loading the maps finds these
    probs = _problems(task)
    assert "[2]" in _for(probs, lab / "a.json")[0] and "not in this json" in _for(probs, lab / "a.json")[0]
    assert "[2]" in _for(probs, lab / "b.json")[0] and "absent" in _for(probs, lab / "b.json")[0]


def test_mismatched_geometry(tmp_path):
    cases = [cube_case(f"case_{i}", num_modalities=2) for i in range(3)]
    task = write_task(tmp_path, modalities={"0": "T1", "1": "T2"}, cases=cases)
    raw = task / "raw_splitted"
    write_nifti(raw / "labelsTr" / "case_0.nii.gz", np.zeros((16, 16, 15), np.uint8))  # shape
    write_nifti(raw / "imagesTr" / "case_1_0001.nii.gz", cases[1].images[1], spacing=(1.0, 1.0, 2.5))  # spacing
    shifted = np.eye(4)
    shifted[:3, 3] = (10.0, 0.0, 0.0)
    write_nifti(raw / "imagesTr" / "case_2_0001.nii.gz", cases[2].images[1], affine=shifted)  # origin
    assert_task_ok(task, full=False)
    probs = _problems(task)
    assert "shape" in _for(probs, raw / "labelsTr" / "case_0.nii.gz")[0]
    assert "spacing" in _for(probs, raw / "imagesTr" / "case_1_0001.nii.gz")[0]
    assert "origin" in _for(probs, raw / "imagesTr" / "case_2_0001.nii.gz")[0]


def test_dimension_mismatch_with_dataset(tmp_path):
    task = write_task(tmp_path, name="Task100D2_Test", dim=2, cases=[cube_case("a", shape=(16, 16)),
                                                                     cube_case("b", shape=(16, 16))])
    write_nifti(task / "raw_splitted" / "imagesTr" / "b_0000.nii.gz", np.random.rand(16, 16, 4))
    reasons = _for(_problems(task), task / "raw_splitted" / "imagesTr" / "b_0000.nii.gz")
    assert "dim" in reasons[0]


def test_nan_image(tmp_path):
    case = cube_case("case_0")
    case.images[0][3, 3, 3] = np.nan
    task = write_task(tmp_path, cases=[case, cube_case("case_1")])
    reasons = _for(_problems(task), task / "raw_splitted" / "imagesTr" / "case_0_0000.nii.gz")
    assert "NaN" in reasons[0]


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_empty_case(tmp_path, value):
    case = cube_case("case_0")
    case.images[0][:] = value
    task = write_task(tmp_path, cases=[case, cube_case("case_1")])
    reasons = _for(_problems(task), task / "raw_splitted" / "imagesTr" / "case_0_0000.nii.gz")
    assert "empty" in reasons[0]


def test_negative_and_non_integer_labels(tmp_path):
    neg = cube_case("neg")
    neg.seg = neg.seg.astype(np.int16)
    neg.seg[0, 0, 0] = -1
    frac = cube_case("frac")
    frac.seg = frac.seg.astype(np.float32)
    frac.seg[frac.seg == 1] = 0.5
    task = write_task(tmp_path, cases=[neg, frac])
    probs = _problems(task)
    lab = task / "raw_splitted" / "labelsTr"
    assert "negative" in _for(probs, lab / "neg.nii.gz")[0]
    assert "non-integer" in _for(probs, lab / "frac.nii.gz")[0]


def test_unreadable_file(tmp_path):
    task = write_task(tmp_path)
    bad = task / "raw_splitted" / "imagesTr" / "case_0_0000.nii.gz"
    bad.write_bytes(b"not a nifti")
    assert "NIfTI" in _for(_problems(task), bad)[0]


# ------------------------------------------------------------------------------- all at once
def test_several_problems_reported_together(tmp_path, toy_task_3d):
    task = copy_task(toy_task_3d, tmp_path)
    raw = task / "raw_splitted"
    (raw / "imagesTr" / "case_1_0000.nii.gz").unlink()  # quick: missing modality (-> also a stray label)
    (raw / "labelsTr" / "case_2.json").write_text(json.dumps({"instances": {"1": 9}}))  # quick: class
    img = raw / "imagesTr" / "case_3_0000.nii.gz"
    write_nifti(img, np.full((32, 32, 32), np.nan, np.float32))  # full: NaN
    with pytest.raises(DatasetError) as exc:
        assert_task_ok(task, full=True)
    files = {f for f, _ in exc.value.problems}
    assert str(raw / "labelsTr" / "case_2.json") in files
    assert str(img) in files
    assert str(raw / "labelsTr" / "case_1.nii.gz") in files  # label without image
    msg = str(exc.value)
    assert f"{len(exc.value.problems)} problem(s)" in msg and "case_2.json" in msg and "case_3_0000" in msg
