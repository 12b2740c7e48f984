"""Dataset fingerprint: what the planner needs to know about a task, as JSON.

Our counterpart of the properties nnDetection's dataset analysis (``nndet/planning/analyzer.py``) pickles:
shapes and spacings, crop size reductions, foreground intensity statistics per modality, and per-instance
boxes, classes and volumes.

Measured on the cropped (nonzero) data of the training cases. Axis order is the raw voxel order
(nibabel i, j, k); boxes are MONAI StandardMode in voxel coordinates of the *cropped* case,
half-open (a box covering voxels i..j along an axis is [i, j + 1)); see ``ops`` for the convention.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from planner import paths
from planner.crop import bbox_of_mask, crop_to_bbox
from planner.dataset import CaseFiles, DatasetError, list_cases, load_dataset_info
from planner.io import load_json, save_json
from planner.nifti import CaseData, label_to_int, load_instances_json, spacing_from_affine

logger = logging.getLogger(__name__)

FINGERPRINT_SCHEMA_VERSION = 1
INTENSITY_SUBSAMPLE = 10  # every 10th foreground voxel enters the pooled statistics (as nnDetection)


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensity statistics of one modality (pooled over the dataset or of one case)."""

    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float
    num_voxels: int = 0


@dataclass(frozen=True)
class CaseFingerprint:
    """One training case after cropping to the nonzero region.

    Attributes:
        shape: raw shape before cropping (spatial only).
        spacing: voxel size per raw axis (mm).
        crop_bbox: half-open [[lo, hi), ...] per raw axis of the nonzero crop.
        shape_after_crop: spatial shape after cropping.
        size_reduction: prod(shape_after_crop) / prod(shape).
        boxes: [N, 2*dim] StandardMode boxes (cropped voxel coordinates, half-open) per instance.
        box_classes: class index per box (same order as ``instance_ids``).
        instance_ids: instance id in the label map per box.
        volume_per_class: class index (str) -> foreground volume in mm^3.
        intensity: per-modality foreground statistics of this case (empty if no foreground).
    """

    case_id: str
    shape: list[int]
    spacing: list[float]
    crop_bbox: list[list[int]]
    shape_after_crop: list[int]
    size_reduction: float
    boxes: list[list[float]]
    box_classes: list[int]
    instance_ids: list[int]
    volume_per_class: dict[str, float] = field(default_factory=dict)
    intensity: list[IntensityStats] = field(default_factory=list)

    @property
    def num_instances(self) -> int:
        return len(self.box_classes)


@dataclass(frozen=True)
class Fingerprint:
    """The whole task's fingerprint; ``cases`` holds the per-case facts, the rest is pooled."""

    task: str
    dim: int
    modalities: dict[str, str]
    labels: dict[str, str]
    cases: list[CaseFingerprint]
    intensity: list[IntensityStats]  # per modality, pooled foreground (subsampled) over all cases
    num_instances: dict[str, int]  # class index (str) -> total instances
    schema_version: int = FINGERPRINT_SCHEMA_VERSION

    # ----------------------------------------------------------------------- derived views
    @property
    def spacings(self) -> np.ndarray:
        """[num_cases, dim] original spacings (raw axis order)."""
        return np.asarray([c.spacing for c in self.cases], dtype=np.float64).reshape(-1, self.dim)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        """[num_cases, dim] spatial shapes after cropping (raw axis order)."""
        return np.asarray([c.shape_after_crop for c in self.cases], dtype=np.float64).reshape(-1, self.dim)

    @property
    def size_reductions(self) -> np.ndarray:
        return np.asarray([c.size_reduction for c in self.cases], dtype=np.float64)

    def box_sizes_mm(self) -> np.ndarray:
        """[num_boxes, dim] box extents in mm over all cases (raw axis order)."""
        out = [
            (np.asarray(c.boxes, dtype=np.float64)[:, self.dim:] - np.asarray(c.boxes, dtype=np.float64)[:, : self.dim])
            * np.asarray(c.spacing)
            for c in self.cases
            if c.boxes
        ]
        return np.concatenate(out, 0) if out else np.zeros((0, self.dim))

    def box_classes(self) -> np.ndarray:
        return np.asarray([k for c in self.cases for k in c.box_classes], dtype=np.int64)

    # ------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        if d.get("schema_version") != FINGERPRINT_SCHEMA_VERSION:
            raise ValueError(
                f"fingerprint schema version {d.get('schema_version')} is not supported "
                f"(expected {FINGERPRINT_SCHEMA_VERSION}); re-run `nndet_prep` with --overwrite"
            )
        cases = [
            CaseFingerprint(**{**c, "intensity": [IntensityStats(**s) for s in c.get("intensity", [])]})
            for c in d["cases"]
        ]
        return cls(
            task=d["task"],
            dim=int(d["dim"]),
            modalities=dict(d["modalities"]),
            labels=dict(d["labels"]),
            cases=cases,
            intensity=[IntensityStats(**s) for s in d["intensity"]],
            num_instances={str(k): int(v) for k, v in d["num_instances"].items()},
        )

    def to_json(self, path: str | Path) -> Path:
        return save_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, path: str | Path) -> Fingerprint:
        try:
            return cls.from_dict(load_json(path))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid fingerprint ({e}); re-run `nndet_prep` with --overwrite") from e


