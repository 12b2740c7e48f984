"""The self-configuring planner: fingerprint -> plans (nnDetection's ``D3V001`` / ``BoxC002`` planning).

``plan_task`` applies the rules of :mod:`planner.plan.rules` in nnDetection's order: target spacing
and transpose, normalisation, then per plan the patch size / topology loop against the memory
budget (:mod:`planner.plan.topology`, :mod:`planner.plan.memory`), the anchors
(:mod:`planner.plan.anchors`) and the low-resolution trigger. A 3D task gets ``D3V001_3d`` and, if
objects are larger than its patch, ``D3V001_3dlr1``; a 2D task gets ``D2V001_2d``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from planner.dataset import DatasetInfo
from planner.fingerprint import Fingerprint
from planner.plan import rules
from planner.plan.anchors import anchors_per_location, plan_anchors
from planner.plan.memory import DEFAULT_BUDGET_BYTES, memory_breakdown
from planner.plan.plan import ArchitecturePlan, Plan
from planner.plan.topology import Topology, decoder_levels, plan_topology
from planner.presets import DEFAULT_PRESET, PRESET_NAMES

logger = logging.getLogger(__name__)

MAX_SHRINK_STEPS = 10_000  # safety bound of the patch-shrinking loop


@dataclass(frozen=True)
class ArchDefaults:
    """Architecture defaults of nnDetection's ``BoxC002`` per dimensionality."""

    batch_size: int
    start_channels: int
    max_channels: int
    min_feature_map_size: int
    num_decoder_levels: int
    min_decoder_level: int = 2
    max_patch_voxels: int | None = None  # compute cap of a preset (None: only the memory budget limits)

    @property
    def fpn_channels(self) -> int:
        return 4 * self.start_channels


DEFAULTS_3D = ArchDefaults(batch_size=4, start_channels=32, max_channels=320, min_feature_map_size=4,
                           num_decoder_levels=4)
# 2D: batch 16, 48 start channels, bottleneck >= 8, 5 decoder levels (nnDetection's BoxC002 2D defaults);
# 480 max channels as nnU-Net's 2D networks and nnDetection's BoxC001 for dim 2.
DEFAULTS_2D = ArchDefaults(batch_size=16, start_channels=48, max_channels=480, min_feature_map_size=8,
                           num_decoder_levels=5)


# Presets (as nnU-Net's ResEnc M/L/XL): each only changes widths and a compute cap, the rules stay the same.
# ``cpu`` is for training on a few CPU cores (README demo, CI, trying a task on a laptop): a quarter of the
# channels (~1/16 of the conv work per voxel) and patches of at most 32^3 (3D) / 128^2 (2D) voxels. On the
# toy task a training step then takes ~0.6 s on 2 cores instead of ~35 s with the default plan. Its plans
# get their own planner id (``D3V001CPU_3d``) so they never mix with nnDetection's. The names are
# ``planner.presets.PRESET_NAMES`` (shared with the toy generator); tests keep these keys equal to it.
PRESETS: dict[str, dict[int, ArchDefaults]] = {
    "default": {3: DEFAULTS_3D, 2: DEFAULTS_2D},
    "cpu": {
        3: dataclasses.replace(DEFAULTS_3D, start_channels=8, max_channels=80, max_patch_voxels=32**3),
        2: dataclasses.replace(DEFAULTS_2D, start_channels=12, max_channels=120, max_patch_voxels=128**2),
    },
}
PRESET_SUFFIX = {"default": "", "cpu": "CPU"}


def preset_defaults(preset: str, dim: int) -> ArchDefaults:
    """Architecture defaults of a planner preset (``default`` = nnDetection's, ``cpu``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown planner preset {preset!r}: use one of {list(PRESET_NAMES)}")
    return PRESETS[preset][dim]


def preset_planner_ids(preset: str) -> set[str]:
    """Planner ids a preset's plans carry (e.g. ``{"D3V001CPU", "D2V001CPU"}``)."""
    return {rules.PLANNER_ID_3D + PRESET_SUFFIX[preset], rules.PLANNER_ID_2D + PRESET_SUFFIX[preset]}


def _architecture(defaults: ArchDefaults, dim: int, in_channels: int, num_classes: int, topo: Topology,
                  class_weight: list[float]) -> ArchitecturePlan:
    return ArchitecturePlan(
        arch_name=rules.ARCH_NAME,
        dim=dim,
        in_channels=in_channels,
        num_classes=num_classes,
        conv_kernels=[[int(k) for k in s] for s in topo.conv_kernels],
        strides=[[int(k) for k in s] for s in topo.strides],
        decoder_levels=decoder_levels(
            topo.num_stages, defaults.num_decoder_levels, defaults.min_decoder_level
        ),
        start_channels=defaults.start_channels,
        max_channels=defaults.max_channels,
        fpn_channels=defaults.fpn_channels,
        head_channels=defaults.fpn_channels,
        seg_classes=2,
        class_weight=[float(w) for w in class_weight],
    )


