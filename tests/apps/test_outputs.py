"""The SR and SEG writers on DICOM series made in the test: what a viewer needs is in the objects, at the
right place, and dicom3tools' dciodvfy finds no error in them."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pydicom
import pytest

from apps.detect_dicom import codes as cc
from apps.detect_dicom.findings import findings_from_prediction
from apps.detect_dicom.seg import write_seg
from apps.detect_dicom.sr import read_sr_boxes, volume_surface, write_sr
from apps.detect_dicom.volume import build_volume, read_folder
from tests.apps.dicom_factory import make_affine, rotation, toy_volume, write_series
from tests.apps.tools import dciodvfy_errors

# (i, j, k) = (column, row, slice) half-open boxes, as the bundle's predictor returns them
PRED = {"boxes": [[3, 4, 2, 10, 12, 7], [12.4, 1, 0, 17.6, 6, 3], [1, 1, 1, 3, 3, 2]],
        "scores": [0.91, 0.62, 0.2], "labels": [0, 1, 0]}
CLASSES = {"0": "nodule", "1": "weird thing"}
KW = dict(model_name="toy", model_version="3", algorithm_name="nndet-monai toy")


@pytest.fixture(scope="module", params=["axial", "oblique_descending"])
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "axial":
        aff = make_affine((0.8, 1.1, 2.0), origin=(-10.0, 20.0, -30.0))
        kw = {}
    else:
        aff = make_affine((0.7, 0.9, 2.5), rotation((0, 0, 1), 25) @ rotation((1, 0, 0), 15), (5.0, -7.0, 40.0))
        kw = dict(descending=True, slope=2.0, intercept=-1024.0)
    write_series(root / "img", toy_volume((20, 14, 9)), aff, **kw)
    vol = build_volume(read_folder(root / "img"))
    findings = findings_from_prediction(PRED, vol, CLASSES)
    sr = write_sr(vol, findings, root / "sr.dcm", operating_point=0.5, **KW)
    seg = write_seg(vol, findings, root / "seg.dcm", operating_point=0.5, model_name="toy", model_version="3")
    return {"root": root, "vol": vol, "findings": findings, "sr": sr, "seg": seg}


def _items(ds, value_type=None):
    for item in ds.get("ContentSequence", []):
        if value_type is None or item.ValueType == value_type:
            yield item


def _groups(path):
    sr = pydicom.dcmread(path)
    meas = [c for c in _items(sr, "CONTAINER") if c.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return [g for m in meas for g in _items(m, "CONTAINER")]


def _text(group, code_value):
    return [i.TextValue for i in _items(group, "TEXT") if i.ConceptNameCodeSequence[0].CodeValue == code_value]


def test_sr_draws_each_finding_above_the_operating_point_on_its_centre_slice(case):
    vol, shown = case["vol"], [f for f in case["findings"] if f.score >= 0.5]
    boxes = read_sr_boxes(case["sr"])
    assert [b["tracking_identifier"] for b in boxes] == ["Finding 1", "Finding 2"]
    assert len({b["tracking_uid"] for b in boxes}) == 2
    for f, b in zip(shown, boxes, strict=True):
        s0, r0, c0, s1, r1, c1 = f.box_voxel
        assert b["sop_instance_uid"] == vol.sop_instance_uids[f.center_slice]
        assert b["points"] == [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]
        assert b["score"] == pytest.approx(f.score, abs=1e-6)
        # the outline's corners, through that instance's own geometry, are the box's world corners
        ds = next(d for d in vol.datasets if d.SOPInstanceUID == b["sop_instance_uid"])
        ipp, iop = np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        corners = [ipp + (c - 0.5) * dc * iop[:3] + (r - 0.5) * dr * iop[3:] for c, r in b["points"][:4]]
        lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
        assert np.all(lo >= np.array(f.box_lps_mm[:3]) - 1e-3) and np.all(hi <= np.array(f.box_lps_mm[3:]) + 1e-3)
        # the box's world extent is that of its voxel edges (centres at integer indices)
        edges = [vol.affine @ [s - 0.5, r - 0.5, c - 0.5, 1] for s in (s0, s1) for r in (r0, r1) for c in (c0, c1)]
        np.testing.assert_allclose(np.min(edges, axis=0)[:3], f.box_lps_mm[:3], atol=1e-3)
        np.testing.assert_allclose(np.max(edges, axis=0)[:3], f.box_lps_mm[3:], atol=1e-3)


def test_sr_groups_carry_what_ohif_and_slicer_read(case):
    groups = _groups(case["sr"])
    planar = [g for g in groups if g.ContentTemplateSequence[0].TemplateIdentifier == "1410"]
    volumetric = [g for g in groups if g.ContentTemplateSequence[0].TemplateIdentifier == "1411"]
    assert len(planar) == len(volumetric) == 2
    shown = [f for f in case["findings"] if f.score >= 0.5]
    for g, f in zip(planar, shown, strict=True):
        codes_in = {(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
                    for i in _items(g, "CODE")}
        assert ("130400", "75958009") in codes_in  # Geometric purpose = Bounded by
        kind = cc.finding_type(f.class_name)
        assert ("121071", kind.value) in codes_in
        scoord = [i for i in _items(g, "SCOORD")]
        assert len(scoord) == 1 and scoord[0].GraphicType == "POLYLINE" and len(scoord[0].GraphicData) == 10
        nums = list(_items(g, "NUM"))
        assert len(nums) == 4  # score, width, height, depth
        for num in nums:
            inferred = [i for i in _items(num) if i.RelationshipType == "INFERRED FROM" and i.ValueType == "SCOORD"]
            assert len(inferred) == 1 and list(inferred[0].GraphicData) == list(scoord[0].GraphicData)
            image = next(_items(inferred[0], "IMAGE"))
            assert image.RelationshipType == "SELECTED FROM"
        assert _text(g, "121106") == [f"{f.class_name} p={f.score:.2f}"]
    vol = case["vol"]
    inverse = np.linalg.inv(vol.affine)
    for g, f in zip(volumetric, shown, strict=True):
        assert list(_items(g, "SCOORD")) == []  # a 2D POLYLINE here would be a second rectangle in OHIF
        outlines = list(_items(g, "SCOORD3D"))
        s0, r0, c0, s1, r1, c1 = f.box_voxel
        assert s1 - s0 >= 2 and len(outlines) == s1 - s0  # one closed rectangle per slice spanned
        sources = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in _items(g, "IMAGE")]
        assert sources == list(vol.sop_instance_uids[s0:s1])
        for s, o in zip(range(s0, s1), outlines, strict=True):
            assert o.GraphicType == "POLYGON" and o.ReferencedFrameOfReferenceUID == vol.frame_of_reference_uid
            lps = np.asarray(o.GraphicData, dtype=float).reshape(-1, 3)
            assert len(lps) == 5 and np.allclose(lps[0], lps[-1])
            index = (np.c_[lps, np.ones(5)] @ inverse.T)[:, :3]  # back to (slice, row, column) voxel indices
            np.testing.assert_allclose(index[:, 0], s, atol=1e-3)  # on the slice's centre plane
            np.testing.assert_allclose(index[:4, 1:] + 0.5, [[r0, c0], [r0, c1], [r1, c1], [r1, c0]], atol=1e-3)
        assert _text(g, "112039") == [f"Finding {f.index} (3D)"]


def test_a_one_slice_box_gets_its_two_faces_as_volume_surface(case):
    vol = case["vol"]
    f = dataclasses.replace(case["findings"][0], box_voxel=(4, 2, 3, 5, 6, 8))
    surface = volume_surface(vol, f)
    polygons = [np.asarray(i.GraphicData, dtype=float).reshape(-1, 3) for i in surface if i.ValueType == "SCOORD3D"]
    index = [(np.c_[p, np.ones(len(p))] @ np.linalg.inv(vol.affine).T)[:, :3] for p in polygons]
    assert [round(float(i[:, 0].mean()), 3) for i in index] == [3.5, 4.5]  # the box's faces, not a slice centre
    sources = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in surface if i.ValueType == "IMAGE"]
    assert sources == [vol.sop_instance_uids[4]]


def test_sr_extents_and_finding_codes(case):
    vol = case["vol"]
    f = case["findings"][0]
    sr = hd.sr.srread(case["sr"])
    group = sr.content.get_planar_roi_measurement_groups()[0]
    got = {m.name.meaning: m.value for m in group.get_measurements()}
    ds, dr, dc = vol.spacing
    s0, r0, c0, s1, r1, c1 = f.box_voxel
    assert got["Width"] == pytest.approx((c1 - c0) * dc, abs=1e-3)
    assert got["Height"] == pytest.approx((r1 - r0) * dr, abs=1e-3)
    assert got["Depth"] == pytest.approx((s1 - s0) * ds, abs=1e-3)
    assert cc.finding_type("nodule").value == "27925004"  # SNOMED CT from pydicom's dictionary
    assert cc.finding_type("weird thing").scheme_designator == cc.PRIVATE_SCHEME
    assert sr.StudyInstanceUID == vol.study_instance_uid and sr.SeriesInstanceUID != vol.series_instance_uid


def test_sr_and_seg_pass_dciodvfy(case):
    assert dciodvfy_errors(case["sr"]) == []
    assert dciodvfy_errors(case["seg"]) == []


def test_seg_has_one_filled_box_per_finding(case):
    vol, shown = case["vol"], [f for f in case["findings"] if f.score >= 0.5]
    seg = hd.seg.segread(case["seg"])
    assert seg.number_of_segments == len(shown)
    assert seg.StudyInstanceUID == vol.study_instance_uid
    for n, f in enumerate(shown, start=1):
        s0, r0, c0, s1, r1, c1 = f.box_voxel
        assert seg.get_segment_description(n).TrackingID == f"Finding {f.index}"
        uids = list(vol.sop_instance_uids)
        mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[n],
                                                 ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
        want = np.zeros(vol.array.shape, bool)
        want[s0:s1, r0:r1, c0:c1] = True
        np.testing.assert_array_equal(mask[..., 0].astype(bool), want)


def test_no_finding_sr_says_so_without_a_group(tmp_path, case):
    vol = case["vol"]
    path = write_sr(vol, case["findings"], tmp_path / "sr.dcm", operating_point=0.99, **KW)
    assert _groups(path) == []
    sr = pydicom.dcmread(path)
    evaluations = [c for c in _items(sr, "CONTAINER") if c.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert "No finding" in next(_items(evaluations[0], "TEXT")).TextValue
    assert dciodvfy_errors(path) == []
    assert write_seg(vol, case["findings"], tmp_path / "seg.dcm", operating_point=0.99) is None
    assert not (tmp_path / "seg.dcm").exists()


def test_a_box_on_the_far_edge_stays_one_voxel_inside(case, tmp_path):
    """A predicted box touching (or past) the last slice/row/column: found by the DICOM node, whose SEG writer
    failed on the empty box the edge rounding made (KeyError on the slice past the end)."""
    vol = case["vol"]
    s, r, c = vol.array.shape
    pred = {"boxes": [[c - 0.4, r - 0.3, s - 0.2, c + 2.0, r + 1.0, s + 3.0]], "scores": [0.9], "labels": [0]}
    (f,) = findings_from_prediction(pred, vol, CLASSES)
    assert f.box_voxel == (s - 1, r - 1, c - 1, s, r, c)
    seg = write_seg(vol, [f], tmp_path / "edge_seg.dcm", operating_point=0.5)
    assert seg is not None and pydicom.dcmread(seg).NumberOfFrames == 1


def test_seg_holds_each_findings_mask_when_the_predictor_made_masks(case, tmp_path):
    """Masks (i, j, k) from the predictor end up (slice, row, column) in the SEG segment of their finding, the part
    outside the box dropped; a finding whose mask is empty keeps its filled box; dciodvfy finds no error."""
    from bundles.retinaunet_template.scripts.masks import FindingMask

    vol = case["vol"]
    ijk_shape = vol.array.shape[::-1]
    want_ijk = []
    masks = []
    for n, box in enumerate(PRED["boxes"]):
        lo = [int(np.floor(v)) for v in box[:3]]
        hi = [int(np.ceil(v)) for v in box[3:]]
        m = np.zeros([h - lo_ for lo_, h in zip(lo, hi, strict=True)], bool)
        if n == 0:
            m[1:4, 2:5, 1:3] = True  # a blob inside finding 1's box
        full = np.zeros(ijk_shape, bool)
        full[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = m
        masks.append(FindingMask(tuple(lo), m))
        want_ijk.append(full)
    findings = findings_from_prediction({**PRED, "finding_masks": masks}, vol, CLASSES)
    path = write_seg(vol, findings, tmp_path / "seg.dcm", operating_point=0.5)
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    uids = list(vol.sop_instance_uids)
    by_score = np.argsort(-np.asarray(PRED["scores"]), kind="stable")
    for n, f in enumerate([f for f in findings if f.score >= 0.5], start=1):
        got = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[n],
                                                ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
        want = np.transpose(want_ijk[by_score[n - 1]], (2, 1, 0))
        if not want.any():  # empty mask: the box
            s0, r0, c0, s1, r1, c1 = f.box_voxel
            want = np.zeros(vol.array.shape, bool)
            want[s0:s1, r0:r1, c0:c1] = True
        np.testing.assert_array_equal(got[..., 0].astype(bool), want)
    assert findings[0].mask.sum() == 3 * 3 * 2
