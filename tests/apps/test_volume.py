"""Round trips NIfTI -> DICOM (tests.apps.dicom_factory) -> build_volume -> nifti_view, and the refusals.

``build_volume(...).nifti_view()`` must give back the factory's input array and affine: the app's box
agreement with the NIfTI pipeline rests on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest

from apps.detect_dicom.volume import SeriesRejected, build_volume, group_series, read_folder
from tests.apps.dicom_factory import (
    SeriesSpec,
    make_affine,
    rotation,
    toy_volume,
    write_series,
    write_study,
)

CT5N = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/98892001/CT5N"


def _load(paths):
    return [pydicom.dcmread(p) for p in paths]


def _build(tmp_path, arr, aff, **kw):
    return build_volume(_load(write_series(tmp_path / "s", arr, aff, **kw)))


def _assert_round_trip(vol, arr, aff, atol_values=0.0):
    got, got_aff = vol.nifti_view()
    assert got.shape == arr.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, arr, rtol=0, atol=atol_values)
    np.testing.assert_allclose(got_aff, aff, rtol=0, atol=1e-4)


def _assert_sop_per_slice(vol):
    """Each slice's SOP Instance UID is the instance whose Image Position (Patient) is that slice's origin."""
    assert len(vol.sop_instance_uids) == vol.array.shape[0] == len(vol.datasets)
    for s, (uid, ds) in enumerate(zip(vol.sop_instance_uids, vol.datasets, strict=True)):
        assert ds.SOPInstanceUID == uid
        origin = (vol.affine @ [s, 0, 0, 1])[:3]
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], origin, atol=1e-4)


AXIAL = make_affine((0.8, 0.8, 2.0), origin=(-10.0, 20.0, -30.0))
OBLIQUE = make_affine((0.7, 0.9, 2.5), rotation((0, 0, 1), 30) @ rotation((1, 0, 0), 20), (12.0, -7.5, 40.0))


@pytest.mark.parametrize(("name", "aff", "kw"), [
    ("axial", AXIAL, {}),
    ("oblique", OBLIQUE, {}),
    ("non_square", make_affine((0.6, 1.1, 3.0), origin=(5.0, 5.0, 5.0)), {}),
    ("descending", AXIAL, {"descending": True}),
    ("descending_oblique", OBLIQUE, {"descending": True}),
    ("mr", OBLIQUE, {"modality": "MR"}),
])
def test_round_trip_exact(tmp_path, name, aff, kw):
    arr = toy_volume((12, 10, 7))
    vol = _build(tmp_path, arr, aff, description=name, **kw)
    _assert_round_trip(vol, arr, aff)
    _assert_sop_per_slice(vol)
    assert vol.description == name
    assert vol.array.shape == (7, 10, 12)  # (slice, row, column) = (k, j, i)
    np.testing.assert_allclose(vol.spacing, np.linalg.norm(aff[:3, :3], axis=0)[::-1], atol=1e-6)
    assert "PixelData" not in vol.datasets[0]


def test_descending_files_really_run_down(tmp_path):
    """The descending option writes instance 1 / the first file at the highest slice."""
    paths = write_series(tmp_path, toy_volume((4, 4, 5)), AXIAL, descending=True)
    dss = _load(paths)
    assert [int(d.InstanceNumber) for d in dss] == [1, 2, 3, 4, 5]
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    assert z == sorted(z, reverse=True)


@pytest.mark.parametrize(("slope", "intercept", "signed"), [(2.0, -1024.0, True), (2.0, -1024.0, False),
                                                            (0.5, 10.0, True)])
def test_round_trip_rescale(tmp_path, slope, intercept, signed):
    arr = toy_volume((9, 8, 6), low=-1000, high=2000) + 0.3  # not on the stored grid: within slope / 2
    vol = _build(tmp_path, arr, OBLIQUE, slope=slope, intercept=intercept, signed=signed, descending=True)
    _assert_round_trip(vol, arr, OBLIQUE, atol_values=slope / 2 + 1e-3)
    stored = vol.datasets  # pixel data dropped; the rescale was applied exactly once:
    raw = build_volume(_load(sorted((tmp_path / "s").iterdir())), keep_pixel_data=True).datasets
    assert "PixelData" not in stored[0] and "PixelData" in raw[0]
    s = 3
    np.testing.assert_allclose(vol.array[s], raw[s].pixel_array * slope + intercept, atol=1e-3)


def test_left_handed_affine_comes_back_flipped(tmp_path):
    """A left-handed NIfTI affine: slices along -normal in the files, so the volume has k reversed (same
    voxels in space)."""
    arr = toy_volume((6, 5, 4))
    aff = make_affine((1.0, 1.0, 2.0))
    aff[:3, 2] *= -1
    got, got_aff = _build(tmp_path, arr, aff).nifti_view()
    np.testing.assert_array_equal(got, arr[:, :, ::-1])
    flipped = aff.copy()
    flipped[:3, 2] *= -1
    flipped[:3, 3] = (aff @ [0, 0, 3, 1])[:3]
    np.testing.assert_allclose(got_aff, flipped, atol=1e-4)


def test_enhanced_multiframe_round_trip(tmp_path):
    """One enhanced multi-frame instance (highdicom's legacy conversion of a factory series)."""
    import highdicom as hd

    arr = toy_volume((8, 7, 5))
    dss = _load(write_series(tmp_path / "s", arr, OBLIQUE, slope=2.0, intercept=-1024.0, descending=True))
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(dss, series_instance_uid=hd.UID(), series_number=5,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    mf.save_as(tmp_path / "mf.dcm")
    vol = build_volume([pydicom.dcmread(tmp_path / "mf.dcm")])
    _assert_round_trip(vol, arr, OBLIQUE, atol_values=1.0 + 1e-3)
    assert set(vol.sop_instance_uids) == {mf.SOPInstanceUID} and len(vol.sop_instance_uids) == 5


BAD = [
    ("missing_slice", r"missing slice between z=4\.0 and z=8\.0 mm"),
    ("uneven_spacing", r"uneven slice spacing 2\.0-3\.5 mm \(tolerance 1%\)"),
    ("shear", r"gantry tilt / shear: slice positions are not along the slice normal"),
    ("mixed_orientation", r"mixed orientations"),
    ("mixed_size", r"mixed image sizes 10x12 and 5x6 \(rows x columns\)"),
    ("no_pixel_data", r"no pixel data in instance [0-9.]+"),
    ("non_image", r"is not an image \(Basic Text SR Storage\)"),
]


@pytest.mark.parametrize(("defect", "reason"), BAD)
def test_bad_series_refused(tmp_path, defect, reason):
    aff = make_affine((0.8, 0.8, 2.0))  # slice k at z = 2k mm; the middle slice of 7 is k = 3
    paths = write_series(tmp_path, toy_volume((12, 10, 7)), aff, defect=defect, description="bad one")
    dss = _load(paths)
    with pytest.raises(SeriesRejected, match=reason) as info:
        build_volume(dss)
    e = info.value
    assert e.series_uid == dss[0].SeriesInstanceUID and e.description == "bad one"
    assert dss[0].SeriesInstanceUID in str(e) and "bad one" in str(e)


def test_bad_oblique_series_refused(tmp_path):
    with pytest.raises(SeriesRejected, match="missing slice"):
        _build(tmp_path, toy_volume((6, 5, 6)), OBLIQUE, defect="missing_slice", descending=True)
    with pytest.raises(SeriesRejected, match="gantry tilt / shear"):
        _build(tmp_path / "b", toy_volume((6, 5, 6)), OBLIQUE, defect="shear")


def test_other_refusals(tmp_path):
    dss = _load(write_series(tmp_path, toy_volume((6, 5, 4)), AXIAL))
    with pytest.raises(SeriesRejected, match=r"1 slice\(s\): not a volume"):
        build_volume(dss[:1])
    assert build_volume(dss[:1], min_slices=1).array.shape == (1, 5, 6)
    dup = _load(write_series(tmp_path / "dup", toy_volume((6, 5, 4)), AXIAL, seed=1, study_uid=dss[0].StudyInstanceUID,
                             series_uid=dss[0].SeriesInstanceUID,
                             frame_of_reference_uid=dss[0].FrameOfReferenceUID))
    with pytest.raises(SeriesRejected, match="two slices at z="):
        build_volume(dss + dup)
    with pytest.raises(SeriesRejected, match="no instances"):
        build_volume([])


def test_spacing_tolerance(tmp_path):
    """0.5% jitter of one slice passes the default 1%, not 0.1%."""
    dss = _load(write_series(tmp_path, toy_volume((6, 5, 5)), AXIAL))
    z = float(dss[2].ImagePositionPatient[2])
    dss[2].ImagePositionPatient = [*dss[2].ImagePositionPatient[:2], z + 0.005 * 2.0]
    build_volume(dss)
    with pytest.raises(SeriesRejected, match=r"uneven slice spacing .* \(tolerance 0\.1%\)"):
        build_volume(dss, spacing_tolerance=0.001)


def test_study_good_and_bad_series(tmp_path, caplog):
    arr = toy_volume((10, 9, 6))
    written = write_study(tmp_path, [
        SeriesSpec(arr, OBLIQUE, {"description": "good", "descending": True, "slope": 2.0, "intercept": -1024.0}),
        SeriesSpec(arr, AXIAL, {"description": "bad", "defect": "missing_slice"}),
    ], text_sr=True)
    (tmp_path / "README.txt").write_text("not DICOM")
    with caplog.at_level(logging.WARNING):
        datasets = read_folder(tmp_path)
    assert "README.txt" in caplog.text
    groups = group_series(datasets)
    assert set(groups) == set(written)
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    outcome = {}
    for series in groups.values():
        try:
            vol = build_volume(series)
            outcome[vol.description] = vol
        except SeriesRejected as e:
            outcome[e.description] = e
    _assert_round_trip(outcome["good"], arr, OBLIQUE, atol_values=1.0 + 1e-3)
    assert isinstance(outcome["bad"], SeriesRejected) and "missing slice" in outcome["bad"].reason
    assert isinstance(outcome["toy report"], SeriesRejected) and "not an image" in outcome["toy report"].reason


def test_pydicom_ct5n():
    """pydicom's real 5-slice CT (16x16, 2.5 mm apart, instance numbers 6..10 running from z=8.76 down)."""
    datasets = read_folder(CT5N)
    groups = group_series(datasets)
    assert len(groups) == 1
    (series,) = groups.values()
    vol = build_volume(series)
    first = series[0]
    assert vol.array.shape == (5, int(first.Rows), int(first.Columns)) == (5, 16, 16)
    np.testing.assert_allclose(vol.spacing, (2.5, *[float(v) for v in first.PixelSpacing]), atol=1e-5)
    z = [float(ds.ImagePositionPatient[2]) for ds in vol.datasets]
    assert z == sorted(z)  # ascending along the normal (axial: +z, towards the head)
    assert [int(ds.InstanceNumber) for ds in vol.datasets] == [10, 9, 8, 7, 6]
    _assert_sop_per_slice(vol)
    # rescale applied once: intercept -1024, slope 1
    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    raw = by_uid[vol.sop_instance_uids[0]].pixel_array
    np.testing.assert_array_equal(vol.array[0], raw.astype(np.float32) * float(first.RescaleSlope)
                                  + float(first.RescaleIntercept))
