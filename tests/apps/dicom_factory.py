"""Synthetic DICOM CT/MR series, written in code from a NIfTI-convention volume, for the app's tests.

The input is what nibabel gives for a toy NIfTI case: an array ``[i, j, k]`` and the RAS+ 4x4 affine of
``(i, j, k)``. It is written as single-frame instances (CT Image Storage or MR Image Storage, explicit VR
little endian, with file meta) by the exact inverse of :meth:`apps.detect_dicom.findings.DicomVolume.nifti_view`:

* DICOM column index = ``i``, row index = ``j``, slice index = ``k``; LPS = RAS with x and y negated;
* ImageOrientationPatient: row cosine = LPS direction of ``i`` (increasing column index), column cosine =
  LPS direction of ``j``;
* ImagePositionPatient of slice ``k`` = LPS position of voxel ``(0, 0, k)``;
* PixelSpacing = ``[row spacing (along j), column spacing (along i)]``.

A right-handed affine (``det > 0``) puts ``k`` along the slice normal ``row cosine x column cosine``, so the
volume built from the files has the same index order and ``nifti_view()`` gives back the input exactly; a
left-handed one comes back with ``k`` reversed (the same voxels in space).

``defect`` writes a *bad* series for refusal tests (see :data:`DEFECTS`). UIDs are deterministic: they derive
from ``seed`` (:func:`uid`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

logger = logging.getLogger(__name__)

BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

DEFECTS = {
    "missing_slice": "the middle slice is not written",
    "uneven_spacing": "slices from the middle on are moved by an extra 0.75 x the slice spacing",
    "shear": "gantry tilt: slice k is shifted by k x tan(15 deg) x spacing along the column cosine",
    "mixed_orientation": "the middle slice's orientation is rotated by 5 deg about the slice normal",
    "mixed_size": "the middle slice has half the rows and columns",
    "no_pixel_data": "the middle instance has no Pixel Data",
    "non_image": "a Basic Text SR instance is written into the same series",
}
"""Defects :func:`write_series` can build in (name -> what it does)."""

DEFAULT_IMAGE_TYPE = {"CT": ("ORIGINAL", "PRIMARY", "AXIAL"), "MR": ("ORIGINAL", "PRIMARY", "OTHER")}
"""Image Type of each modality unless given."""

_DATE, _TIME = "20240101", "120000"


def uid(*parts: object) -> str:
    """A deterministic UID from ``parts`` (``generate_uid`` with them as entropy sources)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


@dataclass(frozen=True)
class Geometry:
    """DICOM plane geometry of a NIfTI ``(i, j, k)`` RAS affine.

    Attributes:
        lps: 4x4 affine of ``(i, j, k)`` to LPS mm.
        row_cosine, column_cosine: unit LPS directions of ``i`` and ``j``.
        pixel_spacing: ``[row spacing (along j), column spacing (along i)]`` mm.
        slice_step: LPS vector from slice ``k`` to ``k + 1``.
    """

    lps: np.ndarray
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_step: np.ndarray

    @classmethod
    def from_affine(cls, affine_ras: np.ndarray) -> Geometry:
        """Geometry of ``affine_ras`` (columns ``i`` and ``j`` must be orthogonal)."""
        lps = LPS_TO_RAS @ np.asarray(affine_ras, float)
        ci, cj = lps[:3, 0], lps[:3, 1]
        si, sj = float(np.linalg.norm(ci)), float(np.linalg.norm(cj))
        if abs(ci @ cj) > 1e-6 * si * sj:
            raise ValueError("the i and j axes of the affine are not orthogonal")
        return cls(lps, ci / si, cj / sj, (sj, si), lps[:3, 2].copy())

    def position(self, k: float) -> np.ndarray:
        """LPS position of voxel ``(0, 0, k)``."""
        return (self.lps @ np.array([0.0, 0.0, k, 1.0]))[:3]

    @property
    def normal(self) -> np.ndarray:
        """Slice normal ``row cosine x column cosine``."""
        return np.cross(self.row_cosine, self.column_cosine)


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    """3x3 rotation matrix about ``axis`` by ``degrees`` (right-hand rule)."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def make_affine(spacing: Sequence[float] = (1.0, 1.0, 1.0), rot: np.ndarray | None = None,
                origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS+ affine ``origin + rot @ diag(spacing)`` of ``(i, j, k)`` (``rot`` defaults to identity)."""
    aff = np.eye(4)
    aff[:3, :3] = (np.eye(3) if rot is None else np.asarray(rot, float)) @ np.diag(np.asarray(spacing, float))
    aff[:3, 3] = origin
    return aff


