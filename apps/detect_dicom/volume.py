"""One DICOM series -> one regular :class:`~apps.detect_dicom.findings.DicomVolume`, or a clear refusal.

:func:`build_volume` checks the series' geometry itself (so every refusal is a :class:`SeriesRejected` whose
message names the series and says what is wrong in plain words), then lets highdicom 0.28 build the array
and affine: :func:`highdicom.get_volume_from_series` for single-frame instances,
``highdicom.Image.from_dataset(ds).get_volume()`` for one enhanced multi-frame instance.

What highdicom does (verified against highdicom 0.28.2, and by ``tests/apps/test_volume.py``):

* order: it sorts the slices itself, whatever the input order, and its volume runs along
  ``column cosine x row cosine``, i.e. *against* the slice normal ``row cosine x column cosine``
  (from the highest slice down). Its affine is the truth; :func:`build_volume` flips the slice axis when the
  affine's slice direction points against the normal, so the DicomVolume contract holds;
* values: it applies the Modality LUT (Rescale Slope/Intercept) itself; it is asked here for modality values
  only (no real-world value map, which it would otherwise prefer, no VOI, no presentation LUT inversion),
  as float32, and nothing is rescaled again here.

Slice SOP Instance UIDs are matched to the final affine by each instance's Image Position (Patient), never
by list order. :func:`group_series` and :func:`read_folder` are the plain-pydicom loaders for use outside
the MONAI Deploy SDK.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from apps.detect_dicom.findings import DicomVolume

logger = logging.getLogger(__name__)

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# what highdicom is asked for: modality values (Rescale Slope/Intercept or Modality LUT), nothing else
_HD_VALUES = {
    "apply_real_world_transform": False,
    "apply_modality_transform": None,  # applied when present
    "apply_voi_transform": False,
    "apply_presentation_lut": False,
    "apply_palette_color_lut": False,
    "apply_icc_profile": False,
}
# in-plane shear is checked here in mm (stricter for long stacks than highdicom's angle test): off there
_HD_PERPENDICULAR_OFF = 1.0


class SeriesRejected(Exception):
    """A series that is not one regular image volume (or not one this app reads).

    Attributes:
        series_uid: its Series Instance UID.
        description: its Series Description.
        reason: what is wrong, in plain words.
    """

    def __init__(self, series_uid: str, description: str, reason: str) -> None:
        super().__init__(series_uid, description, reason)
        self.series_uid, self.description, self.reason = str(series_uid), str(description), str(reason)

    def __str__(self) -> str:
        return f"series {self.series_uid} ({self.description or 'no description'}) refused: {self.reason}"


def _mm(v: float) -> str:
    """Millimetres with as few decimals (1..3) as show the value."""
    for d in (1, 2):
        if abs(round(v, d) - v) < 1e-6:
            return f"{v:.{d}f}"
    return f"{v:.3f}"


def _sop(ds: Any) -> str:
    return str(getattr(ds, "SOPInstanceUID", "?"))


def _is_image(ds: Any) -> bool:
    return "Rows" in ds and "Columns" in ds


def _has_pixels(ds: Any) -> bool:
    return any(k in ds for k in PIXEL_KEYWORDS)


def _num_frames(ds: Any) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _view(ds: Dataset, *, drop_pixels: bool) -> Dataset:
    """A new Dataset sharing ``ds``'s elements (optionally without pixel data): highdicom's decoding then
    caches nothing on the caller's datasets, and kept metadata holds no pixels."""
    if not isinstance(ds, Dataset) or (not drop_pixels and "TransferSyntaxUID" not in getattr(ds, "file_meta", ())):
        return ds  # nothing to decode with in a copy: use the original
    skip = {tag_for_keyword(k) for k in PIXEL_KEYWORDS} if drop_pixels else set()
    out = Dataset({elem.tag: elem for elem in ds if elem.tag not in skip})
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, float)
    return a / np.linalg.norm(a)


class _Plane:
    """Geometry of one slice (a single-frame instance or one frame of a multi-frame one)."""

    def __init__(self, label: str, position: Sequence[float], orientation: Sequence[float],
                 spacing: Sequence[float], size: tuple[int, int]) -> None:
        self.label = label
        self.position = np.asarray([float(v) for v in position])
        self.row_cosine = _unit([float(v) for v in orientation[:3]])
        self.column_cosine = _unit([float(v) for v in orientation[3:6]])
        self.spacing = (float(spacing[0]), float(spacing[1]))
        self.size = size


