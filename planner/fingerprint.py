"""Dataset fingerprint (SPEC section 3): what the planner needs to know about a task, as JSON.

Measured on the cropped (nonzero) data of the training cases. Axis order is the raw voxel order
(nibabel i, j, k); boxes are MONAI StandardMode in voxel coordinates of the *cropped* case,
half-open (a box covering voxels i..j along an axis is [i, j + 1)); see ``ops`` for the convention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from planner.io import load_json, save_json

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


def compute_fingerprint(task_root: Path, num_processes: int = 0) -> Fingerprint:
    """Measure the fingerprint of a task's training cases (parallel over cases, progress bar)."""
    raise NotImplementedError("planner.fingerprint.compute_fingerprint is being written")
