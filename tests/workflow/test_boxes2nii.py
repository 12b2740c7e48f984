"""nndet_boxes2nii: box predictions -> instance NIfTI (+ JSON) with the original geometry."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from workflow.boxes2nii import boxes_to_nifti, convert_folder, rasterize_boxes, voxel_ranges


def test_voxel_ranges_use_voxel_centres_and_clip():
    assert voxel_ranges([2, 3, 4, 6, 7, 9], (10, 10, 10)) == (slice(2, 6), slice(3, 7), slice(4, 9))
    # centre rule on float boxes: [2.4, 5.6) holds the centres 2.5..5.5 -> voxels 2..5
    assert voxel_ranges([2.4, 0.0, 5.6, 1.0], (8, 8)) == (slice(2, 6), slice(0, 1))
    assert voxel_ranges([2.6, 0, 3.4, 1], (8, 8))[0] == slice(3, 3)  # no centre inside: empty
    assert voxel_ranges([-3, 5, 4, 20], (8, 8)) == (slice(0, 4), slice(5, 8))


def test_higher_scores_win_overlaps_and_get_low_ids():
    boxes = np.array([[0, 0, 4, 4], [2, 2, 6, 6]], float)
    seg, order = rasterize_boxes(boxes, np.array([0.3, 0.9]), (8, 8))
    assert order.tolist() == [1, 0]
    assert seg[3, 3] == 1 and seg[0, 0] == 2 and seg[5, 5] == 1 and seg[7, 7] == 0
    assert (seg == 2).sum() == 16 - 4


def test_prediction_json_to_nifti_with_reference_geometry(tmp_path):
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    ref = tmp_path / "imagesTs" / "case_1_0000.nii.gz"
    ref.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 6), np.float32), affine), str(ref))
    pred = {"case_id": "case_1", "boxes": [[1, 1, 1, 4, 5, 3], [6, 6, 2, 9, 9, 5]], "scores": [0.2, 0.95],
            "labels": [0, 1], "class_names": ["a", "b"]}
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "case_1_boxes.json").write_text(json.dumps(pred))
    (out,) = convert_folder(tmp_path / "pred", tmp_path / "imagesTs", tmp_path / "nii", score_threshold=0.1)
    img = nib.load(str(out))
    assert img.shape == (12, 10, 6) and np.allclose(img.affine, affine)
    seg = np.asarray(img.dataobj)
    assert (seg == 1).sum() == 3 * 3 * 3 and seg[7, 7, 3] == 1 and seg[2, 2, 1] == 2
    meta = json.loads((tmp_path / "nii" / "case_1_boxes.json").read_text())
    assert meta["instances"] == {"1": 1, "2": 0} and meta["class_names"] == {"1": "b", "2": "a"}
    # the threshold drops the low-scoring box; an existing output is not overwritten without the flag
    with pytest.raises(FileExistsError, match="overwrite"):
        boxes_to_nifti(tmp_path / "pred" / "case_1_boxes.json", ref, tmp_path / "nii", 0.5)
    boxes_to_nifti(tmp_path / "pred" / "case_1_boxes.json", ref, tmp_path / "nii", 0.5, overwrite=True)
    assert set(np.unique(np.asarray(nib.load(str(out)).dataobj)).tolist()) == {0, 1}


def test_missing_reference_image_names_the_file(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "c_boxes.json").write_text(json.dumps({"case_id": "c", "boxes": [], "scores": [], "labels": []}))
    with pytest.raises(FileNotFoundError, match="c_0000.nii.gz"):
        convert_folder(tmp_path / "pred", tmp_path, tmp_path / "nii")