def _check_planes(planes: Sequence[_Plane], *, spacing_tolerance: float, orientation_tolerance: float,
                  shear_tolerance: float, min_slices: int) -> str | None:
    """Why ``planes`` are not one regular stack (plain words), or None when they are."""
    sizes = Counter(p.size for p in planes)
    if len(sizes) > 1:
        names = " and ".join(f"{r}x{c}" for (r, c), _ in sizes.most_common())
        return f"mixed image sizes {names} (rows x columns)"
    ref = planes[0]
    worst = max(max(np.degrees(np.arccos(np.clip(p.row_cosine @ ref.row_cosine, -1, 1))),
                    np.degrees(np.arccos(np.clip(p.column_cosine @ ref.column_cosine, -1, 1)))) for p in planes)
    if any(p.row_cosine @ ref.row_cosine < 1 - orientation_tolerance
           or p.column_cosine @ ref.column_cosine < 1 - orientation_tolerance for p in planes):
        return f"mixed orientations (up to {worst:.2f} deg apart)"
    spacings = Counter(p.spacing for p in planes)
    if any(not np.allclose(s, ref.spacing, rtol=1e-4, atol=0) for s in spacings):
        names = " and ".join(f"{_mm(a)}x{_mm(b)}" for (a, b), _ in spacings.most_common())
        return f"mixed pixel spacings {names} mm"
    if len(planes) < min_slices:
        return f"{len(planes)} slice(s): not a volume (at least {min_slices} needed)"
    if len(planes) == 1:
        return None
    normal = np.cross(ref.row_cosine, ref.column_cosine)
    pos = np.stack([p.position for p in planes])
    z = pos @ normal
    order = np.argsort(z, kind="stable")
    z_sorted = z[order]
    steps = np.diff(z_sorted)
    pixel = min(ref.spacing)
    dup = np.flatnonzero(steps < 1e-3 * pixel)
    if dup.size:
        a, b = planes[order[dup[0]]], planes[order[dup[0] + 1]]
        return f"two slices at z={_mm(z_sorted[dup[0]])} mm ({a.label} and {b.label})"
    # in-plane offset of each slice from the line along the normal through the lowest slice
    rel = pos - pos[order[0]]
    in_plane = rel - np.outer(rel @ normal, normal)
    shift = float(np.linalg.norm(in_plane, axis=1).max())
    if shift > shear_tolerance * pixel:
        return (f"gantry tilt / shear: slice positions are not along the slice normal (in-plane shift up to "
                f"{_mm(shift)} mm)")
    mean = (z_sorted[-1] - z_sorted[0]) / (len(z_sorted) - 1)
    if np.allclose(steps, mean, rtol=spacing_tolerance, atol=0):  # highdicom's own regularity test
        return None
    step = float(np.median(steps))
    multiples = np.rint(steps / step)
    if np.allclose(steps, multiples * step, rtol=0, atol=spacing_tolerance * step) and (multiples >= 2).any():
        gaps = np.flatnonzero(multiples >= 2)
        words = [f"{'missing slice' if multiples[g] == 2 else f'{int(multiples[g]) - 1} missing slices'} "
                 f"between z={_mm(z_sorted[g])} and z={_mm(z_sorted[g + 1])} mm" for g in gaps[:3]]
        more = f" (and {len(gaps) - 3} more gaps)" if len(gaps) > 3 else ""
        return "; ".join(words) + more
    return (f"uneven slice spacing {_mm(float(steps.min()))}-{_mm(float(steps.max()))} mm "
            f"(tolerance {spacing_tolerance * 100:g}%)")