def toy_volume(shape: Sequence[int] = (12, 10, 8), seed: int = 0, low: int = -1000, high: int = 1000) -> np.ndarray:
    """Integer-valued float32 ``[i, j, k]`` noise volume (every voxel distinguishable, so mix-ups show)."""
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, size=tuple(shape)).astype(np.float32)


def _ds_str(values: Sequence[float]) -> list[str]:
    # DS holds at most 16 characters; 10 significant digits keep positions exact to well under 1e-6 mm
    return [f"{float(v):.10g}" for v in values]


def _stored(plane: np.ndarray, slope: float, intercept: float, signed: bool) -> np.ndarray:
    stored = np.rint((np.asarray(plane, float) - intercept) / slope)
    info = np.iinfo(np.int16 if signed else np.uint16)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(f"values do not fit {info.dtype} stored values with slope {slope}, intercept {intercept}")
    return stored.astype(info.dtype)


def _common(ds: Dataset, *, study_uid: str, series_uid: str, series_number: int, modality: str,
            description: str, patient_id: str) -> None:
    # Patient, General Study, General Series, General Equipment, SOP Common (shared by images and SR)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Toy^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = _DATE, _TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "toy study"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate, ds.SeriesTime = _DATE, _TIME
    ds.Manufacturer = "nndet-monai test factory"
    ds.InstanceCreationDate, ds.InstanceCreationTime = _DATE, _TIME
    ds.ContentDate, ds.ContentTime = _DATE, _TIME


def _save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "NNDET_TEST"
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def make_instance(plane_rc: np.ndarray, *, position: Sequence[float], row_cosine: Sequence[float],
                  column_cosine: Sequence[float], pixel_spacing: Sequence[float], slice_thickness: float,
                  instance_number: int, sop_instance_uid: str, study_uid: str, series_uid: str,
                  frame_of_reference_uid: str, modality: str = "CT", series_number: int = 1,
                  description: str = "", image_type: Sequence[str] | None = None,
                  slope: float = 1.0, intercept: float = 0.0, signed: bool = True,
                  patient_id: str = "TOY0001", pixel_data: bool = True) -> Dataset:
    """One single-frame CT or MR image instance (a Dataset without file meta).

    Args:
        plane_rc: modality values ``[rows, columns]`` of the slice.
        position, row_cosine, column_cosine, pixel_spacing: Image Plane values (LPS mm).
        slice_thickness: Slice Thickness (mm).
        slope, intercept: Rescale Slope/Intercept: stored = round((value - intercept) / slope).
        signed: int16 stored values (Pixel Representation 1), else uint16.
        pixel_data: False leaves the Pixel Data out (a broken instance).

    Returns:
        The dataset, valid CT Image / MR Image IOD apart from ``pixel_data=False``.
    """
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, not {modality!r}")
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    _common(ds, study_uid=study_uid, series_uid=series_uid, series_number=series_number, modality=modality,
            description=description, patient_id=patient_id)
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "CHEST"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Image / Acquisition
    ds.ImageType = list(image_type or DEFAULT_IMAGE_TYPE[modality])
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate, ds.AcquisitionTime = _DATE, _TIME
    ds.BurnedInAnnotation = "NO"
    # Image Plane
    rc, cc = np.asarray(row_cosine, float), np.asarray(column_cosine, float)
    ds.ImagePositionPatient = _ds_str(position)
    ds.ImageOrientationPatient = _ds_str([*rc, *cc])
    ds.PixelSpacing = _ds_str(pixel_spacing)
    ds.SliceThickness = f"{slice_thickness:.10g}"
    ds.SliceLocation = f"{float(np.asarray(position, float) @ np.cross(rc, cc)):.10g}"
    # Image Pixel
    stored = _stored(plane_rc, slope, intercept, signed)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    if pixel_data:
        ds.PixelData = stored.tobytes()
    # VOI LUT (for viewers)
    lo, hi = float(plane_rc.min()), float(plane_rc.max())
    ds.WindowCenter = f"{(lo + hi) / 2:.6g}"
    ds.WindowWidth = f"{max(hi - lo, 1.0):.6g}"
    if modality == "CT":
        ds.RescaleIntercept = f"{intercept:.10g}"
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
    else:
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleIntercept = f"{intercept:.10g}"
            ds.RescaleSlope = f"{slope:.10g}"
            ds.RescaleType = "US"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "20"
        ds.EchoTrainLength = 1
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = "1.5"
    return ds