def fit_patch(
    spacing_transposed: np.ndarray,
    median_shape_transposed: np.ndarray,
    defaults: ArchDefaults,
    dim: int,
    in_channels: int,
    num_classes: int,
    class_weight: list[float],
    memory_budget_bytes: int,
) -> tuple[ArchitecturePlan, list[int], dict[str, int], int, bool]:
    """The patch size / topology loop: shrink the patch until the estimated memory fits the budget.

    Returns:
        (architecture, patch size, memory breakdown, number of shrink steps, fits in budget)
    """
    num_anchors = anchors_per_location(dim)
    patch = rules.initial_patch_size(spacing_transposed, median_shape_transposed)
    steps = 0
    while True:
        topo = plan_topology(spacing_transposed, patch, defaults.min_feature_map_size)
        arch = _architecture(defaults, dim, in_channels, num_classes, topo, class_weight)
        mem = memory_breakdown(arch, topo.patch_size, defaults.batch_size, num_anchors)
        capped = defaults.max_patch_voxels is not None and int(np.prod(topo.patch_size)) > defaults.max_patch_voxels
        if mem["total"] <= memory_budget_bytes and not capped:
            return arch, topo.patch_size, mem, steps, True
        smaller = rules.decrease_patch_size(topo.patch_size, median_shape_transposed, topo.strides,
                                            topo.must_be_divisible_by, defaults.min_feature_map_size)
        steps += 1
        if smaller is None or steps > MAX_SHRINK_STEPS:
            logger.warning("patch %s cannot shrink further and needs %.2f GiB > budget %.2f GiB",
                           topo.patch_size, mem["total"] / 2**30, memory_budget_bytes / 2**30)
            return arch, topo.patch_size, mem, steps, False
        patch = smaller


def _intensity_properties(fp: Fingerprint, num_modalities: int) -> list[dict[str, float]]:
    keys = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")
    out = []
    for m in range(num_modalities):
        if m < len(fp.intensity):
            out.append({k: float(getattr(fp.intensity[m], k)) for k in keys})
        else:
            out.append({})
    return out


def _plan_one(fp: Fingerprint, dataset: DatasetInfo, spacing: np.ndarray, mode: str, planner_id: str,
              memory_budget_bytes: int, notes: list[str], preset: str = DEFAULT_PRESET) -> tuple[Plan, np.ndarray]:
    """One plan at ``spacing`` (raw order); also returns the transposed GT box sizes at that spacing."""
    dim = fp.dim
    defaults = preset_defaults(preset, dim)
    planner_id = planner_id + PRESET_SUFFIX[preset]
    spacings, shapes = fp.spacings, fp.shapes_after_crop
    forward, backward = rules.transpose_axes(spacing)
    notes = list(notes)
    if forward != list(range(dim)):
        notes.append(f"transpose_forward {forward}: axis {forward[0]} has the coarsest target spacing")
    spacing_t = spacing[forward]
    median_t = rules.median_shape_at_spacing(spacings, shapes, spacing)[forward]

    modality_names = [dataset.modalities[str(i)] for i in range(len(dataset.modalities))]
    schemes = [rules.normalization_scheme(m) for m in modality_names]
    masks = [rules.use_mask_for_norm(s, fp.size_reductions, m) for s, m in zip(schemes, modality_names, strict=True)]
    num_classes = len(dataset.labels)
    weights = rules.class_weights(fp.num_instances, num_classes)

    arch, patch, mem, steps, fits = fit_patch(spacing_t, median_t, defaults, dim, len(modality_names),
                                              num_classes, weights, memory_budget_bytes)
    if preset != DEFAULT_PRESET:
        notes.append(f"preset {preset}: start channels {defaults.start_channels}, patch <= "
                     f"{defaults.max_patch_voxels} voxels")
    if steps:
        notes.append(f"patch shrunk in {steps} step(s) to fit {memory_budget_bytes / 2**30:.2f} GiB"
                     + (f" and the {preset} preset's patch cap" if defaults.max_patch_voxels else ""))
    if not fits:
        notes.append(f"WARNING: smallest patch {patch} still needs {mem['total'] / 2**30:.2f} GiB, "
                     f"more than the budget {memory_budget_bytes / 2**30:.2f} GiB")
    boxes = [np.asarray(c.boxes, dtype=np.float64).reshape(-1, 2 * dim) for c in fp.cases]
    sizes_t = rules.box_sizes_transposed(boxes, [c.spacing for c in fp.cases], spacing_t, forward)
    anchors = plan_anchors(sizes_t, arch.strides, arch.decoder_levels)
    notes.append(f"anchors: mean best IoU {anchors.mean_best_iou:.3f} over {len(sizes_t)} GT boxes "
                 "(0.5-99.5 percentile sizes)")
    plan = Plan(
        planner_id=planner_id,
        mode=mode,
        task=dataset.task or fp.task,
        dim=dim,
        modalities={str(k): str(v) for k, v in dataset.modalities.items()},
        labels={str(k): str(v) for k, v in dataset.labels.items()},
        target_spacing=[float(s) for s in spacing],
        transpose_forward=[int(a) for a in forward],
        transpose_backward=[int(a) for a in backward],
        normalization_schemes=schemes,
        use_mask_for_norm=[bool(m) for m in masks],
        intensity_properties=_intensity_properties(fp, len(modality_names)),
        patch_size=[int(p) for p in patch],
        batch_size=defaults.batch_size,
        median_shape_transposed=[float(s) for s in median_t],
        do_dummy_2D_data_aug=rules.do_dummy_2d_aug(patch) if dim == 3 else False,
        trigger_lr=False,
        architecture=arch,
        anchors=anchors,
        memory_estimate_bytes=int(mem["total"]),
        memory_budget_bytes=int(memory_budget_bytes),
        anisotropy_threshold=float(rules.ANISOTROPY_THRESHOLD),
        notes=notes,
    )
    return plan, sizes_t


