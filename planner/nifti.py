"""Reading cases from NIfTI with nibabel (voxel index order i, j, k; spacing from the affine)."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from planner.dataset import CaseFiles, DatasetError


@dataclass
class CaseData:
    """One loaded case.

    Attributes:
        data: float32 [C, *spatial] (C modalities; spatial is 2 or 3 axes, raw voxel order); int8, uint8
            or int16 as stored with ``load_case(compact=True)``.
        seg: int32 [*spatial] instance map (0 background) or None for unlabeled cases; int16 where the
            values fit with ``load_case(compact=True)``.
        affine: 4x4 voxel-to-world (RAS, mm) of the first modality.
        spacing: voxel size per spatial axis (mm).
        instances: instance id -> class index (from the case json), empty without labels.
    """

    case_id: str
    data: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray
    spacing: list[float]
    instances: dict[int, int]


def spacing_from_affine(affine: np.ndarray, ndim: int) -> list[float]:
    return [float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)[:ndim]]


def read_nifti(path: str | Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """``nib.load`` with the data in memory; a ``.gz`` file is inflated by one ``zlib`` call.

    nibabel streams gzip files through ``gzip.GzipFile`` in small reads; inflating the whole file at
    once is about a quarter faster. Anything unusual (multi-member gzip, not NIfTI-1/2) goes through
    ``nib.load``, so errors and results stay nibabel's own.
    """
    path = Path(path)
    if not path.name.endswith(".gz"):
        return nib.load(str(path))
    raw = path.read_bytes()
    inflater = zlib.decompressobj(wbits=31)  # 31: gzip container
    try:
        buf = inflater.decompress(raw)
    except zlib.error:
        return nib.load(str(path))
    if not inflater.eof or inflater.unused_data or len(buf) < 4:
        return nib.load(str(path))
    sizeof_hdr = {int.from_bytes(buf[:4], "little"), int.from_bytes(buf[:4], "big")}
    if 348 in sizeof_hdr:
        return nib.Nifti1Image.from_bytes(buf)
    if 540 in sizeof_hdr:
        return nib.Nifti2Image.from_bytes(buf)
    return nib.load(str(path))


def load_nifti(path: Path, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Load one NIfTI as (array, affine); a 2D task's (X, Y, 1) volumes are squeezed to (X, Y)."""
    try:
        img = read_nifti(path)
        arr = np.asanyarray(img.dataobj)
    except FileNotFoundError as e:
        raise DatasetError([(str(path), "file is missing")]) from e
    except Exception as e:  # nibabel raises several types for broken files
        raise DatasetError([(str(path), f"cannot be read as NIfTI ({e}); re-export the file")]) from e
    if dim == 2 and arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != dim:
        raise DatasetError(
            [(str(path), f"has {arr.ndim} axes {arr.shape} but dataset dim is {dim}; fix dataset.json 'dim' or the file")]
        )
    return arr, np.asarray(img.affine, dtype=np.float64)


def load_instances_json(path: Path) -> dict[int, int]:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise DatasetError([(str(path), "instance json is missing; write {\"instances\": {\"1\": 0}}")]) from e
    except json.JSONDecodeError as e:
        raise DatasetError([(str(path), f"not valid JSON ({e})")]) from e
    inst = raw.get("instances", {}) if isinstance(raw, dict) else None
    if not isinstance(inst, dict):
        raise DatasetError([(str(path), "must hold {\"instances\": {\"<id>\": <class>}}")])
    return {int(k): int(v) for k, v in inst.items()}


LABEL_TOLERANCE = 1e-3  # float label maps (float export, scl_slope) within this of an integer are rounded