def make_text_sr(*, study_uid: str, series_uid: str, sop_instance_uid: str, series_number: int = 99,
                 text: str = "No findings.", patient_id: str = "TOY0001") -> Dataset:
    """A minimal Basic Text SR instance (a non-image object) of ``study_uid``."""
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    _common(ds, study_uid=study_uid, series_uid=series_uid, series_number=series_number, modality="SR",
            description="toy report", patient_id=patient_id)
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return c

    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [code("18748-4", "LN", "Diagnostic Imaging Report")]
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = [code("121071", "DCM", "Finding")]
    item.TextValue = text
    ds.ContentSequence = [item]
    return ds


def write_text_sr(folder: str | Path, *, study_uid: str, series_uid: str | None = None, seed: object = 0,
                  name: str = "sr.dcm") -> Path:
    """Write :func:`make_text_sr` as ``folder/name``; returns the path."""
    series_uid = series_uid or uid(seed, study_uid, "sr series")
    ds = make_text_sr(study_uid=study_uid, series_uid=series_uid, sop_instance_uid=uid(seed, series_uid, "sr"))
    return _save(ds, Path(folder) / name)


def write_series(folder: str | Path, array_ijk: np.ndarray, affine_ras: np.ndarray, *, modality: str = "CT",
                 descending: bool = False, slope: float = 1.0, intercept: float = 0.0, signed: bool | None = None,
                 description: str = "toy series", image_type: Sequence[str] | None = None,
                 study_uid: str | None = None, series_uid: str | None = None,
                 frame_of_reference_uid: str | None = None, series_number: int = 1, seed: object = 0,
                 defect: str | None = None) -> list[Path]:
    """Write a NIfTI-convention volume as one single-frame DICOM series (see module docstring).

    Args:
        folder: where the files go (created); named ``0000.dcm``, ``0001.dcm``... in instance-number order.
        array_ijk: modality values ``[i, j, k]`` = ``[column, row, slice]``.
        affine_ras: RAS+ 4x4 affine of ``(i, j, k)``.
        modality: ``CT`` (CT Image Storage) or ``MR`` (MR Image Storage).
        descending: instance numbers and file order run from the highest slice ``k`` down.
        slope, intercept: Rescale Slope/Intercept; values come back within ``slope / 2``.
        signed: int16 (True) or uint16 (False) stored values; None picks uint16 when all fit.
        description, image_type: Series Description and Image Type (None: :data:`DEFAULT_IMAGE_TYPE`).
        study_uid, series_uid, frame_of_reference_uid: default to UIDs derived from ``seed``.
        series_number: Series Number (also part of the default series UID).
        seed: entropy for the deterministic UIDs.
        defect: one of :data:`DEFECTS` for a bad series, or None.

    Returns:
        The written paths, in instance-number order.
    """
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; one of {sorted(DEFECTS)}")
    arr = np.asarray(array_ijk)
    if arr.ndim != 3:
        raise ValueError(f"array_ijk must be 3D, got shape {arr.shape}")
    geo = Geometry.from_affine(affine_ras)
    study_uid = study_uid or uid(seed, "study")
    series_uid = series_uid or uid(seed, study_uid, "series", series_number)
    frame_of_reference_uid = frame_of_reference_uid or uid(seed, study_uid, "frame of reference")
    if signed is None:
        signed = bool(np.rint((arr.min() - intercept) / slope) < 0)
    n = arr.shape[2]
    mid = n // 2
    spacing = float(np.linalg.norm(geo.slice_step))
    normal = geo.normal
    slices = list(range(n - 1, -1, -1)) if descending else list(range(n))
    if defect == "missing_slice":
        slices.remove(mid)
    paths: list[Path] = []
    for number, k in enumerate(slices, start=1):
        plane = arr[:, :, k].T  # [j, i] = [row, column]
        pos = geo.position(k)
        rc, cc = geo.row_cosine, geo.column_cosine
        if defect == "uneven_spacing" and k >= mid:
            pos = pos + 0.75 * geo.slice_step
        elif defect == "shear":
            pos = pos + k * np.tan(np.deg2rad(15.0)) * spacing * cc
        elif defect == "mixed_orientation" and k == mid:
            rot = rotation(normal, 5.0)
            rc, cc = rot @ rc, rot @ cc
        elif defect == "mixed_size" and k == mid:
            plane = plane[: max(plane.shape[0] // 2, 1), : max(plane.shape[1] // 2, 1)]
        ds = make_instance(
            plane, position=pos, row_cosine=rc, column_cosine=cc, pixel_spacing=geo.pixel_spacing,
            slice_thickness=spacing, instance_number=number, sop_instance_uid=uid(seed, series_uid, "slice", k),
            study_uid=study_uid, series_uid=series_uid, frame_of_reference_uid=frame_of_reference_uid,
            modality=modality, series_number=series_number, description=description, image_type=image_type,
            slope=slope, intercept=intercept, signed=signed,
            pixel_data=not (defect == "no_pixel_data" and k == mid))
        if defect == "shear":
            ds.GantryDetectorTilt = "15"
        paths.append(_save(ds, Path(folder) / f"{number - 1:04d}.dcm"))
    if defect == "non_image":
        paths.append(write_text_sr(folder, study_uid=study_uid, series_uid=series_uid, seed=seed,
                                   name=f"{len(paths):04d}.dcm"))
    logger.debug("wrote %d file(s) of series %s (%s) to %s", len(paths), series_uid, description, folder)
    return paths


@dataclass(frozen=True)
class SeriesSpec:
    """One series of :func:`write_study`: its volume and :func:`write_series` keyword arguments."""

    array_ijk: np.ndarray
    affine_ras: np.ndarray
    options: dict


def write_study(folder: str | Path, series: Sequence[SeriesSpec], *, seed: object = 0, study_uid: str | None = None,
                text_sr: bool = False) -> dict[str, list[Path]]:
    """Write several series of one study (one frame of reference), each in ``folder/<series number>/``.

    Args:
        folder: the study folder (created).
        series: the series; numbered 1, 2, ... unless their options give ``series_number``.
        seed: entropy for the deterministic UIDs.
        study_uid: defaults to a UID derived from ``seed``.
        text_sr: also write a Basic Text SR instance of the study in ``folder/sr/``.

    Returns:
        Series Instance UID -> written paths.
    """
    study_uid = study_uid or uid(seed, "study")
    out: dict[str, list[Path]] = {}
    for number, spec in enumerate(series, start=1):
        opts = {"series_number": number, **spec.options}
        series_uid = opts.pop("series_uid", None) or uid(seed, study_uid, "series", opts["series_number"])
        out[series_uid] = write_series(Path(folder) / str(opts["series_number"]), spec.array_ijk, spec.affine_ras,
                                       study_uid=study_uid, series_uid=series_uid, seed=seed, **opts)
    if text_sr:
        sr_uid = uid(seed, study_uid, "sr series")
        out[sr_uid] = [write_text_sr(Path(folder) / "sr", study_uid=study_uid, series_uid=sr_uid, seed=seed)]
    return out
