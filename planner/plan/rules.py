"""Planner heuristics (target spacing, transpose, normalisation, patch size, low-res trigger) as named
constants and small pure functions.

Every function here is a rule of nnDetection's ``D3V001`` planner (which takes the spacing rule from
nnU-Net v2.1), written as a pure function of the fingerprint's numbers so each can be tested alone.

Axis conventions: ``spacings`` and ``shapes`` arguments are in raw voxel order (nibabel i, j, k);
arguments named ``*_transposed`` are in the order of the preprocessed arrays, i.e. raw axes
reordered by ``transpose_forward`` (coarsest target spacing first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- constants
PLANNER_ID_3D = "D3V001"
PLANNER_ID_2D = "D2V001"
ARCH_NAME = "RetinaUNetV001"

ANISOTROPY_THRESHOLD = 3.0  # spacing ratio and voxel ratio that make an axis "anisotropic"
TARGET_SPACING_PERCENTILE = 50.0  # median spacing per axis
ANISO_AXIS_SPACING_PERCENTILE = 10.0  # spacing percentile used for the coarse axis of anisotropic data
ANISO_SPACING_EPS = 1e-5  # nudges the coarse axis above the finest other axis (nnU-Net v2.1)
USE_MASK_MAX_SIZE_REDUCTION = 3 / 4  # nonCT: normalise inside the nonzero mask if cropping removed > 1/4
INITIAL_PATCH_SMALLEST_AXIS = 512  # initial patch: smallest axis 512 voxels before clipping
LOWRES_DOWNSCALE = 2  # ``3dlr1``: target spacing x 2**1
LOWRES_BOX_PERCENTILE = 99.5  # object size percentile compared with the patch to trigger ``3dlr1``
DUMMY_2D_AUG_RATIO = ANISOTROPY_THRESHOLD  # do_dummy_2D_data_aug if max(patch)/min(patch) > this

NORM_CT = "CT"
NORM_CT2 = "CT2"
NORM_NONCT = "nonCT"


# ------------------------------------------------------------------------------------ target spacing
def target_spacing(
    spacings: np.ndarray,
    shapes: np.ndarray,
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
) -> tuple[np.ndarray, str | None]:
    """Target spacing: median per axis, with nnU-Net v2.1's rule for anisotropic data.

    If the coarsest axis has a median spacing more than ``anisotropy_threshold`` times the finest
    other axis *and* its median size (voxels) times the threshold is smaller than the smallest other
    median size, the coarse axis gets the 10th percentile of its spacings instead (so fewer slices
    are interpolated), but never below the finest other spacing (then that spacing + 1e-5).

    Args:
        spacings: [num_cases, dim] voxel spacings (mm), raw axis order.
        shapes: [num_cases, dim] shapes after cropping (voxels), raw axis order.
        anisotropy_threshold: ratio for both conditions (3, as nnDetection).

    Returns:
        (target spacing [dim] in raw axis order, a note describing the anisotropy decision or None)
    """
    spacings = np.asarray(spacings, dtype=np.float64)
    shapes = np.asarray(shapes, dtype=np.float64)
    target = np.percentile(spacings, TARGET_SPACING_PERCENTILE, axis=0)
    median_size = np.percentile(shapes, TARGET_SPACING_PERCENTILE, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    if not others:
        return target, None
    other_spacing = min(target[a] for a in others)
    other_size = min(median_size[a] for a in others)
    aniso_spacing = target[worst] > anisotropy_threshold * other_spacing
    aniso_voxels = median_size[worst] * anisotropy_threshold < other_size
    if not (aniso_spacing and aniso_voxels):
        return target, None
    value = float(np.percentile(spacings[:, worst], ANISO_AXIS_SPACING_PERCENTILE))
    if value < other_spacing:
        value = max(other_spacing, value) + ANISO_SPACING_EPS
    note = (
        f"anisotropic data: axis {worst} median spacing {target[worst]:.4g} > {anisotropy_threshold:g} x "
        f"{other_spacing:.4g} and median size {median_size[worst]:.4g} x {anisotropy_threshold:g} < "
        f"{other_size:.4g}; its target spacing is the {ANISO_AXIS_SPACING_PERCENTILE:g}th percentile "
        f"{value:.4g}"
    )
    target = target.copy()
    target[worst] = value
    return target, note


def lowres_spacing(spacing: Sequence[float], level: int = 1) -> np.ndarray:
    """Target spacing of the low-resolution plan ``3dlr<level>``: base spacing x 2**level."""
    return np.asarray(spacing, dtype=np.float64) * (LOWRES_DOWNSCALE**level)


# ---------------------------------------------------------------------------------------- transpose
def transpose_axes(spacing: Sequence[float]) -> tuple[list[int], list[int]]:
    """``transpose_forward`` moves the coarsest-spacing axis first; the other axes keep their order.

    Ties: the *first* axis with the largest spacing is moved (``np.argmax``), so isotropic data gets
    the identity ``[0, 1, 2]`` and nothing is reordered.

    Returns:
        (transpose_forward, transpose_backward) with ``transposed = raw.transpose(forward)`` and
        ``raw = transposed.transpose(backward)``.
    """
    dim = len(spacing)
    first = int(np.argmax(np.asarray(spacing)))
    forward = [first] + [a for a in range(dim) if a != first]
    backward = [forward.index(a) for a in range(dim)]
    return forward, backward


def median_shape_at_spacing(spacings: np.ndarray, shapes: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Median over cases of the shape each case gets when resampled to ``spacing`` (raw axis order).

    Args:
        spacings: [num_cases, dim] original spacings.
        shapes: [num_cases, dim] shapes after cropping.
        spacing: [dim] target spacing.

    Returns:
        [dim] float median shape (voxels at the target spacing).
    """
    new = np.asarray(spacings, np.float64) / np.asarray(spacing, np.float64) * np.asarray(shapes, np.float64)
    return np.median(new, axis=0)


