"""Box annotations (``"annotation": "boxes"``, ``labelsTr/<case>.json`` with ``"boxes"``): reading in voxel and
world frames, every bad box named, the fill, and a toy task given as boxes running through prep like its masks."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from planner.box_labels import box_instance_map, box_problems, fill_boxes, load_box_labels
from planner.checks import assert_task_ok
from planner.dataset import DatasetError
from planner.prep import run_prep
from tests.planner.helpers import det_env, toy_task, write_nifti


def _write(path, content):
    path.write_text(json.dumps(content))
    return path


def _affine(spacing=(2.0, 1.0, 3.0), origin=(-10.0, 5.0, 20.0), flip=(1, -1, 1)):
    """A rotated (90 degrees about z), flipped, anisotropic voxel-to-RAS affine."""
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(np.asarray(spacing) * np.asarray(flip))
    a[:3, 3] = origin
    return a


def test_voxel_boxes_are_inclusive_indices_and_fill_their_voxels(tmp_path):
    p = _write(tmp_path / "c.json", {"boxes": [{"class": 1, "box": [2, 3, 4, 5, 6, 7]},
                                               {"class": 0, "box": [0, 0, 0, 0, 0, 0]}]})
    got = load_box_labels(p, (8, 8, 8), np.eye(4), classes=[0, 1])
    assert got.boxes.tolist() == [[2, 3, 4, 6, 7, 8], [0, 0, 0, 1, 1, 1]]
    assert got.instances == {1: 1, 2: 0}
    seg, inst, _ = box_instance_map(p, (8, 8, 8), np.eye(4))
    assert inst == {1: 1, 2: 0}
    assert (seg == 1).sum() == 4 * 4 * 4 and seg[2:6, 3:7, 4:8].min() == 1
    assert (seg == 2).sum() == 1 and seg[0, 0, 0] == 2


@pytest.mark.parametrize("frame", ["RAS", "LPS"])
@pytest.mark.parametrize("on", ["edges", "centres"])
def test_world_boxes_give_the_voxels_inside_in_an_oblique_flipped_image(tmp_path, frame, on):
    affine = _affine()
    shape = (10, 12, 8)
    first, last = np.array([2, 3, 1]), np.array([6, 9, 4])  # inclusive voxels of the object
    pad = 0.5 if on == "edges" else 0.0
    corners = np.array([[(last if (c >> a) & 1 else first)[a] + (pad if (c >> a) & 1 else -pad)
                         for a in range(3)] for c in range(8)], float)
    world = (affine @ np.c_[corners, np.ones(8)].T)[:3].T
    if frame == "LPS":
        world[:, :2] *= -1
    box = [*world.min(0).tolist(), *world.max(0).tolist()]
    p = _write(tmp_path / "w.json", {"frame": frame, "boxes": [{"class": 0, "box": box}]})
    got = load_box_labels(p, shape, affine)
    assert got.boxes.tolist() == [[*first.tolist(), *(last + 1).tolist()]]


def test_world_boxes_in_2d_use_the_slice_plane(tmp_path):
    affine = np.diag([0.5, 2.0, 1.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    # voxels i 4..9, j 1..3 -> x 12..14.5, y -2..2 (centres)
    p = _write(tmp_path / "w.json", {"frame": "RAS", "boxes": [{"class": 0, "box": [12.0, -2.0, 14.5, 2.0]}]})
    assert load_box_labels(p, (20, 10), affine).boxes.tolist() == [[4, 1, 10, 4]]


def test_every_bad_box_is_named_with_its_file_and_fix(tmp_path):
    p = _write(tmp_path / "bad.json", {"boxes": [
        {"class": 0, "box": [1, 1, 1, 3, 3, 3]},          # fine
        {"class": 7, "box": [1, 1, 1, 3, 3, 3]},          # unknown class
        {"class": 0, "box": [5, 1, 1, 3, 3, 3]},          # inverted along axis 0
        {"class": 0, "box": [1, 1, 3, 3]},                # wrong length
        {"class": 0, "box": [1.5, 1, 1, 3, 3, 3]},        # not whole voxels
        {"box": [1, 1, 1, 3, 3, 3]},                      # no class
        {"class": True, "box": [1, 1, 1, 3, 3, 3]},       # not an integer
    ]})
    problems = box_problems(p, 3, classes=[0, 1])
    text = "\n".join(r for _, r in problems)
    assert all(f == str(p) for f, _ in problems)
    assert len(problems) == 6
    for needle in ("box 1: class 7 is not defined", "box 2: box [5, 1, 1, 3, 3, 3] is inverted along axis [0]",
                   "box 3: box [1, 1, 3, 3] must be 6 numbers", "box 4: voxel box", "box 5 (", "box 6: class must"):
        assert needle in text, needle


def test_geometry_problems_outside_thin_and_covered(tmp_path):
    shape = (10, 10, 10)
    outside = _write(tmp_path / "o.json", {"boxes": [{"class": 0, "box": [0, 0, 0, 10, 3, 3]}]})
    assert "reaches outside the image (indices 0..[9, 9, 9])" in box_problems(outside, 3, shape=shape,
                                                                                affine=np.eye(4))[0][1]
    # 0.2 mm thin box between voxel centres 3 and 4: no voxel centre inside
    thin = _write(tmp_path / "t.json", {"frame": "RAS", "boxes": [{"class": 0, "box": [3.4, 1, 1, 3.6, 4, 4]}]})
    assert "holds no voxel centre" in box_problems(thin, 3, shape=shape, affine=np.eye(4))[0][1]
    flat = _write(tmp_path / "f.json", {"frame": "LPS", "boxes": [{"class": 0, "box": [3, 1, 1, 3, 4, 4]}]})
    assert "zero size in mm along axis [0]" in box_problems(flat, 3)[0][1]
    dup = _write(tmp_path / "d.json", {"boxes": [{"class": 0, "box": [1, 1, 1, 4, 4, 4]},
                                                 {"class": 1, "box": [1, 1, 1, 4, 4, 4]}]})
    problems = box_problems(dup, 3, shape=shape, affine=np.eye(4))
    assert len(problems) == 1 and "box 0 is covered entirely by other boxes" in problems[0][1]
    with pytest.raises(DatasetError, match="covered entirely"):
        box_instance_map(dup, shape, np.eye(4))
    missing = box_problems(tmp_path / "none.json", 3)
    assert "box annotation is missing" in missing[0][1]
    assert "must hold a list \"boxes\"" in box_problems(_write(tmp_path / "i.json", {"instances": {"1": 0}}), 3)[0][1]
    assert "\"frame\" 'mm' is unknown" in box_problems(_write(tmp_path / "m.json", {"frame": "mm", "boxes": []}), 3)[0][1]


def test_a_small_box_inside_a_large_one_keeps_its_voxels_and_a_shrunk_one_is_warned(tmp_path, caplog):
    boxes = np.array([[0, 0, 0, 8, 8, 8], [2, 2, 2, 4, 4, 4]])  # the small one listed second
    seg = fill_boxes(boxes, (10, 10, 10))
    assert (seg == 2).sum() == 8 and (seg == 1).sum() == 512 - 8
    assert fill_boxes(boxes[::-1], (10, 10, 10))[2:4, 2:4, 2:4].min() == 1  # reversed order: small is id 1
    # the second box covers a whole face slab of the first: its filled extent shrinks (warning, not error)
    p = _write(tmp_path / "s.json", {"boxes": [{"class": 0, "box": [0, 0, 0, 9, 9, 1]},
                                               {"class": 0, "box": [0, 0, 0, 9, 9, 0]}]})
    with caplog.at_level(logging.WARNING, logger="planner.box_labels"):
        assert box_problems(p, 3, shape=(10, 10, 10), affine=np.eye(4)) == []
    assert "box 0 overlaps the boxes painted over it" in caplog.text


def _box_task(tmp_path, **kwargs):
    return toy_task(tmp_path, dim=3, size=32, boxes=True, **kwargs)


def test_quick_and_full_checks_report_bad_boxes_of_a_task(tmp_path):
    task = _box_task(tmp_path)
    assert json.loads((task / "dataset.json").read_text())["annotation"] == "boxes"
    assert not list((task / "raw_splitted" / "labelsTr").glob("*.nii.gz"))
    assert_task_ok(task, full=True)
    labels = task / "raw_splitted" / "labelsTr"
    _write(labels / "case_0.json", {"boxes": [{"class": 5, "box": [1, 1, 1, 3, 3, 3]}]})
    _write(labels / "case_1.json", {"boxes": [{"class": 0, "box": [1, 1, 1, 3, 3, 40]}]})
    (labels / "case_2.json").unlink()
    with pytest.raises(DatasetError) as e:
        assert_task_ok(task, full=True)
    by_file = {f: r for f, r in e.value.problems}
    assert "class 5 is not defined" in by_file[str(labels / "case_0.json")]
    assert "reaches outside the image" in by_file[str(labels / "case_1.json")]
    assert "box annotation is missing" in by_file[str(labels / "case_2.json")]
    assert len(e.value.problems) == 3  # structure problems are not listed twice by the full check
    # the default prep (quick check, then the fingerprint's checks of loaded cases) stops on them too
    with pytest.raises(DatasetError, match="case_0.json"):
        assert_task_ok(task)


def test_unknown_annotation_kind_is_refused(tmp_path):
    task = _box_task(tmp_path)
    meta = json.loads((task / "dataset.json").read_text())
    meta["annotation"] = "points"
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="'annotation' must be one of \\['masks', 'boxes'\\]"):
        assert_task_ok(task)


def test_toy_task_as_boxes_preprocesses_to_the_boxes_of_its_masks(tmp_path, monkeypatch):
    """Same images, boxes instead of masks: the fingerprint, the plan's object sizes and the preprocessed
    boxes equal those of the mask task; the preprocessed label is the filled box; test GT boxes are equal."""
    from workflow.evaluate import gt_raw

    out = {}
    for kind in ("masks", "boxes"):
        data = det_env(monkeypatch, tmp_path / kind)
        task = toy_task(data, dim=3, size=32, num_train=4, num_test=2, boxes=kind == "boxes")
        res = run_prep("000", preset="cpu")
        fp = json.loads(res.fingerprint.read_text())
        pre = task / "preprocessed" / res.plans[0].plan_id / "imagesTr"
        out[kind] = {
            "fp": fp,
            "props": {c: json.loads((pre / f"case_{c}.json").read_text()) for c in range(4)},
            "seg": {c: np.load(pre / f"case_{c}_seg.npy") for c in range(4)},
            "anchors": res.plans[0].anchors.sizes,
            "gt": [gt_raw(task, f"case_{c}", 3, kind) for c in (4, 5)],
        }
    m, b = out["masks"], out["boxes"]
    assert m["anchors"] == b["anchors"]
    assert [c["boxes"] for c in m["fp"]["cases"]] == [c["boxes"] for c in b["fp"]["cases"]]
    for c in range(4):
        assert m["props"][c]["boxes"] == b["props"][c]["boxes"]
        assert m["props"][c]["classes"] == b["props"][c]["classes"]
        x1, y1, z1, x2, y2, z2 = b["props"][c]["boxes"][0]
        seg = b["seg"][c]
        assert (seg[x1:x2, y1:y2, z1:z2] == 1).all() and (seg == 1).sum() == (x2 - x1) * (y2 - y1) * (z2 - z1)
    for gm, gb in zip(m["gt"], b["gt"], strict=True):
        np.testing.assert_array_equal(gm["boxes"], gb["boxes"])
        np.testing.assert_array_equal(gm["labels"], gb["labels"])


def test_masks_task_still_reads_its_instance_maps(tmp_path):
    """A box json next to a mask task's label does not change a mask task (annotation defaults to masks)."""
    task = toy_task(tmp_path, dim=3, size=32)
    img = task / "raw_splitted" / "labelsTr" / "case_0.nii.gz"
    write_nifti(img, np.zeros((32, 32, 32), np.uint8))  # an empty map with an instance json listing 1
    with pytest.raises(DatasetError, match="listed but absent"):
        assert_task_ok(task, full=True)
