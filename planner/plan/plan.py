"""The typed plan: frozen dataclasses with JSON round trip and a schema version.

Axis conventions: every per-axis list in "transposed" form (``*_transposed``, ``patch_size``,
``conv_kernels``, ``strides``, anchors) is in the axis order of the preprocessed arrays, i.e. the
raw voxel axes (i, j, k) reordered by ``transpose_forward`` (the coarsest-spacing axis first, as
nnDetection does). ``target_spacing`` is in raw axis order.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.io import load_json, save_json

PLAN_SCHEMA_VERSION = 1
# The planner's rules: bump whenever a rule changes the plans it makes for the same fingerprint, so a reused plan
# made by older rules is reported as stale (planner.prep). 2: patch shrinking on ties as nnDetection (last axis).
# 3: exact CT/CT2 names, nnDetection's "CT" substring rule for the normalisation mask.
PLANNER_VERSION = "3"


@dataclass(frozen=True)
class ArchitecturePlan:
    """Retina U-Net topology as planned (defaults: 3D values of nnDetection's ``BoxC002`` architecture planner).

    ``conv_kernels[s]`` and ``strides[s]`` are per encoder stage s (stage 0 has stride 1 on every
    axis); ``decoder_levels`` are the stage indices whose FPN maps feed the detection heads.
    """

    arch_name: str
    dim: int
    in_channels: int
    num_classes: int  # foreground classes (classifier outputs per anchor)
    conv_kernels: list[list[int]]
    strides: list[list[int]]
    decoder_levels: list[int]
    start_channels: int = 32
    max_channels: int = 320
    fpn_channels: int = 128
    head_channels: int = 128
    seg_classes: int = 2  # fg/bg segmentation head
    class_weight: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class AnchorPlan:
    """Anchors per decoder level.

    ``sizes[l][a]`` is the list of anchor extents (voxels of the preprocessed *input image*, transposed
    axes) along axis a at decoder level l (l indexes ``architecture.decoder_levels``);
    ``sizes[l][a] = base_sizes[a] * cumstride(level l)[a] / cumstride(first decoder level)[a]``.
    Anchor shapes = every combination of the per-axis sizes (3**dim per location, first axis varying
    slowest; ``planner.plan.anchors.anchor_shapes_per_level``), centred on each level's grid. MONAI's
    ``AnchorGeneratorWithAnchorShape`` scales by a scalar per level and rounds half-extents: the
    detector builds its per-level cell anchors from these shapes instead.
    ``base_sizes`` are the optimised sizes at the first decoder level before stride scaling.
    """

    base_sizes: list[list[float]]
    sizes: list[list[list[float]]]
    mean_best_iou: float
    num_anchors_per_location: int


@dataclass(frozen=True)
class Plan:
    """One plan (e.g. ``D3V001_3d``): everything preprocessing, training and inference need."""

    planner_id: str  # "D3V001" or "D2V001"
    mode: str  # "3d", "3dlr1", "2d"
    task: str
    dim: int
    modalities: dict[str, str]
    labels: dict[str, str]
    target_spacing: list[float]  # raw axis order (i, j, k)
    transpose_forward: list[int]
    transpose_backward: list[int]
    normalization_schemes: list[str]  # per modality: "CT", "CT2" or "nonCT"
    use_mask_for_norm: list[bool]
    intensity_properties: list[dict[str, float]]  # per modality: mean, std, percentile_00_5, percentile_99_5, ...
    patch_size: list[int]  # transposed order
    batch_size: int
    median_shape_transposed: list[float]
    do_dummy_2D_data_aug: bool
    trigger_lr: bool
    architecture: ArchitecturePlan
    anchors: AnchorPlan
    memory_estimate_bytes: int
    memory_budget_bytes: int
    anisotropy_threshold: float = 3.0
    schema_version: int = PLAN_SCHEMA_VERSION
    notes: list[str] = field(default_factory=list)
    planner_version: str = ""  # PLANNER_VERSION of the rules that made it ("" = before versions were recorded)
    inputs_hash: str = ""  # of the fingerprint, preset and memory budget it was planned from (planner.prep)

    @property
    def plan_id(self) -> str:
        """``<planner>_<mode>``, also the preprocessed data identifier (e.g. ``D3V001_3d``)."""
        return f"{self.planner_id}_{self.mode}"

    @property
    def data_identifier(self) -> str:
        return self.plan_id

    @property
    def target_spacing_transposed(self) -> list[float]:
        return [self.target_spacing[a] for a in self.transpose_forward]

    @property
    def model_name(self) -> str:
        """Model folder name under det_models/<task>/ (nnDetection: RetinaUNetV001_D3V001_3d)."""
        return f"{self.architecture.arch_name}_{self.plan_id}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["plan_id"] = self.plan_id
        d["target_spacing_transposed"] = self.target_spacing_transposed
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        version = d.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            raise ValueError(
                f"plan schema version {version} is not supported (expected {PLAN_SCHEMA_VERSION}); "
                "re-run `nndet_prep` with -o to re-plan"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["architecture"] = ArchitecturePlan(**d["architecture"])
        kw["anchors"] = AnchorPlan(**d["anchors"])
        return cls(**kw)

    def to_json(self, path: str | Path) -> Path:
        return save_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, path: str | Path) -> Plan:
        try:
            return cls.from_dict(load_json(path))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid plan ({e}); re-run `nndet_prep` with -o") from e

    def summary(self) -> str:
        a = self.architecture
        lines = [
            f"plan {self.plan_id} (task {self.task}, {self.dim}D)",
            f"  target spacing   {self.target_spacing} (transposed {self.target_spacing_transposed})",
            f"  transpose        {self.transpose_forward}",
            f"  normalisation    {self.normalization_schemes} mask={self.use_mask_for_norm}",
            f"  patch size       {self.patch_size}  batch {self.batch_size}",
            f"  median shape     {[round(x, 1) for x in self.median_shape_transposed]}",
            f"  stages           {len(a.strides)}  strides {a.strides}",
            f"  decoder levels   {a.decoder_levels}",
            f"  anchors/location {self.anchors.num_anchors_per_location}  base {self.anchors.base_sizes}",
            f"  mean best IoU    {self.anchors.mean_best_iou:.3f}",
            f"  memory estimate  {self.memory_estimate_bytes / 2**30:.2f} GiB of {self.memory_budget_bytes / 2**30:.2f} GiB",
            f"  low-res plan     {'yes' if self.trigger_lr else 'no'}",
        ]
        return "\n".join(lines)


def dumps(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2)
