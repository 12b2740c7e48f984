"""Box annotations: ``labelsTr/<case>.json`` with ``"boxes"`` instead of an instance map.

A task whose ``dataset.json`` says ``"annotation": "boxes"`` needs no ``labelsTr/<case>.nii.gz``: each
case's json lists its objects as boxes, in voxel indices of the image or in world millimetres::

    {"frame": "voxel",
     "boxes": [{"class": 0, "box": [10, 12, 4, 25, 27, 19]},
               {"class": 1, "box": [40, 41, 30, 47, 50, 33]}]}

* ``"frame": "voxel"`` (the default): ``box`` is ``[i1, j1, k1, i2, j2, k2]`` (2D: ``[i1, j1, i2, j2]``),
  the first and the last voxel of the object along each axis, both **inclusive**, in the voxel order of
  the NIfTI file (nibabel's array order; the index ITK-SNAP and 3D Slicer show and SimpleITK's
  ``TransformPhysicalPointToIndex`` returns; an array from ``sitk.GetArrayFromImage`` is reversed,
  ``[k, j, i]``). The box above covers ``image[10:26, 12:28, 4:20]``.
* ``"frame": "RAS"`` or ``"LPS"``: ``box`` is ``[x1, y1, z1, x2, y2, z2]``, the low and the high corner of
  an axis-aligned box in world millimetres (RAS: NIfTI's frame; LPS: DICOM's and ITK's). The object is
  every voxel whose centre lies inside it (a corner on a voxel edge or on a voxel centre gives the same
  voxels); in an oblique image that is the voxel box around the world box. 2D tasks give ``[x1, y1, x2,
  y2]`` in the plane of the slice.

Inside the pipeline a box becomes what an instance map would have been (nnDetection 2's approach to
box labels): instance ``n`` (1-based, in file order) fills its box, larger boxes are painted first so
that a smaller box inside a larger one keeps all of its voxels. The fingerprint, the planner, the
preprocessing and training then run unchanged; training may switch the segmentation loss off
(``seg_loss`` in ``configs/train.json``), since a filled box is a coarse mask.

We wrote this ourselves: neither MONAI nor nnDetection 0.1 reads box annotations from disk.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from planner.dataset import DatasetError

logger = logging.getLogger(__name__)

FRAMES = ("voxel", "RAS", "LPS")
WORLD_TOL = 1e-3  # voxels: world corners this close to a voxel edge or centre count as on it (float rounding)

Problem = tuple[str, str]

EXAMPLE = '{"frame": "voxel", "boxes": [{"class": 0, "box": [i1, j1, k1, i2, j2, k2]}]}'


@dataclass(frozen=True)
class BoxLabels:
    """The boxes of one case in voxels of its image.

    Attributes:
        boxes: int64 [N, 2*dim] MONAI StandardMode, half-open (``[i1, j1, k1, i2 + 1, j2 + 1, k2 + 1]`` of
            the file's inclusive indices).
        classes: class index per box.
    """

    boxes: np.ndarray
    classes: list[int]

    @property
    def instances(self) -> dict[int, int]:
        """Instance id (1-based, file order) -> class, as an instance json would give."""
        return {i + 1: c for i, c in enumerate(self.classes)}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_box_json(path: Path) -> tuple[dict | None, list[Problem]]:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, [(str(path), f"box annotation is missing; write {EXAMPLE} (or {{\"boxes\": []}} for none)")]
    except json.JSONDecodeError as e:
        return None, [(str(path), f"not valid JSON ({e}); fix the syntax")]
    if not isinstance(raw, dict) or not isinstance(raw.get("boxes"), list):
        return None, [(str(path), f"dataset.json says \"annotation\": \"boxes\", so this file must hold a list "
                       f"\"boxes\", e.g. {EXAMPLE}")]
    return raw, []


def check_structure(raw: dict, path: Path, dim: int, classes: list[int] | None) -> list[Problem]:
    """Problems found without the image: frame, entries, lengths, numbers, classes, inverted boxes."""
    problems: list[Problem] = []
    frame = raw.get("frame", "voxel")
    if frame not in FRAMES:
        return [(str(path), f"\"frame\" {frame!r} is unknown; use one of {list(FRAMES)} (voxel indices or world mm)")]
    for n, entry in enumerate(raw["boxes"]):
        where = f"box {n}"
        if not isinstance(entry, dict) or "box" not in entry or "class" not in entry:
            problems.append((str(path), f"{where} ({entry!r}) must be {{\"class\": <index>, \"box\": [...]}}"))
            continue
        cls, box = entry["class"], entry["box"]
        if not isinstance(cls, int) or isinstance(cls, bool):
            problems.append((str(path), f"{where}: class must be an integer class index, got {cls!r}"))
        elif classes is not None and cls not in classes:
            problems.append((str(path), f"{where}: class {cls} is not defined in dataset.json labels; use one of "
                             f"{classes} or add it there"))
        if not isinstance(box, list) or len(box) != 2 * dim or not all(_number(v) for v in box):
            problems.append((str(path), f"{where}: box {box!r} must be {2 * dim} numbers (low corner then high "
                             f"corner, {'i j k' if dim == 3 else 'i j'} order)"))
            continue
        if frame == "voxel" and not all(float(v).is_integer() for v in box):
            problems.append((str(path), f"{where}: voxel box {box} must be whole voxel indices (inclusive first "
                             "and last voxel); for millimetres set \"frame\": \"RAS\" or \"LPS\""))
            continue
        lo, hi = np.asarray(box[:dim], float), np.asarray(box[dim:], float)
        if (hi < lo).any():
            axes = [a for a in range(dim) if hi[a] < lo[a]]
            problems.append((str(path), f"{where}: box {box} is inverted along axis {axes} (high corner below the "
                             "low one); swap the corners"))
        elif frame != "voxel" and (hi == lo).any():
            problems.append((str(path), f"{where}: box {box} has zero size in mm along axis "
                             f"{[a for a in range(dim) if hi[a] == lo[a]]}; give its real extent"))
    return problems


def _world_to_voxel(box: list[float], frame: str, affine: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous voxel box (lo, hi) around an axis-aligned world box (all corners mapped)."""
    affine = np.asarray(affine, np.float64)
    lo, hi = np.asarray(box[:dim], float), np.asarray(box[dim:], float)
    if dim == 2:  # the slice's plane: z of voxel (0, 0, 0)
        z0 = affine[2, 3]  # the same in RAS and LPS (they differ in x and y)
        lo, hi = np.append(lo, z0), np.append(hi, z0)
    corners = np.array([[hi[a] if (c >> a) & 1 else lo[a] for a in range(3)] for c in range(8)])
    if frame == "LPS":
        corners[:, :2] *= -1
    vox = (np.linalg.inv(affine) @ np.c_[corners, np.ones(8)].T)[:dim].T
    return vox.min(0), vox.max(0)


def to_voxel_boxes(raw: dict, path: Path, shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, list[Problem]]:
    """Half-open int voxel boxes [N, 2*dim] of a structurally valid json; problems for boxes outside the image
    or holding no voxel."""
    dim = len(shape)
    frame = raw.get("frame", "voxel")
    out, problems = [], []
    size = np.asarray(shape, float)
    for n, entry in enumerate(raw["boxes"]):
        box = entry["box"]
        if frame == "voxel":
            first, last = np.asarray(box[:dim], float), np.asarray(box[dim:], float)
            outside = (first < 0).any() or (last > size - 1).any()
            limit = f"indices 0..{[s - 1 for s in shape]}"
        else:
            lo, hi = _world_to_voxel(box, frame, affine, dim)
            outside = (lo < -0.5 - WORLD_TOL).any() or (hi > size - 0.5 + WORLD_TOL).any()
            first, last = np.ceil(lo - WORLD_TOL), np.floor(hi + WORLD_TOL)
            limit = f"voxels {np.round(lo, 2).tolist()}..{np.round(hi, 2).tolist()} of an image of {list(shape)}"
        if outside:
            problems.append((str(path), f"box {n} ({box}, frame {frame}) reaches outside the image ({limit}); "
                             "clip it to the image or check the frame" + ("" if frame == "voxel" else
                                                                         " (RAS vs LPS) and the image")))
            continue
        if (last < first).any():
            problems.append((str(path), f"box {n} ({box}, frame {frame}) holds no voxel centre: it is thinner than "
                             "a voxel; give its real extent"))
            continue
        out.append(np.r_[first, last + 1].astype(np.int64))
    return np.asarray(out, np.int64).reshape(-1, 2 * dim), problems


def box_problems(path: Path, dim: int, classes: list[int] | None = None, shape: tuple[int, ...] | None = None,
                 affine: np.ndarray | None = None, geometry_only: bool = False) -> list[Problem]:
    """Every problem of a box json: structure (always), and geometry when the image ``shape``/``affine`` are given.

    ``geometry_only``: a json with structural problems gives none here (the quick check reports those), so a
    full check does not list them twice.
    """
    raw, problems = read_box_json(path)
    if raw is None:
        return [] if geometry_only else problems
    problems = check_structure(raw, path, dim, classes)
    if problems or shape is None:
        return [] if geometry_only else problems
    boxes, problems = to_voxel_boxes(raw, path, tuple(shape), affine)
    if not problems:
        problems = fill_problems(boxes, tuple(shape), path)
    return problems


def load_box_labels(path: Path, shape: tuple[int, ...], affine: np.ndarray,
                    classes: list[int] | None = None) -> BoxLabels:
    """Read and check a case's box json against its image grid.

    Raises:
        DatasetError: every bad box, naming the file and the fix.
    """
    dim = len(shape)
    raw, problems = read_box_json(path)
    if raw is not None:
        problems = check_structure(raw, path, dim, classes)
    if problems:
        raise DatasetError(problems)
    boxes, problems = to_voxel_boxes(raw, path, tuple(shape), affine)
    if problems:
        raise DatasetError(problems)
    return BoxLabels(boxes, [int(e["class"]) for e in raw["boxes"]])


def _paint_order(boxes: np.ndarray) -> np.ndarray:
    dim = boxes.shape[1] // 2
    volume = np.prod(boxes[:, dim:] - boxes[:, :dim], axis=1)
    return np.argsort(-volume, kind="stable")  # largest first, ties in file order


def fill_boxes(boxes: np.ndarray, shape: tuple[int, ...], dtype=np.int32) -> np.ndarray:
    """Instance map of ``shape``: box ``n`` (half-open voxels) filled with ``n + 1``, larger boxes first."""
    seg = np.zeros(shape, dtype)
    dim = len(shape)
    for n in _paint_order(boxes):
        seg[tuple(slice(int(a), int(b)) for a, b in zip(boxes[n, :dim], boxes[n, dim:], strict=True))] = n + 1
    return seg


def fill_problems(boxes: np.ndarray, shape: tuple[int, ...], path: Path) -> list[Problem]:
    """Boxes that would vanish from the filled map (covered by the boxes painted after them): an error.
    Boxes that keep voxels but lose part of their extent are logged as warnings."""
    if len(boxes) < 2:
        return []
    from scipy.ndimage import find_objects

    dim = len(shape)
    lo, hi = boxes[:, :dim].min(0), boxes[:, dim:].max(0)  # paint only the boxes' region
    local = boxes - np.r_[lo, lo]
    seg = fill_boxes(local, tuple(int(v) for v in hi - lo))
    found = find_objects(seg, max_label=len(boxes))
    problems = []
    for n, sl in enumerate(found):
        if sl is None:
            problems.append((str(path), f"box {n} is covered entirely by other boxes (a duplicate?): the filled "
                             "label would lose it; remove the duplicate"))
            continue
        got = [s.start for s in sl] + [s.stop for s in sl]
        if got != local[n].tolist():
            logger.warning("%s: box %d overlaps the boxes painted over it so much that its filled extent shrinks "
                           "from %s to %s (half-open voxels)", path, n, boxes[n].tolist(),
                           (np.asarray(got) + np.r_[lo, lo]).tolist())
    return problems


def box_instance_map(path: Path, shape: tuple[int, ...], affine: np.ndarray,
                     classes: list[int] | None = None) -> tuple[np.ndarray, dict[int, int], BoxLabels]:
    """(int32 instance map of the image grid, instance id -> class, the boxes) of a case's box json.

    Raises:
        DatasetError: bad boxes, or a box the others cover completely.
    """
    labels = load_box_labels(path, shape, affine, classes)
    problems = fill_problems(labels.boxes, tuple(shape), path)
    if problems:
        raise DatasetError(problems)
    return fill_boxes(labels.boxes, tuple(shape)), labels.instances, labels


def boxes_json(boxes: np.ndarray, classes: list[int], frame: str = "voxel") -> dict[str, Any]:
    """The json content for half-open voxel ``boxes`` (written with inclusive indices)."""
    dim = boxes.shape[1] // 2 if len(boxes) else 0
    if frame != "voxel":
        raise ValueError("only voxel boxes are written; world boxes are read")
    return {"frame": "voxel", "boxes": [{"class": int(c), "box": [int(v) for v in b[:dim]] +
                                         [int(v) - 1 for v in b[dim:]]}
                                        for b, c in zip(np.asarray(boxes), classes, strict=True)]}
