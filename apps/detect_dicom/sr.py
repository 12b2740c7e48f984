"""The findings of one series as a Comprehensive 3D SR (TID 1500 Measurement Report) that viewers draw.

Written with highdicom, one pair of measurement groups per finding above the operating point:

* a **TID 1410 planar group**, what OHIF and Slicer draw as a rectangle: textual Tracking Identifier
  ``"Finding N"`` (Slicer names the box after it) and a Tracking Unique Identifier (OHIF drops an SR whose
  groups lack one); the box on its centre slice as an SCOORD ``POLYLINE`` of 5 pixel (column, row) points
  (closed: first = last, corners in order), SELECTED FROM that slice's instance; Geometric purpose of region
  (DCM 130400) = Bounded by (SCT 75958009, CP-1852: Slicer shows a box only with it); the finding type coded
  from the bundle's label map (:mod:`apps.detect_dicom.codes`); the score as a NUM (probability) and the
  box's width, height and depth in mm as NUMs; a TEXT comment ``"nodule p=0.87"``.
  OHIF (Cornerstone's SR adapters) reads a rectangle's corners from an SCOORD *inside* a NUM (relationship
  INFERRED FROM): without it the box is drawn but is no editable rectangle. highdicom does not build that
  item in a planar group, so :func:`_add_inferred_from` adds it with pydicom after the object is built.
* a **TID 1411 volumetric group** (same Tracking Identifier with " (3D)", its own UID): the closed rectangle on
  every slice the box spans, so a reader can rebuild the box in 3D: a Volume Surface (DCM 121231) of SCOORD3D
  ``POLYGON``s, 5 LPS mm points each (first = last) on the slice's centre plane, in the series' frame of
  reference, with the spanned instances as its source images (a one-slice box gets its two faces instead: a
  surface needs two polygons). Not 2D SCOORD POLYLINEs: Cornerstone's adapters take any group whose first
  SCOORD is a 4/5-point POLYLINE for a RectangleROI, so OHIF would list a second, "3D" rectangle per finding.

Pixel coordinates follow DICOM (PS3.3 C.18.6.1.1): (0, 0) is the top-left corner of the top-left pixel, so the
box's voxel edges ``c0, c1`` / ``r0, r1`` (see :mod:`apps.detect_dicom.findings`) are its SCOORD coordinates.
A series without a finding above the operating point gets an SR that says so in a TEXT item, with no
measurement group at all (OHIF fails on groups without geometry).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from apps.detect_dicom import codes as cc
from apps.detect_dicom.findings import DicomVolume, Finding

MANUFACTURER = "nndet-monai"
SERIES_DESCRIPTION = "nndet findings (SR)"


def rectangle(c0: float, r0: float, c1: float, r1: float) -> np.ndarray:
    """The closed 5-point outline of a box on a slice: pixel (column, row) corners in order, first = last."""
    return np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float32)


def _source(volume: DicomVolume, s: int) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(str(volume.datasets[s].SOPClassUID), volume.sop_instance_uids[s])


def _outline(volume: DicomVolume, f: Finding, s: int) -> hd.sr.ImageRegion:
    _, r0, c0, _, r1, c1 = f.box_voxel
    return hd.sr.ImageRegion(hd.sr.GraphicTypeValues.POLYLINE, rectangle(c0, r0, c1, r1), _source(volume, s))


def volume_surface(volume: DicomVolume, f: Finding) -> hd.sr.VolumeSurface:
    """The box as closed rectangles in LPS mm on the centre plane of every slice it spans (or, for a one-slice
    box, on its two faces), with the spanned instances as source images."""
    s0, r0, c0, s1, r1, c1 = f.box_voxel
    planes = list(range(s0, s1)) if s1 - s0 >= 2 else [s0 - 0.5, s1 - 0.5]
    # pixel coordinate x is voxel index x - 0.5 (DICOM's origin is the top-left pixel's corner)
    polygons = [(np.array([[s, r - 0.5, c - 0.5, 1.0] for c, r in rectangle(c0, r0, c1, r1)]) @ volume.affine.T)
                [:, :3] for s in planes]
    sources = [hd.sr.SourceImageForSegmentation(str(volume.datasets[s].SOPClassUID), volume.sop_instance_uids[s])
               for s in range(s0, s1)]
    return hd.sr.VolumeSurface(hd.sr.GraphicTypeValues3D.POLYGON, polygons, volume.frame_of_reference_uid,
                               source_images=sources)


def image_extents_mm(volume: DicomVolume, f: Finding) -> tuple[float, float, float]:
    """(width, height, depth) of the box in mm: along the image's columns, rows and slices."""
    ds, dr, dc = volume.spacing
    s0, r0, c0, s1, r1, c1 = f.box_voxel
    return (c1 - c0) * dc, (r1 - r0) * dr, (s1 - s0) * ds


def comment(f: Finding) -> str:
    """The finding's one-line text: ``"nodule p=0.87"``."""
    return f"{f.class_name} p={f.score:.2f}"


def _measurements(volume: DicomVolume, f: Finding) -> list[hd.sr.Measurement]:
    width, height, depth = image_extents_mm(volume, f)
    return [hd.sr.Measurement(cc.DETECTION_SCORE, round(f.score, 6), cc.NO_UNITS),
            hd.sr.Measurement(cc.WIDTH, round(width, 3), cc.MILLIMETRE),
            hd.sr.Measurement(cc.HEIGHT, round(height, 3), cc.MILLIMETRE),
            hd.sr.Measurement(cc.DEPTH, round(depth, 3), cc.MILLIMETRE)]