def label_to_int(arr: np.ndarray, path: str | Path) -> np.ndarray:
    """An instance map as int32: float values within ``LABEL_TOLERANCE`` of an integer are rounded (a label
    stored as 0.9999999 stays instance 1; ``astype`` would truncate it to background).

    Raises:
        DatasetError: values that are not (close to) integers, or NaN/inf, naming the file and the fix.
    """
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.int32, copy=False)
    rounded = np.rint(arr)
    bad = ~np.isfinite(arr) | (np.abs(arr - rounded) > LABEL_TOLERANCE)
    if bad.any():
        examples = sorted({float(v) for v in arr[bad].ravel()[:1000]})[:5]
        raise DatasetError([(str(path), f"label map holds {int(bad.sum())} non-integer value(s) (e.g. {examples}); it "
                             "must be an instance map of integers (0 background, 1..N): save it with an integer "
                             "type, with nearest-neighbour interpolation if it was resampled")])
    return rounded.astype(np.int32)


# stored image types float32 holds exactly: ``load_case(compact=True)`` keeps them (the preprocessing
# chain converts slab by slab), halving the memory of an int16 CT; torch has tensors of each. Label maps
# of these types fit int16 as they are.
_COMPACT_IMAGE_TYPES = (np.int8, np.uint8, np.int16)


def _compact_label(arr: np.ndarray, path: str | Path) -> np.ndarray:
    """An integer instance map of at most 16 bits as C-ordered int16 when its values fit (room for the
    -1 the crop writes), else ``label_to_int``'s int32 (C-ordered too)."""
    arr = np.asarray(arr)
    if arr.dtype.type in _COMPACT_IMAGE_TYPES or (
        arr.dtype.type == np.uint16 and (arr.size == 0 or int(arr.max()) <= np.iinfo(np.int16).max)
    ):
        return np.asarray(arr, dtype=np.int16, order="C")
    return np.asarray(label_to_int(arr, path), order="C")


def load_case(files: CaseFiles, dim: int, with_label: bool = True, compact: bool = False) -> CaseData:
    """Load all modalities (+ label map and instance json when present and asked for; with box annotations
    the box json, filled into an instance map by ``planner.box_labels``).

    ``compact`` (the preprocessing worker): ``data`` stays in its stored type where that is int8, uint8
    or int16 (values float32 holds exactly; anything else is float32 as usual) and is C-ordered, the
    label map is int16 where its values fit: the same values in half the memory (a 512x512x600 int16 CT
    is 300 MiB instead of 600, its uint8 label map 300 instead of 600), and the crop of the
    preprocessing chain needs no copy of a case it does not crop.
    """
    arrays, affine = [], None
    for p in files.images:
        arr, aff = load_nifti(p, dim)
        if compact and arr.dtype.type in _COMPACT_IMAGE_TYPES and len(files.images) == 1:
            arrays.append(np.asarray(arr, order="C"))
        else:
            arrays.append(np.asarray(arr, dtype=np.float32, order="C" if compact else "K"))
        del arr
        affine = aff if affine is None else affine
    odd = [(p, a.shape) for p, a in zip(files.images, arrays, strict=True) if a.shape != arrays[0].shape]
    if odd:
        raise DatasetError([(str(p), f"shape {shape} differs from {arrays[0].shape} of {files.images[0].name}; "
                             "resample every modality to one grid") for p, shape in odd])
    data = arrays[0][None] if len(arrays) == 1 else np.stack(arrays, 0)
    seg, instances = None, {}
    if with_label and files.boxes and files.instances_json is not None and files.instances_json.exists():
        from planner.box_labels import box_instance_map

        seg, instances, _ = box_instance_map(files.instances_json, data.shape[1:], affine)
    elif with_label and files.label is not None and files.label.exists():
        seg_arr, _ = load_nifti(files.label, dim)
        seg = _compact_label(seg_arr, files.label) if compact else label_to_int(seg_arr, files.label)
        del seg_arr
        if seg.shape != data.shape[1:]:
            raise DatasetError([(str(files.label), f"label shape {seg.shape} differs from image shape {data.shape[1:]}")])
        if files.instances_json is not None:
            instances = load_instances_json(files.instances_json)
    return CaseData(files.case_id, data, seg, affine, spacing_from_affine(affine, dim), instances)