# ---------------------------------------------------------------------------------- measurement
def intensity_stats(values: np.ndarray) -> IntensityStats:
    """Statistics of a 1D array of intensities (float64 arithmetic); all zeros when it is empty."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return IntensityStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    p005, median, p995 = np.percentile(v, [0.5, 50.0, 99.5])
    return IntensityStats(
        mean=float(v.mean()),
        std=float(v.std()),
        median=float(median),
        min=float(v.min()),
        max=float(v.max()),
        percentile_00_5=float(p005),
        percentile_99_5=float(p995),
        num_voxels=int(v.size),
    )


def foreground_region(fg: np.ndarray) -> tuple[slice, ...] | None:
    """Tight region (one slice per axis) around every True voxel of ``fg``; None when there is none."""
    if not fg.any():
        return None
    return tuple(slice(lo, hi) for lo, hi in bbox_of_mask(fg))


def _boxes_in_region(seg: np.ndarray, region: tuple[slice, ...]) -> tuple[list[int], list[list[int]]]:
    # find_objects over the foreground region only: one pass over few voxels, not one mask per id
    offset = [r.start for r in region]
    ids, boxes = [], []
    for index, slices in enumerate(ndimage.find_objects(seg[region])):
        if slices is None:
            continue
        ids.append(index + 1)
        boxes.append([s.start + o for s, o in zip(slices, offset, strict=True)]
                     + [s.stop + o for s, o in zip(slices, offset, strict=True)])
    return ids, boxes


def instance_boxes(seg: np.ndarray, fg: np.ndarray | None = None) -> tuple[list[int], list[list[int]]]:
    """Tight box of every instance of an instance map.

    Args:
        seg: int [*spatial] instance map (0 background, values < 0 ignored, e.g. -1 outside the body).
        fg: optional precomputed ``seg > 0`` (saves a pass).

    Returns:
        (instance ids ascending, boxes) with boxes in MONAI StandardMode (x1, y1, z1, x2, y2, z2; 2D
        x1, y1, x2, y2), voxel coordinates of ``seg``, half-open.
    """
    region = foreground_region(seg > 0 if fg is None else fg)
    return ([], []) if region is None else _boxes_in_region(seg, region)


def load_checked_case(files: CaseFiles, dim: int) -> CaseData:
    """Load a training case and run the checks of loaded files on it (NaN/inf, empty images, grids of the
    modalities and the label, integer non-negative labels matching the json): the default ``nndet_prep``
    sees every case here, so these problems stop it before anything is written, not only with
    ``--full_check``.

    Raises:
        DatasetError: every problem of the case (file and fix).
    """
    from planner.checks import check_loaded, load_case_files

    problems: list = []
    images, label = load_case_files(files, dim, True, problems)
    problems += check_loaded(files, images, label, dim)
    if problems:
        raise DatasetError(problems)
    data = np.stack([np.asarray(a, dtype=np.float32) for _, a, _ in images], 0)
    affine = images[0][2]
    seg = label_to_int(label[1], label[0]) if label is not None else None
    instances = load_instances_json(files.instances_json) if seg is not None and files.instances_json else {}
    if files.boxes and files.instances_json is not None and files.instances_json.is_file():
        from planner.box_labels import box_instance_map

        seg, instances, _ = box_instance_map(files.instances_json, data.shape[1:], affine)
    return CaseData(files.case_id, data, seg, affine, spacing_from_affine(affine, dim), instances)


def fingerprint_case(files: CaseFiles, dim: int) -> tuple[CaseFingerprint, list[np.ndarray]]:
    """Load, crop and measure one training case.

    Returns:
        (case fingerprint, per-modality float32 [n] subsample of the foreground intensities: every
        ``INTENSITY_SUBSAMPLE``-th foreground voxel in C order of the cropped case).

    Raises:
        DatasetError: the label map is missing or holds an instance the case json does not list.
    """
    case = load_checked_case(files, dim)
    if case.seg is None:
        what = "box json" if files.boxes else "label map"
        raise DatasetError([(str(files.label_source), f"training case has no {what}; add it (or move the case to "
                             "imagesTs)")])
    shape = [int(s) for s in case.data.shape[1:]]
    # the bbox of planner.crop.crop_case without its hole filling: filling only adds voxels enclosed by
    # the mask, so the bbox is the same, and the -1 "outside" marks it writes are not needed here (fg = seg > 0)
    mask = case.data[0] != 0
    for m in range(1, case.data.shape[0]):
        mask |= case.data[m] != 0
    crop_bbox = bbox_of_mask(mask)
    data, seg = crop_to_bbox(case.data, crop_bbox), crop_to_bbox(case.seg, crop_bbox)
    shape_after_crop = [int(s) for s in data.shape[1:]]

    # everything below works on the foreground region only (boolean indexing of a whole volume is slow);
    # C order inside a box that holds every foreground voxel equals C order in the whole crop
    fg = seg > 0
    region = foreground_region(fg)
    ids, boxes = ([], []) if region is None else _boxes_in_region(seg, region)
    unknown = [i for i in ids if i not in case.instances]
    if unknown:
        raise DatasetError(
            [(str(files.instances_json), f"instances {unknown} are in the label map {files.label.name} but not in "
              "this json; add them with their class or remove them from the mask (nndet_prep --full_check lists all)")]
        )
    box_classes = [int(case.instances[i]) for i in ids]

    intensity, subsamples = [], []
    volume_per_class: dict[str, float] = {}
    if region is not None:
        fg_r = fg[region]
        counts = np.bincount(seg[region][fg_r], minlength=max(ids) + 1)
        voxel_volume = float(np.prod(case.spacing))
        for i, k in zip(ids, box_classes, strict=True):
            volume_per_class[str(k)] = volume_per_class.get(str(k), 0.0) + float(counts[i]) * voxel_volume
    for m in range(data.shape[0]):
        values = data[m][region][fg_r] if region is not None else np.zeros(0, np.float32)
        if values.size:
            intensity.append(intensity_stats(values))
        subsamples.append(np.ascontiguousarray(values[::INTENSITY_SUBSAMPLE], dtype=np.float32))

    fp = CaseFingerprint(
        case_id=files.case_id,
        shape=shape,
        spacing=[float(s) for s in case.spacing],
        crop_bbox=[[int(lo), int(hi)] for lo, hi in crop_bbox],
        shape_after_crop=shape_after_crop,
        size_reduction=float(np.prod(shape_after_crop, dtype=np.float64) / np.prod(shape, dtype=np.float64)),
        boxes=boxes,
        box_classes=box_classes,
        instance_ids=ids,
        volume_per_class=volume_per_class,
        intensity=intensity,
    )
    return fp, subsamples


def _case_worker(job: tuple[CaseFiles, int]) -> tuple[str, Any, list[np.ndarray]]:
    """Top-level (spawn-safe) worker: ("ok", CaseFingerprint, subsamples) or ("error", problems, [])."""
    files, dim = job
    try:
        fp, sub = fingerprint_case(files, dim)
    except DatasetError as e:  # its problems survive the trip back; the exception itself would not unpickle
        return "error", e.problems, []
    return "ok", fp, sub


def compute_fingerprint(task_root: Path, num_processes: int = 0) -> Fingerprint:
    """Measure the fingerprint of a task's training cases (``raw_splitted/imagesTr``).

    Each case is loaded, cropped to its nonzero region and measured in a worker that returns only the
    small per-case facts and the foreground intensity subsample; pooled per-modality statistics come
    from the concatenated subsamples (``num_voxels`` = subsample size).

    Args:
        task_root: task folder (holds dataset.json and raw_splitted/).
        num_processes: worker processes (``spawn``); 0 runs in this process.

    Raises:
        DatasetError: every case problem found (file and fix), after all cases were visited.
    """
    task_root = Path(task_root)
    info = load_dataset_info(task_root)
    cases = list_cases(task_root / "raw_splitted", info.num_modalities, "Tr", info.annotation)
    if not cases:
        raise DatasetError([(str(task_root / "raw_splitted" / "imagesTr"), "no training cases found; add <case>_0000.nii.gz files")])
    jobs = [(c, info.dim) for c in cases]
    bar = {"total": len(jobs), "desc": "fingerprint", "unit": "case", "disable": None}
    results: list[tuple[str, Any, list[np.ndarray]]] = []
    if num_processes > 0:
        with paths.worker_pool(min(num_processes, len(jobs))) as pool:
            results = list(tqdm(pool.imap(_case_worker, jobs, chunksize=1), **bar))
    else:
        results = [_case_worker(j) for j in tqdm(jobs, **bar)]

    problems = [p for status, payload, _ in results if status == "error" for p in payload]
    if problems:
        raise DatasetError(problems)
    case_fps: list[CaseFingerprint] = [payload for _, payload, _ in results]
    pooled = [
        intensity_stats(np.concatenate([sub[m] for _, _, sub in results])) for m in range(info.num_modalities)
    ]
    if pooled and pooled[0].num_voxels == 0:
        logger.warning("%s: no foreground voxels in any training case; intensity statistics are zeros", task_root)
    num_instances = {str(k): 0 for k in range(info.num_classes)}
    for c in case_fps:
        for k in c.box_classes:
            num_instances[str(k)] = num_instances.get(str(k), 0) + 1
    labels_dir = task_root / "raw_splitted" / "labelsTr"
    if not any(c.box_classes for c in case_fps):
        # a detector cannot be planned (anchors, object sizes) nor trained without a single object
        raise DatasetError([(str(labels_dir), f"no object in any of the {len(case_fps)} training case(s): every "
                             "label map is empty; check that the masks were exported (instance ids 1..N, not "
                             "all 0) and that the cases in imagesTr are the annotated ones")])
    if len(case_fps) < 2:
        logger.warning("%s: only %d training case: cross-validation needs at least 2 (one to train on, one to "
                       "validate; nnDetection's 5 folds need 5); add annotated cases to imagesTr/labelsTr before "
                       "nndet_train", labels_dir, len(case_fps))
    logger.info(
        "fingerprint of %s: %d cases, instances per class %s", info.task, len(case_fps), num_instances
    )
    return Fingerprint(
        task=info.task,
        dim=info.dim,
        modalities=dict(info.modalities),
        labels=dict(info.labels),
        cases=case_fps,
        intensity=pooled,
        num_instances=num_instances,
    )