def plan_task(fingerprint: Fingerprint, dataset: DatasetInfo,
              memory_budget_bytes: int = DEFAULT_BUDGET_BYTES, preset: str = DEFAULT_PRESET) -> list[Plan]:
    """Plan a task: the main plan first, then the low-resolution plan if it is triggered.

    Args:
        fingerprint: the task's fingerprint (cropped shapes, spacings, boxes, intensities).
        dataset: the task's dataset.json view (modalities, labels).
        memory_budget_bytes: GPU memory the training step must fit (default nnDetection's 11 GB card).
        preset: ``default`` (nnDetection's network) or ``cpu`` (narrow network, small patches; see PRESETS).

    Returns:
        ``[D3V001_3d]`` or ``[D3V001_3d, D3V001_3dlr1]`` for 3D tasks, ``[D2V001_2d]`` for 2D tasks
        (``D3V001CPU_3d`` ... with the ``cpu`` preset).
    """
    fp = fingerprint
    preset_defaults(preset, 3)  # unknown preset: fail before any work
    if not fp.cases:
        raise ValueError(
            f"task {fp.task}: the fingerprint has no training cases; check raw_splitted/imagesTr "
            "and re-run `nndet_prep` with -o overwrite=True"
        )
    if fp.dim not in (2, 3):
        raise ValueError(f"task {fp.task}: dim {fp.dim} is not supported (2 or 3); fix `dim` in dataset.json")
    spacing, note = rules.target_spacing(fp.spacings, fp.shapes_after_crop)
    notes = [note] if note else []
    if fp.dim == 2:
        plan, _ = _plan_one(fp, dataset, spacing, "2d", rules.PLANNER_ID_2D, memory_budget_bytes, notes, preset)
        return [plan]

    main, sizes_t = _plan_one(fp, dataset, spacing, "3d", rules.PLANNER_ID_3D, memory_budget_bytes, notes, preset)
    if not rules.trigger_lowres(sizes_t, main.patch_size):
        return [main]
    size = np.percentile(sizes_t, rules.LOWRES_BOX_PERCENTILE, axis=0)
    why = (f"low-resolution plan triggered: {rules.LOWRES_BOX_PERCENTILE}th percentile object size "
           f"{[round(float(s), 1) for s in size]} exceeds the patch {main.patch_size}")
    logger.info(why)
    main = dataclasses.replace(main, trigger_lr=True, notes=[*main.notes, why])
    lr_spacing = rules.lowres_spacing(spacing, 1)
    lr, _ = _plan_one(fp, dataset, lr_spacing, "3dlr1", rules.PLANNER_ID_3D, memory_budget_bytes,
                      [*notes, f"low-resolution plan: target spacing x {rules.LOWRES_DOWNSCALE}"], preset)
    return [main, lr]