# ------------------------------------------------------------------------------------ normalisation
def normalization_scheme(modality: str) -> str:
    """"CT" for a modality named exactly CT, "CT2" for CT2, "nonCT" otherwise.

    nnDetection keeps the modality name as the scheme and its preprocessor tests ``scheme == "CT"``
    and ``== "CT2"``: the match is exact, so "ct", " CT" or "noncontrast CT" get the per-case
    z-score of "nonCT". Case and space variants of CT/CT2 are logged: a CT normalised per case is rarely
    what was meant.
    """
    if modality in (NORM_CT, NORM_CT2):
        return modality
    if modality.strip().upper() in (NORM_CT, NORM_CT2):
        logger.warning("modality %r is normalised as %r: only the exact names %r and %r get CT normalisation "
                       "(as in nnDetection)", modality, NORM_NONCT, NORM_CT, NORM_CT2)
    return NORM_NONCT


def use_mask_for_norm(scheme: str, size_reductions: Sequence[float], modality: str | None = None) -> bool:
    """Normalise inside the nonzero mask only for nonCT data whose crop removed much background.

    Args:
        scheme: normalisation scheme of the modality.
        size_reductions: per case prod(shape after crop) / prod(shape before crop).
        modality: the modality's name in dataset.json: as nnDetection's
            ``determine_whether_to_use_mask_for_norm`` (``"CT" in name``, case-sensitive substring), a name
            holding "CT" ("noncontrast CT", "PET-CT") never uses the mask, whatever its scheme.

    Returns:
        False for CT/CT2 (and names containing "CT"); else True iff the median size reduction is < 3/4
        (brain-like data).
    """
    if scheme in (NORM_CT, NORM_CT2) or (modality is not None and "CT" in modality):
        return False
    if len(size_reductions) == 0:
        return False
    return bool(np.median(np.asarray(size_reductions, dtype=np.float64)) < USE_MASK_MAX_SIZE_REDUCTION)


# ---------------------------------------------------------------------------------------- patch size
def initial_patch_size(
    spacing_transposed: Sequence[float], median_shape_transposed: Sequence[float]
) -> list[int]:
    """Initial patch before the topology/memory loop (nnDetection ``BoxC002._get_initial_patch_size``).

    The patch covers the same extent in mm on every axis, scaled so its smallest axis is 512 voxels,
    then clipped: in 3D the coarsest-spacing axis to its own median shape and every other axis to
    the smallest in-plane median shape (square in-plane patches); in 2D every axis to the smallest
    median shape.

    Args:
        spacing_transposed: [dim] target spacing, transposed order.
        median_shape_transposed: [dim] median shape at the target spacing, transposed order.

    Returns:
        [dim] patch size (voxels, transposed order), not yet divisible by the pooling factors.
    """
    spacing = np.asarray(spacing_transposed, dtype=np.float64)
    median = np.asarray(median_shape_transposed, dtype=np.float64)
    per_mm = 1.0 / spacing
    rel = per_mm / per_mm.mean()
    patch = np.round(rel / rel.min() * INITIAL_PATCH_SMALLEST_AXIS)
    dim = len(spacing)
    if dim > 2:
        low = int(np.argmax(spacing))
        iso_min = min(median[a] for a in range(dim) if a != low)
        limits = [median[a] if a == low else iso_min for a in range(dim)]
    else:
        limits = [median.min()] * dim
    return [max(1, int(round(min(p, lim)))) for p, lim in zip(patch, limits, strict=True)]