def _frame_planes(ds: Dataset) -> list[_Plane] | str:
    """Per-frame planes of an enhanced multi-frame image, or why they cannot be read."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = _num_frames(ds)
    if len(per_frame) != n:
        return f"multi-frame instance {_sop(ds)} has no per-frame functional groups for its {n} frames"

    def item(group: Dataset, seq: str) -> Dataset | None:
        value = group.get(seq)
        return value[0] if value else None

    planes = []
    for f, frame in enumerate(per_frame, start=1):
        pos = item(frame, "PlanePositionSequence") or item(shared, "PlanePositionSequence")
        ori = item(frame, "PlaneOrientationSequence") or item(shared, "PlaneOrientationSequence")
        mea = item(frame, "PixelMeasuresSequence") or item(shared, "PixelMeasuresSequence")
        if (pos is None or ori is None or mea is None or "ImagePositionPatient" not in pos
                or "ImageOrientationPatient" not in ori or "PixelSpacing" not in mea):
            return f"frame {f} of multi-frame instance {_sop(ds)} has no patient position/orientation/spacing"
        planes.append(_Plane(f"frame {f}", pos.ImagePositionPatient, ori.ImageOrientationPatient,
                             mea.PixelSpacing, (int(ds.Rows), int(ds.Columns))))
    return planes


def _instance_planes(datasets: Sequence[Dataset]) -> list[_Plane] | str:
    planes = []
    for ds in datasets:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            return f"instance {_sop(ds)} has no {'/'.join(missing)} (no patient geometry)"
        planes.append(_Plane(f"instance {_sop(ds)}", ds.ImagePositionPatient, ds.ImageOrientationPatient,
                             ds.PixelSpacing, (int(ds.Rows), int(ds.Columns))))
    return planes


def _oriented(vol: Any, ref: _Plane) -> Any:
    """highdicom's volume with its slice axis along ``row cosine x column cosine`` (flipped if need be)."""
    aff = np.asarray(vol.affine, float)
    col_dir, row_dir = _unit(aff[:3, 2]), _unit(aff[:3, 1])  # increasing column / row index
    if col_dir @ ref.row_cosine < 0.999 or row_dir @ ref.column_cosine < 0.999:
        raise RuntimeError("highdicom's volume axes are not (slice, row, column) of the series")
    if aff[:3, 0] @ np.cross(ref.row_cosine, ref.column_cosine) < 0:
        vol = vol.flip_spatial(0)
    return vol


def _match_slices(affine: np.ndarray, datasets: Sequence[Dataset]) -> list[int] | str:
    """Index into ``datasets`` of the instance at each slice of ``affine`` (by Image Position (Patient))."""
    n = len(datasets)
    centres = (affine @ np.c_[np.arange(n), np.zeros((n, 2)), np.ones(n)].T).T[:, :3]
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    dist = np.linalg.norm(centres[:, None, :] - pos[None, :, :], axis=2)
    match = dist.argmin(axis=1)
    half = 0.5 * float(np.linalg.norm(affine[:3, 0])) if n > 1 else np.inf
    if len(set(match.tolist())) != n or (dist[np.arange(n), match] >= half).any():
        return "slice positions drift off a regular grid"
    return match.tolist()


