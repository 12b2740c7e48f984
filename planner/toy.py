"""Toy detection task (`nndet_example`): nnDetection's ``scripts/generate_example.py``, in our code.

Every case holds exactly one object (instance id 1) on uniform noise:

* class 0 ``Square``: a filled cube (2D: a filled square);
* class 1 ``SquareHole``: the same cube with a square tunnel through it, i.e. a square ring extruded
  along one axis; the walls are ``width`` voxels thick (2D: a square ring).

Object voxels get +0.4 and the image is clipped to [0, 1] (MRI-like), or, with ``modality="CT"``, the
image is given in Hounsfield-like units: background -1000..-800, object +100..+300 (int16), so that
CT normalisation (dataset percentiles) is exercised.

Axis convention (decided here, used by the tests): nnDetection builds a numpy array whose axis 0 is
SimpleITK's z and runs the tunnel along it. We build the same array and write its transpose with
nibabel, so the file has nnDetection's voxel layout: in our (i, j, k) arrays the tunnel runs along
the **last** axis k (the slice axis; the coarse axis of the anisotropic CT-like sets). Boxes returned
by :func:`make_case` are MONAI StandardMode in (i, j, k) voxel coordinates, half-open.

Randomness: one legacy ``np.random.RandomState(idx + seed_offset)`` per case (the stream that
``np.random.seed(idx)`` gives), drawn in nnDetection's order: edge, class, noise, corner. The same
case is therefore byte-identical across runs and process counts. Data are written as float32
(nnDetection writes float64), which halves the files; we have not compared with nnDetection's files.

Presets (``planner.presets.PRESET_NAMES``, the planner's names; volume edge ``size``, cube edge drawn
from ``randint(edge_lo, edge_hi)``, wall ``width``):

* ``default`` 3D: 256, 16..31, 4 (nnDetection's values); 2D: 256, 32..63, 8 (nnDetection's commented
  2D values; it does not support 2D, we do). ``nndet``, its former name, is still accepted.
* ``cpu`` (sized for a few CPU cores) 3D: 64, 8..15, 2. A 64^3 case has 1/64 of the voxels of a 256^3
  one, so writing, preprocessing and an epoch are ~64x cheaper and the README demo trains on 2 CPU
  cores in minutes.
  Edges are halved (not quartered) so that the smallest cube still spans 2 voxels at stride 4 (the
  finest detection level) and the tunnel (edge - 2*width >= 4 voxels) survives two poolings.
  2D: 128, 16..31, 4 (2D cases are cheap; the same object-to-image ratio as nnDetection's 2D).

``size`` overrides the preset's edge; object edges and wall width are scaled with it (edges at least
4 voxels, walls at least 1, the tunnel at least 2 voxels wide).

Task names: ``Task000D3_Example`` (3D, nnDetection's name) and ``Task001D2_Example`` (2D; its own
number so that ``nndet_prep 000`` stays unambiguous when both exist).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from planner import paths
from planner.box_labels import boxes_json
from planner.io import make_temp_dir, save_json
from planner.presets import DEFAULT_PRESET, PRESET_NAMES

logger = logging.getLogger(__name__)

LABELS = {"0": "Square", "1": "SquareHole"}
DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST = 10, 10
FULL_NUM_TRAIN, FULL_NUM_TEST = 1000, 1000
INTENSITY_SHIFT = 0.4  # added to object voxels (MRI-like images), then clipped to [0, 1]
CT_BACKGROUND_HU = (-1000.0, -800.0)
CT_OBJECT_HU = (100.0, 300.0)
TASK_NAMES = {3: "Task000D3_Example", 2: "Task001D2_Example"}
_TASK_NAME_RE = re.compile(r"^Task\d{3}[A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class ToyPreset:
    """Volume edge ``size``; cube edges from ``randint(edge_lo, edge_hi)`` (hi excluded); wall ``width``."""

    size: int
    edge_lo: int
    edge_hi: int
    width: int


PRESETS: dict[tuple[str, int], ToyPreset] = {
    ("default", 3): ToyPreset(256, 16, 32, 4),
    ("default", 2): ToyPreset(256, 32, 64, 8),
    ("cpu", 3): ToyPreset(64, 8, 16, 2),
    ("cpu", 2): ToyPreset(128, 16, 32, 4),
}
PRESET_ALIASES = {"nndet": "default"}  # former name of ``default``: old command lines keep working


@dataclass(frozen=True)
class ToySpec:
    """Everything one case needs (picklable for the worker processes)."""

    dim: int
    size: int
    edge_lo: int
    edge_hi: int
    width: int
    spacing: tuple[float, ...]
    modality: str
    seed_offset: int = 0
    spacing_jitter: float = 0.0


@dataclass
class ToyCase:
    """One generated case in our (i, j, k) voxel order.

    Attributes:
        image: [*spatial] float32 (MRI-like, [0, 1]) or int16 (CT-like, HU).
        mask: [*spatial] uint8 instance map (1 on the object).
        cls: class index (0 Square, 1 SquareHole).
        box: StandardMode box (x1, y1[, z1], x2, y2[, z2]) of the cube, voxel coordinates, half-open.
        spacing: voxel size per axis (mm).
    """

    image: np.ndarray
    mask: np.ndarray
    cls: int
    box: tuple[int, ...]
    spacing: tuple[float, ...]


def resolve_spec(
    preset: str, dim: int, size: int | None, spacing: tuple[float, ...] | None, modality: str,
    seed_offset: int = 0, spacing_jitter: float = 0.0,
) -> ToySpec:
    """Preset + overrides -> the case parameters (object edges and wall scaled with ``size``)."""
    preset = PRESET_ALIASES.get(preset, preset)
    if (preset, dim) not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} / dim {dim}: use a preset of {list(PRESET_NAMES)} and dim 2 or 3")
    p = PRESETS[(preset, dim)]
    size = p.size if size is None else int(size)
    scale = size / p.size
    edge_lo = max(4, round(p.edge_lo * scale))
    edge_hi = max(edge_lo + 1, round(p.edge_hi * scale))
    width = max(1, round(p.width * scale))
    width = min(width, (edge_lo - 2) // 2)  # keep a tunnel of at least 2 voxels
    if size <= edge_hi:
        raise ValueError(f"size {size} is too small for objects of edge {edge_lo}..{edge_hi - 1}: use a larger size")
    spacing = (1.0,) * dim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != dim or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing} must have {dim} positive values (one per axis, i j k order)")
    if not 0 <= spacing_jitter < 1:
        raise ValueError(f"spacing_jitter {spacing_jitter} must be a fraction in [0, 1)")
    return ToySpec(dim, size, edge_lo, edge_hi, width, spacing, modality, seed_offset, spacing_jitter)


def make_case(idx: int, spec: ToySpec) -> ToyCase:
    """Generate case ``idx`` (deterministic for a given ``idx + spec.seed_offset``); see module docstring."""
    rs = np.random.RandomState(idx + spec.seed_offset)
    edge = int(rs.randint(spec.edge_lo, spec.edge_hi))
    cls = int(rs.randint(0, 2))
    shape = (spec.size,) * spec.dim
    noise = rs.rand(*shape)  # float64 draws, as np.random.rand
    corner = [int(rs.randint(0, spec.size - edge)) for _ in range(spec.dim)]
    jitter = rs.uniform(1 - spec.spacing_jitter, 1 + spec.spacing_jitter, spec.dim) if spec.spacing_jitter else 1.0
    spacing = tuple(float(s) for s in np.asarray(spec.spacing) * jitter)

    # nnDetection order: axis 0 is the tunnel axis (SimpleITK z); transposed below to (i, j, k)
    obj = np.zeros(shape, dtype=bool)
    obj[tuple(slice(c, c + edge) for c in corner)] = True
    if cls == 1:
        inner = [slice(c + spec.width, c + edge - spec.width) for c in corner]
        if spec.dim == 3:
            inner[0] = slice(0, spec.size)
        obj[tuple(inner)] = False
    if spec.modality.upper() == "CT":
        lo_b, hi_b = CT_BACKGROUND_HU
        lo_o, hi_o = CT_OBJECT_HU
        image = np.where(obj, lo_o + (hi_o - lo_o) * noise, lo_b + (hi_b - lo_b) * noise)
        image = np.round(image).astype(np.int16)
    else:
        noise[obj] += INTENSITY_SHIFT
        image = np.clip(noise, 0.0, 1.0, out=noise).astype(np.float32)
    corner_ijk = corner[::-1]
    box = tuple(corner_ijk) + tuple(c + edge for c in corner_ijk)
    # transposed views (Fortran-ordered), which nibabel writes without a copy
    return ToyCase(image.T, obj.astype(np.uint8).T, cls, box, spacing)


def _save_nifti(array: np.ndarray, spacing: tuple[float, ...], path: Path) -> None:
    """Write with affine diag(spacing); 2D arrays are stored as (X, Y, 1) volumes."""
    if array.ndim == 2:
        array = array[..., None]
        spacing = (*spacing, 1.0)
    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _write_case(job: tuple[Path, Path, int, ToySpec, bool]) -> int:
    image_dir, label_dir, idx, spec, boxes = job
    case = make_case(idx, spec)
    _save_nifti(case.image, case.spacing, image_dir / f"case_{idx}_0000.nii.gz")
    if boxes:  # the object's box instead of its mask (planner.box_labels; inclusive voxel indices)
        save_json(boxes_json(np.asarray([case.box]), [case.cls]), label_dir / f"case_{idx}.json")
        return idx
    _save_nifti(case.mask, case.spacing, label_dir / f"case_{idx}.nii.gz")
    save_json({"instances": {"1": case.cls}}, label_dir / f"case_{idx}.json")
    return idx


def case_counts(full: bool, num_train: int | None, num_test: int | None) -> tuple[int, int]:
    """(train, test) counts: 10 + 10 by default, 1000 + 1000 with ``full``; explicit numbers win."""
    base_tr, base_ts = (FULL_NUM_TRAIN, FULL_NUM_TEST) if full else (DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST)
    n_tr = base_tr if num_train is None else int(num_train)
    n_ts = base_ts if num_test is None else int(num_test)
    if n_tr < 1 or n_ts < 0:
        raise ValueError(f"need at least 1 training case and >= 0 test cases, got {n_tr} / {n_ts}")
    return n_tr, n_ts


def generate_example(
    det_data: Path,
    *,
    preset: str = DEFAULT_PRESET,
    full: bool = False,
    num_train: int | None = None,
    num_test: int | None = None,
    size: int | None = None,
    dim: int = 3,
    spacing: tuple[float, ...] | None = None,
    modality: str = "MRI",
    task_name: str | None = None,
    num_processes: int = 0,
    overwrite: bool = False,
    seed_offset: int = 0,
    spacing_jitter: float = 0.0,
    boxes: bool = False,
) -> Path:
    """Write the toy task under ``det_data`` and return its folder.

    Args:
        det_data: root folder of tasks (``$det_data``).
        preset: ``"default"`` (nnDetection's sizes; ``"nndet"`` is an alias) or ``"cpu"`` (small, fast
            cases for a few CPU cores; see module docstring).
        full: 1000 + 1000 cases instead of 10 + 10.
        num_train: number of training cases (ids 0..num_train-1); overrides ``full``.
        num_test: number of test cases (ids continue after the training ids); overrides ``full``.
        size: volume edge in voxels (overrides the preset; objects scale with it).
        dim: 3 or 2.
        spacing: voxel size per (i, j, k) axis in mm (default 1 mm isotropic).
        modality: ``"MRI"`` (intensities in [0, 1]) or ``"CT"`` (HU-like int16, CT normalisation).
        task_name: folder/task name (default ``Task000D3_Example`` / ``Task001D2_Example``).
        num_processes: worker processes (0: in this process).
        overwrite: replace an existing task folder (everything in it, preprocessed data included).
        seed_offset: added to every case's seed (0 reproduces the default cases).
        spacing_jitter: relative per-case spacing jitter (e.g. 0.1 -> +-10 %), drawn from the case seed.
        boxes: write each case's object as a box (``labels{Tr,Ts}/<case>.json`` with ``"boxes"``, no label
            NIfTI) and ``"annotation": "boxes"`` in dataset.json (``planner.box_labels``); the images are
            the same as without.

    Returns:
        The task folder ``det_data/<task_name>``.

    Raises:
        FileExistsError: the task folder exists and ``overwrite`` is False.
        ValueError: bad options.
    """
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    spec = resolve_spec(preset, dim, size, spacing, modality, seed_offset, spacing_jitter)
    n_tr, n_ts = case_counts(full, num_train, num_test)
    task_name = task_name or TASK_NAMES[dim]
    if not _TASK_NAME_RE.match(task_name):
        raise ValueError(f"task_name {task_name!r} must look like Task123_Name (letters, digits, '_', '-'; no '.')")
    det_data = Path(det_data)
    target = det_data / task_name
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True (nndet_example --overwrite) to replace it "
            "(this deletes the folder, preprocessed data included)"
        )
    det_data.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(prefix=f".{task_name}.tmp-", dir=det_data)
    try:
        _write_task(tmp, task_name, spec, n_tr, n_ts, num_processes, boxes)
        _replace_dir(tmp, target, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("toy task %s: %d train + %d test cases, %d^%d voxels", target, n_tr, n_ts, spec.size, dim)
    return target


def _write_task(root: Path, task_name: str, spec: ToySpec, n_tr: int, n_ts: int, num_processes: int,
                boxes: bool = False) -> None:
    meta = {
        "task": task_name,
        "name": task_name.split("_", 1)[1] if "_" in task_name else task_name,
        "target_class": None,
        "test_labels": True,
        "labels": dict(LABELS),
        "modalities": {"0": spec.modality},
        "dim": spec.dim,
    }
    if boxes:
        meta["annotation"] = "boxes"
    save_json(meta, root / "dataset.json")
    raw = root / "raw_splitted"
    dirs = {k: raw / k for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    jobs = [(dirs["imagesTr"], dirs["labelsTr"], i, spec, boxes) for i in range(n_tr)]
    jobs += [(dirs["imagesTs"], dirs["labelsTs"], i, spec, boxes) for i in range(n_tr, n_tr + n_ts)]
    bar = dict(total=len(jobs), desc=f"nndet_example {task_name}", unit="case", disable=None)
    if num_processes > 0:
        with paths.worker_pool(min(num_processes, len(jobs))) as pool:
            for _ in tqdm(pool.imap_unordered(_write_case, jobs), **bar):
                pass
    else:
        for job in tqdm(jobs, **bar):
            _write_case(job)


def _replace_dir(src: Path, target: Path, overwrite: bool) -> None:
    """Rename ``src`` onto ``target``; an existing target (only with ``overwrite``) is removed after."""
    if not target.exists():
        os.rename(src, target)
        return
    if not overwrite:
        raise FileExistsError(f"{target} appeared while generating; pass overwrite=True to replace it")
    trash = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, trash)
    os.rename(src, target)
    shutil.rmtree(trash, ignore_errors=True)