def decrease_patch_size(
    patch_size: Sequence[int],
    median_shape_transposed: Sequence[float],
    strides: Sequence[Sequence[int]],
    must_be_divisible_by: Sequence[int],
    min_feature_map_size: int,
) -> list[int] | None:
    """Shrink the axis with the largest patch / median-shape ratio (nnDetection ``_decrease_patch_size``).

    The axis shrinks by its divisibility factor, or by half of it once its bottleneck feature map is
    already at the minimum size. Axes that would drop below ``min_feature_map_size`` are skipped in
    favour of the next-largest ratio (nnDetection has no such guard and can loop forever).

    Ties: nnDetection ranks the axes with an ascending argsort of the ratios read backwards, so among
    axes with equal ratios the one with the *highest* index shrinks first (e.g. an in-plane axis
    before the slice axis when the patch starts at the median shape, ratios all 1). We rank the same
    way, with a stable sort so the order of ties does not depend on numpy's sorting algorithm.

    Args:
        patch_size: [dim] current patch (transposed order).
        median_shape_transposed: [dim] median shape at the target spacing.
        strides: per-stage strides of the current topology (stage 0 = all ones).
        must_be_divisible_by: [dim] product of the strides per axis.
        min_feature_map_size: minimal bottleneck edge.

    Returns:
        The new patch, or None if no axis can shrink any more.
    """
    patch = np.asarray(patch_size, dtype=np.int64)
    median = np.maximum(np.asarray(median_shape_transposed, dtype=np.float64), 1e-6)
    divisor = np.asarray(must_be_divisible_by, dtype=np.int64)
    bottleneck = patch / np.prod(np.asarray(strides, dtype=np.int64), axis=0)
    # largest ratio first; equal ratios: highest axis index first (nnDetection's argsort(...)[::-1])
    order = np.argsort(patch / median, kind="stable")[::-1]
    for a in order:
        step = int(divisor[a]) if bottleneck[a] > min_feature_map_size else max(1, int(divisor[a]) // 2)
        if patch[a] - step >= min_feature_map_size:
            new = patch.copy()
            new[a] -= step
            return [int(x) for x in new]
    return None


# ------------------------------------------------------------------------------- lowres and classes
def box_sizes_transposed(
    boxes_per_case: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    spacing_transposed: Sequence[float],
    transpose_forward: Sequence[int],
) -> np.ndarray:
    """GT box extents in voxels of the preprocessed image (target spacing, transposed axes).

    Args:
        boxes_per_case: per case [N_i, 2*dim] StandardMode boxes (cropped raw voxels, half-open).
        spacings: per case [dim] original spacing (raw order).
        spacing_transposed: [dim] target spacing, transposed order.
        transpose_forward: raw -> transposed axis order.

    Returns:
        [N, dim] box sizes (voxels at the target spacing, transposed order).
    """
    out = []
    fwd = list(transpose_forward)
    for boxes, sp in zip(boxes_per_case, spacings, strict=True):
        b = np.asarray(boxes, dtype=np.float64)
        if b.size == 0:
            continue
        dim = b.shape[1] // 2
        sizes = (b[:, dim:] - b[:, :dim])[:, fwd]
        out.append(sizes * (np.asarray(sp, np.float64)[fwd] / np.asarray(spacing_transposed, np.float64)))
    if not out:
        return np.zeros((0, len(fwd)))
    return np.concatenate(out, axis=0)


def trigger_lowres(box_sizes_transposed_: np.ndarray, patch_size: Sequence[int]) -> bool:
    """True if the 99.5th percentile object size exceeds the patch on any axis.

    Unlike nnDetection (which compares box sizes in *original* voxels with the patch), the sizes are
    taken at the plan's target spacing, the space the patch lives in.
    """
    if len(box_sizes_transposed_) == 0:
        return False
    size = np.percentile(box_sizes_transposed_, LOWRES_BOX_PERCENTILE, axis=0)
    return bool((np.asarray(patch_size) < size).any())


def class_weights(num_instances: dict[str, int], num_classes: int) -> list[float]:
    """Background 1/(C+1); class i (1 - 1/(C+1)) * (1 - n_i / N) (nnDetection; unused by the BCE head).

    Args:
        num_instances: class index (str) -> number of instances in the dataset.
        num_classes: number of foreground classes C.

    Returns:
        [C + 1] weights, background first.
    """
    counts = [int(num_instances.get(str(i), 0)) for i in range(num_classes)]
    total = sum(counts)
    bg = 1.0 / (num_classes + 1)
    rest = 1.0 - bg
    return [bg] + [rest * (1.0 - (n / total if total else 0.0)) for n in counts]


def do_dummy_2d_aug(patch_size: Sequence[int]) -> bool:
    """Use 2D (in-plane) augmentation if the patch is very flat: max/min > 3."""
    return bool(max(patch_size) / min(patch_size) > DUMMY_2D_AUG_RATIO)