def _text(value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=cc.COMMENT, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _groups(volume: DicomVolume, f: Finding, algorithm: hd.sr.AlgorithmIdentification) -> list[Any]:
    kind = cc.finding_type(f.class_name)
    planar = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"Finding {f.index}"),
        referenced_region=_outline(volume, f, f.center_slice), finding_type=kind, algorithm_id=algorithm,
        measurements=_measurements(volume, f), geometric_purpose=cc.BOUNDED_BY,
        finding_category=cc.MORPHOLOGIC_ABNORMALITY)
    planar[0].ContentSequence.append(_text(comment(f)))
    volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"Finding {f.index} (3D)"),
        referenced_volume_surface=volume_surface(volume, f), finding_type=kind,
        algorithm_id=algorithm, geometric_purpose=cc.BOUNDED_BY, finding_category=cc.MORPHOLOGIC_ABNORMALITY)
    volumetric[0].ContentSequence.append(_text(comment(f)))
    return [planar, volumetric]


def _is(item: Dataset, value_type: str, code: Any | None = None) -> bool:
    if item.get("ValueType") != value_type:
        return False
    if code is None:
        return True
    name = item.ConceptNameCodeSequence[0]
    return name.CodeValue == code.value and name.CodingSchemeDesignator == code.scheme_designator


def _add_inferred_from(sr: Dataset) -> int:
    """Give every NUM of a planar group an INFERRED FROM copy of the group's SCOORD (see module docstring);
    returns how many were added."""
    added = 0
    for container in sr.ContentSequence:
        if not _is(container, "CONTAINER", codes.DCM.ImagingMeasurements):
            continue
        for group in container.ContentSequence:
            items = list(group.get("ContentSequence", []))
            scoords = [i for i in items if _is(i, "SCOORD")]
            if len(scoords) != 1:  # volumetric groups hold one outline per slice and no NUM that needs it
                continue
            for num in (i for i in items if _is(i, "NUM")):
                ref = copy.deepcopy(scoords[0])
                ref.RelationshipType = "INFERRED FROM"
                num.ContentSequence = DicomSequence([*num.get("ContentSequence", []), ref])
                added += 1
    return added


def _say_no_finding(root: Dataset, text: str) -> None:
    """TID 1500 without measurement groups: the Imaging Measurements container is replaced by the Qualitative
    Evaluations container (TID 1500 row 12) holding ``text``, so no group without geometry is left."""
    kept = [i for i in root.ContentSequence if not _is(i, "CONTAINER", codes.DCM.ImagingMeasurements)]
    evaluations = hd.sr.ContainerContentItem(name=cc.QUALITATIVE_EVALUATIONS,
                                             relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    evaluations.ContentSequence = hd.sr.ContentSequence([_text(text)])
    root.ContentSequence = hd.sr.ContentSequence([*kept, evaluations])


def build_sr(volume: DicomVolume, findings: Sequence[Finding], *, operating_point: float, model_name: str,
             model_version: str, algorithm_name: str, series_number: int = 990,
             series_instance_uid: str | None = None) -> hd.sr.Comprehensive3DSR:
    """The SR object (see module docstring) of the findings with ``score >= operating_point``."""
    shown = [f for f in findings if f.score >= operating_point]
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=str(model_version))
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=algorithm_name[:64], manufacturer_name=MANUFACTURER, model_name=model_name[:64]))
    groups = [g for f in shown for g in _groups(volume, f, algorithm)]
    # highdicom insists on one measurement group; with no finding a placeholder is built and swapped below
    placeholder = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="none"))]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=cc.IMAGING_PROCEDURE, imaging_measurements=groups or placeholder)
    if not shown:
        _say_no_finding(report[0], f"No finding with score >= {operating_point:.3f} (model {model_name} "
                        f"{model_version}); {len(findings)} candidate box(es) below it are in the JSON output.")
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(volume.datasets), content=report[0], series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, series_description=SERIES_DESCRIPTION)
    _add_inferred_from(sr)
    return sr


def write_sr(volume: DicomVolume, findings: Sequence[Finding], path: str | Path, **kwargs: Any) -> Path:
    """Build the SR (:func:`build_sr`'s keyword arguments) and write it atomically to ``path``."""
    sr = build_sr(volume, findings, **kwargs)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        sr.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_sr_boxes(path: str | Path) -> list[dict[str, Any]]:
    """The rectangles of an SR written by :func:`write_sr` (for checks and the PNG): per planar group its
    tracking identifier and UID, the SOP Instance UID it is drawn on, the 5 (column, row) points, the score."""
    sr = hd.sr.srread(path)
    out = []
    for group in sr.content.get_planar_roi_measurement_groups():
        region = group.roi
        score = next((m.value for m in group.get_measurements() if m.name == cc.DETECTION_SCORE), None)
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        out.append({"tracking_identifier": group.tracking_identifier, "tracking_uid": group.tracking_uid,
                    "sop_instance_uid": str(ref.ReferencedSOPInstanceUID), "points": region.value.tolist(),
                    "score": None if score is None else float(score)})
    return out