def build_volume(datasets: Sequence[Dataset], *, spacing_tolerance: float = 0.01,
                 orientation_tolerance: float = 1e-4, shear_tolerance: float = 0.1, min_slices: int = 2,
                 keep_pixel_data: bool = False) -> DicomVolume:
    """The regular volume of one series, in the :class:`DicomVolume` contract (see module docstring).

    Args:
        datasets: the series' instances (pydicom Datasets, any order): single-frame images, or one enhanced
            multi-frame image.
        spacing_tolerance: relative: every slice-to-slice distance along the normal within this fraction of
            the mean distance (highdicom's test; a distance that is a whole multiple of the others means a
            missing slice).
        orientation_tolerance: each instance's row and column cosines within ``1 - cos`` of the first's.
        shear_tolerance: largest in-plane offset of a slice from the stack's normal line, in pixels (of the
            smaller pixel spacing); more is gantry tilt / shear.
        min_slices: fewer slices are refused (one image is not a volume).
        keep_pixel_data: keep the pixel data in ``DicomVolume.datasets`` (default: dropped, the array has it).

    Returns:
        float32 ``[slice, row, column]`` modality values (rescale applied), slices along
        ``row cosine x column cosine``, the LPS affine, per-slice SOP Instance UIDs, and the source datasets in
        slice-index order (copies sharing the input's elements; the input is not changed).

    Raises:
        SeriesRejected: not one regular image volume (the message names the series and the reason).
    """
    import highdicom as hd

    datasets = list(datasets)
    first = datasets[0] if datasets else Dataset()
    series_uid = str(first.get("SeriesInstanceUID", ""))
    description = str(first.get("SeriesDescription", ""))

    def reject(reason: str) -> SeriesRejected:
        return SeriesRejected(series_uid, description, reason)

    if not datasets:
        raise reject("no instances")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise reject(f"instances of {len(uids)} different series")
    for ds in datasets:
        if not _is_image(ds):
            kind = UID(str(ds.get("SOPClassUID", ""))).name or "unknown SOP class"
            raise reject(f"instance {_sop(ds)} is not an image ({kind})")
    for ds in datasets:
        if not _has_pixels(ds):
            raise reject(f"no pixel data in instance {_sop(ds)}")
    for ds in datasets:
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise reject(f"instance {_sop(ds)} is a colour image ({ds.SamplesPerPixel} samples per pixel)")
    forms = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if "" in forms:
        raise reject("no Frame of Reference UID (no patient coordinate system)")
    if len(forms) > 1:
        raise reject(f"mixed frames of reference ({len(forms)})")
    multi = [ds for ds in datasets if _num_frames(ds) > 1]
    if multi and len(datasets) > 1:
        raise reject(f"{len(multi)} multi-frame instance(s) among {len(datasets)}: expected single-frame "
                     "images or one multi-frame image")
    checks = {"spacing_tolerance": spacing_tolerance, "orientation_tolerance": orientation_tolerance,
              "shear_tolerance": shear_tolerance, "min_slices": min_slices}

    planes = _frame_planes(first) if multi else _instance_planes(datasets)
    why = planes if isinstance(planes, str) else _check_planes(planes, **checks)
    if why:
        raise reject(why)
    ref = planes[0]
    try:
        if multi:
            view = _view(first, drop_pixels=False)
            image = hd.Image.from_dataset(view, copy=view is first)
            vol = image.get_volume(dtype=np.float32, rtol=spacing_tolerance,
                                   perpendicular_tol=_HD_PERPENDICULAR_OFF, **_HD_VALUES)
        else:
            views = [_view(ds, drop_pixels=False) for ds in datasets]
            vol = hd.get_volume_from_series(views, dtype=np.float32, rtol=spacing_tolerance,
                                            perpendicular_tol=_HD_PERPENDICULAR_OFF,
                                            orientation_tol=orientation_tolerance, **_HD_VALUES)
        vol = _oriented(vol, ref)
    except Exception as e:  # highdicom's own refusals (and decoding errors), in our words
        logger.debug("highdicom refused series %s", series_uid, exc_info=True)
        raise reject(f"highdicom could not build one volume: {type(e).__name__}: {e}") from e
    affine = np.asarray(vol.affine, float)
    array = np.ascontiguousarray(vol.array, dtype=np.float32)
    if array.ndim != 3:
        raise reject(f"not a grayscale volume (array shape {array.shape})")

    if multi:
        kept = (_view(first, drop_pixels=not keep_pixel_data),)
        sop_uids = (_sop(first),) * array.shape[0]
    else:
        match = _match_slices(affine, datasets)
        if isinstance(match, str):
            raise reject(match)
        kept = tuple(_view(datasets[m], drop_pixels=not keep_pixel_data) for m in match)
        sop_uids = tuple(_sop(ds) for ds in kept)
    logger.info("series %s (%s): volume %s, spacing %s mm", series_uid, description, array.shape,
                tuple(round(float(s), 4) for s in np.linalg.norm(affine[:3, :3], axis=0)))
    return DicomVolume(array=array, affine=affine, sop_instance_uids=sop_uids,
                       study_instance_uid=str(first.get("StudyInstanceUID", "")),
                       series_instance_uid=series_uid, frame_of_reference_uid=forms.pop(),
                       datasets=kept, description=description)


def group_series(datasets: Iterable[Dataset]) -> dict[str, list[Dataset]]:
    """Datasets by Series Instance UID (first-seen order; input order within a series); datasets without
    one are skipped with a warning."""
    out: dict[str, list[Dataset]] = {}
    for ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            logger.warning("skipping instance %s: no Series Instance UID", _sop(ds))
            continue
        out.setdefault(uid, []).append(ds)
    return out


def read_folder(folder: str | Path, *, recursive: bool = True) -> list[Dataset]:
    """Every DICOM instance under ``folder`` (sorted paths; ``pydicom.dcmread``).

    Non-DICOM files are skipped with a warning; DICOMDIR files (not instances) with an info message.
    """
    folder = Path(folder)
    paths = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    out = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, EOFError) as e:
            logger.warning("skipping %s: not a DICOM file (%s)", path, e)
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
            logger.info("skipping %s: a DICOMDIR, not an instance", path)
            continue
        out.append(ds)
    logger.info("read %d DICOM instance(s) from %s", len(out), folder)
    return out
