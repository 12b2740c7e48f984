"""Whole-case inference: sliding window, mirror TTA, per-member consolidation, WBC ensembling.

The stages and their defaults follow nnDetection's ``Predictor`` with its ``BoxEnsemblerSelective``:

1. pad the case where it is smaller than the patch, tile it (``pad_to_patch``, ``tile_starts``);
2. per *member* = (model, mirror transform): flip tiles, detect (in-model postprocess per tile),
   un-flip, weight boxes by their position in the tile, shift into the case (``predict_member_raw``);
3. per member: top-k, threshold, clip, small boxes, class-wise (weighted) NMS (``consolidate_member``);
4. all members: top-k, weighted box clustering (``ensemble_members``, ``ops.wbc``).

Steps 3-4 need no network: ``predict_case`` keeps the raw members, ``save_raw_predictions`` writes
them as ``.npz`` (no pickle) and a sweep re-runs ``postprocess_members`` only.

Boxes are MONAI ``StandardMode`` (x1, y1, [z1,] x2, y2, [z2]), half-open voxel coordinates (voxels
i..j -> [i, j + 1), see :mod:`ops.boxes`) of the unpadded preprocessed case unless said otherwise;
``restore_boxes`` maps them to the original image's voxels, ``voxel_boxes_to_world`` to millimetres.

This stays one module although it is over 400 lines: every stage passes the same ``Detections`` /
``CasePrediction`` records and shares ``_by_score``, ``DEFAULT_PARAMS`` / ``_MODEL_KEYS`` and ``_FIELDS``
(the raw ``.npz`` layout is the record's fields), and the bundle's ``predict.py`` and ``workflow.sweep`` /
``workflow.evaluate`` use it as one namespace, so a split would scatter one data type and its file format.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ops import batched_nms, wbc, weighted_nms

from . import precision

logger = logging.getLogger(__name__)

#: Tile batch ``[B, C, *patch]`` -> per tile ``{"boxes", "scores", "labels"}`` (tile voxel coordinates),
#: e.g. ``RetinaUNetDetector`` in eval mode.
Detector = Callable[[torch.Tensor], Sequence[Mapping[str, torch.Tensor]]]

#: nnDetection's ``BoxEnsemblerSelective`` defaults; keys are the keyword arguments of
#: ``consolidate_member`` and ``ensemble_members`` (the swept postprocessing parameters).
DEFAULT_PARAMS: dict[str, Any] = {
    "model_iou": 0.1, "model_nms": "weighted", "model_score_thresh": 0.0, "remove_small_boxes": 0.01,
    "model_topk": 1000, "detections_per_image": 100,
    "ensemble_iou": 0.5, "ensemble_score_thresh": 0.0, "ensemble_topk": 1000,
}
_MODEL_KEYS = ("model_iou", "model_nms", "model_score_thresh", "remove_small_boxes", "model_topk",
               "detections_per_image")
NMS_MODES = ("weighted", "plain")
_FIELDS = ("boxes", "scores", "labels", "weights")


@dataclass(frozen=True)
class Detections:
    """Boxes of one case or member (numpy, CPU), cast and checked on construction.

    Attributes:
        boxes: float32 ``[N, 2*dim]`` StandardMode, half-open voxel coordinates.
        scores: float32 ``[N]``; labels: int64 ``[N]`` 0-based foreground classes.
        weights: float32 ``[N]`` WBC weights (tile position x model weight; 1 after weighted NMS, as
            nnDetection); default ones.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32)
        if boxes.ndim != 2 or boxes.shape[1] not in (4, 6):
            raise ValueError(f"boxes must be [N, 4] or [N, 6] (StandardMode), got {boxes.shape}")
        n = boxes.shape[0]
        weights = np.ones(n) if self.weights is None else self.weights
        for name, arr, dtype in zip(_FIELDS, (boxes, self.scores, self.labels, weights),
                                    (np.float32, np.float32, np.int64, np.float32), strict=True):
            arr = np.asarray(arr).astype(dtype, copy=False)
            if arr.shape[0] != n or (name != "boxes" and arr.ndim != 1):
                raise ValueError(f"{name} must have {n} entries (one per box), got shape {arr.shape}")
            object.__setattr__(self, name, arr)

    @property
    def dim(self) -> int:
        return self.boxes.shape[1] // 2

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, idx: np.ndarray) -> Detections:
        """The boxes at ``idx`` (int indices or bool mask), in that order."""
        return Detections(*(getattr(self, f)[idx] for f in _FIELDS))

    @classmethod
    def empty(cls, dim: int) -> Detections:
        return cls(np.zeros((0, 2 * dim)), np.zeros(0), np.zeros(0))

    @classmethod
    def concat(cls, parts: Sequence[Detections], dim: int) -> Detections:
        if not parts:
            return cls.empty(dim)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


@dataclass(frozen=True)
class CasePrediction:
    """Result of ``predict_case``: final ``detections``, raw ``members`` (all tiles, before
    ``consolidate_member``; model-major, named ``model{i}_t{t}``), the case ``shape`` (clip box) and
    the postprocessing ``params`` that gave ``detections``."""

    detections: Detections
    members: list[Detections]
    member_names: list[str]
    shape: tuple[int, ...]
    params: dict[str, Any]
    seg_prob: np.ndarray | None = None  # ``masks=True``: mean foreground probability [*shape] (scripts.masks)


# ------------------------------------------------------------------------------------ tiling
def pad_to_patch(image: np.ndarray, patch_size: Sequence[int], mode: str = "constant",
                 **pad_kwargs: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pad the trailing spatial axes of ``image`` [..., *spatial] symmetrically up to ``patch_size``.

    The lower side gets ``ceil(missing / 2)`` voxels (nnDetection's symmetric start). Zeros (the mean
    after z-score normalisation) by default, where nnDetection mirrors (which copies border objects).

    Returns:
        (padded array, ``image`` itself if nothing is missing; lower padding per axis): padded-frame
        boxes map back with ``shift_boxes(boxes, [-p for p in lower])``.
    """
    d = len(patch_size)
    missing = [max(0, int(p) - int(s)) for s, p in zip(image.shape[-d:], patch_size, strict=True)]
    lower = tuple((m + 1) // 2 for m in missing)
    if not any(missing):
        return image, lower
    pad = [(0, 0)] * (image.ndim - d) + [(lo, m - lo) for lo, m in zip(lower, missing, strict=True)]
    return np.pad(image, pad, mode=mode, **pad_kwargs), lower


def _axis_starts(size: int, patch: int, overlap: float) -> list[int]:
    if size == patch:
        return [0]
    step = patch - int(patch * overlap)
    starts = [(size % step - patch) // 2]  # symmetric grid: first and last tile overhang equally
    while starts[-1] + patch < size:
        starts.append(starts[-1] + step)
    return sorted({min(max(s, 0), size - patch) for s in starts})  # shifted inside, duplicates dropped


def _axis_starts_even(size: int, patch: int, overlap: float) -> list[int]:
    step = patch - int(patch * overlap)  # the largest step that keeps the requested overlap
    count = 1 + -(-(size - patch) // step)  # fewest tiles from 0 to size - patch with steps <= step
    if count == 1:
        return [0]
    return sorted({round(i * (size - patch) / (count - 1)) for i in range(count)})


GRIDS = ("nndetection", "even")


def tile_starts(shape: Sequence[int], patch_size: Sequence[int], overlap: float = 0.5,
                grid: str = "nndetection") -> list[tuple[int, ...]]:
    """Tile origins of the sliding window (``shape`` >= ``patch_size`` per axis: pad first).

    ``grid="nndetection"`` (default): per axis, step ``patch - int(patch * overlap)`` (overlap in [0, 1)),
    grid "symmetric" (first start ``(size % step - patch) // 2``: first and last tile stick out equally),
    then tiles shifted inside ("shift" crops: the first starts at 0, the last ends at the border); tiles
    that coincide after the shift are kept once (nnDetection predicts them twice).

    ``grid="even"``: per axis the fewest tiles from 0 to ``size - patch`` whose steps are at most that step,
    spread evenly, so neighbours overlap by at least ``overlap`` of the patch, as in nnDetection's grid, with
    fewer network passes where its symmetric grid overhangs (MONAI's sliding window counts tiles the same
    way): a 512 axis with patch 128 takes 7 tiles instead of 8.

    Returns:
        Start tuples (C order over axes); a tile covers ``[start, start + patch)`` per axis.
    """
    if len(shape) != len(patch_size):
        raise ValueError(f"shape {tuple(shape)} and patch_size {tuple(patch_size)} differ in dimensionality")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    for s, p in zip(shape, patch_size, strict=True):
        if s < p:
            raise ValueError(f"axis of size {s} is smaller than the patch ({p}); pad it first (pad_to_patch)")
    starts = _axis_starts if grid == "nndetection" else _axis_starts_even
    axes = [starts(int(s), int(p), overlap) for s, p in zip(shape, patch_size, strict=True)]
    return list(itertools.product(*axes))


def shift_boxes(boxes: np.ndarray, offset: Sequence[float] | np.ndarray) -> np.ndarray:
    """``boxes`` [N, 2*dim] translated by ``offset`` ([dim] or per box [N, dim]), as a new float32 array."""
    off = np.asarray(offset, dtype=np.float32)
    return np.asarray(boxes, dtype=np.float32) + np.concatenate([off, off], axis=-1)


def position_weights(boxes: np.ndarray, tile_start: Sequence[float] | np.ndarray,
                     patch_size: Sequence[int]) -> np.ndarray:
    """nnDetection's linear box-in-tile weight ``1 - max(0, d / dmax - 0.5)``, float32 ``[N]``.

    ``d``: L2 distance of the centre of each box (``[N, 2*dim]``) to the centre of the tile at
    ``tile_start`` (``[dim]`` or per box ``[N, dim]``, the boxes' frame); ``dmax``: L2 norm of half the
    tile size. 1 on a central plateau, linearly down to 0.5 at the tile corners.
    """
    b = np.asarray(boxes, dtype=np.float64)
    d = b.shape[1] // 2
    half = np.asarray(patch_size, dtype=np.float64) / 2.0
    centre = (b[:, :d] + b[:, d:]) / 2.0
    dist = np.linalg.norm(centre - (np.asarray(tile_start, dtype=np.float64) + half), axis=-1)
    return (1.0 - np.maximum(0.0, dist / np.linalg.norm(half) - 0.5)).astype(np.float32)


# ------------------------------------------------------------------------------------ mirroring
def mirror_transforms(dim: int, num_tta: int) -> list[tuple[int, ...]]:
    """Spatial axes flipped by each TTA member, in nnDetection's order: ``num_tta`` 1 (or 0): identity;
    4: identity, (0,), (1,), (0, 1); 8 (3D only): those, then (2,), (0, 2), (1, 2), (0, 1, 2)."""
    if num_tta not in (0, 1, 4, 8) or (num_tta == 8 and dim != 3):
        raise ValueError(f"num_tta must be 1 or 4 (2D), or 1, 4 or 8 (3D); got {num_tta} for a {dim}D case")
    flips: list[tuple[int, ...]] = [()]
    if num_tta >= 4:
        flips += [(0,), (1,), (0, 1)]
    if num_tta == 8:
        flips += [(2,), (0, 2), (1, 2), (0, 1, 2)]
    return flips


def flip_images(images: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Mirror a batch ``[B, C, *spatial]`` over the given spatial axes (0 = first spatial axis)."""
    return torch.flip(images, dims=[a + 2 for a in axes]) if axes else images


def unflip_boxes(boxes: np.ndarray, axes: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Boxes ``[N, 2*dim]`` found on an image of spatial ``size`` flipped over ``axes``, mapped back to
    the unflipped image: ``[S - x2, S - x1]`` per flipped axis (half-open boxes)."""
    src = np.asarray(boxes, dtype=np.float32)
    out = src.copy()
    d = out.shape[1] // 2
    for a in axes:
        out[:, a], out[:, a + d] = size[a] - src[:, a + d], size[a] - src[:, a]
    return out


# ------------------------------------------------------------------------------------ network pass
def _as_numpy(image: Any) -> np.ndarray:
    return image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)


def predict_member_raw(detector: Detector, image: np.ndarray | torch.Tensor, patch_size: Sequence[int],
                       batch_size: int, flip_axes: Sequence[int] = (), device: str | torch.device = "cpu",
                       amp: bool = True, overlap: float = 0.5, progress: bool = False,
                       seg: Any = None, grid: str = "nndetection") -> Detections:
    """Raw detections of one (model, mirror) member over all tiles of a case.

    Tiles go in batches of ``batch_size`` under ``torch.no_grad``, with autocast (``amp``: float16 on CUDA,
    bfloat16 on a CPU with native support, ``scripts.precision``), in ``precision.memory_format``'s layout
    (channels-last for 3D bfloat16 on the CPU); an ``nn.Module`` detector is moved to ``device`` (and that
    layout) and set to eval mode.

    Args:
        detector: see ``Detector``; image: ``[C, *spatial]`` preprocessed case (numpy, memmap, tensor).
        patch_size, batch_size: the plan's tile size and tiles per forward pass.
        flip_axes: spatial axes mirrored for this member; overlap: tile overlap; progress: tqdm bar.
        seg: a ``scripts.masks.SegAccumulator``: the detector is called with ``return_seg=True`` and each tile's
            un-mirrored foreground probability is added to it.
        grid: tile grid (``tile_starts``): "nndetection" or "even".

    Returns:
        All boxes of all tiles, un-mirrored, in voxels of the unpadded ``image`` (not clipped), with their
        position weights in their tile.
    """
    dim = len(patch_size)
    vol = _as_numpy(image)
    if vol.ndim != dim + 1:
        raise ValueError(f"image must be [C, *spatial] with {dim} spatial axes, got shape {vol.shape}")
    padded, lower = pad_to_patch(vol, patch_size)
    starts = tile_starts(padded.shape[1:], patch_size, overlap, grid)
    if seg is not None:
        seg.start(padded.shape[1:], lower, vol.shape[1:], starts, patch_size)
    call = detector if seg is None else (lambda b: detector(b, return_seg=True))
    device = torch.device(device)
    layout = precision.memory_format(device, amp, dim)
    if isinstance(detector, nn.Module):
        detector.to(device, memory_format=layout).eval()
    parts = []
    batches = range(0, len(starts), batch_size)
    for i in tqdm(batches, desc=f"tiles flip={tuple(flip_axes)}", unit="batch", disable=not progress):
        group = starts[i:i + batch_size]
        tiles = np.stack([padded[(slice(None), *(slice(s, s + p) for s, p in zip(st, patch_size, strict=True)))]
                          for st in group]).astype(np.float32, copy=False)
        batch = flip_images(torch.from_numpy(tiles), flip_axes).to(device).contiguous(memory_format=layout)
        with torch.no_grad(), precision.autocast(device, amp):
            outputs = call(batch)
        for st, out in zip(group, outputs, strict=True):
            if seg is not None:
                prob = flip_images(out["seg_probs"][None, None].float(), flip_axes)[0, 0]
                seg.add(prob.cpu().numpy(), st)
            boxes = unflip_boxes(out["boxes"].detach().float().cpu().numpy().reshape(-1, 2 * dim), flip_axes,
                                 patch_size)
            parts.append(Detections(shift_boxes(boxes, np.subtract(st, lower)), out["scores"].float().cpu().numpy(),
                                    out["labels"].cpu().numpy(), position_weights(boxes, [0] * dim, patch_size)))
    if seg is not None:
        seg.end_member()
    return Detections.concat(parts, dim)


# ------------------------------------------------------------------------------------ consolidation
def _by_score(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[: max(0, int(k))]


def consolidate_member(raw: Detections, shape: Sequence[int], model_iou: float = 0.1,
                       model_nms: str = "weighted", model_score_thresh: float = 0.0,
                       remove_small_boxes: float = 0.01, model_topk: int = 1000,
                       detections_per_image: int = 100) -> Detections:
    """nnDetection's per model-TTA stage on a member's ``raw`` detections over the case ``shape``.

    Sort by score, keep ``model_topk``, keep scores ``> model_score_thresh``, clip to ``shape``, drop
    boxes with a side ``< remove_small_boxes``, class-wise NMS at ``model_iou``: "weighted" ranks by
    score x weight (``ops.weighted_nms``), keeps the original scores and resets weights to 1; "plain"
    ranks by score (``ops.batched_nms``) and keeps the weights. Returns the first
    ``detections_per_image`` in NMS rank order.
    """
    if model_nms not in NMS_MODES:
        raise ValueError(f"model_nms must be one of {NMS_MODES}, got {model_nms!r}")
    d = len(shape)
    if len(raw) and raw.dim != d:
        raise ValueError(f"{raw.dim}D boxes for a {d}D case shape {tuple(shape)}")
    det = raw.select(_by_score(raw.scores, model_topk))
    det = det.select(det.scores > model_score_thresh)
    boxes = np.clip(det.boxes, 0, np.asarray([*shape, *shape], dtype=np.float32))
    keep = ((boxes[:, d:] - boxes[:, :d]) >= remove_small_boxes).all(axis=1)
    det = Detections(boxes[keep], det.scores[keep], det.labels[keep], det.weights[keep])
    if len(det) == 0:
        return det
    if model_nms == "weighted":
        keep = weighted_nms(det.boxes, det.scores, det.labels, det.weights, model_iou, max_keep=detections_per_image)
        return Detections(det.boxes[keep], det.scores[keep], det.labels[keep])
    keep = batched_nms(det.boxes, det.scores, det.labels, model_iou, max_keep=detections_per_image)
    return det.select(keep)


def ensemble_members(members: Sequence[Detections], ensemble_iou: float = 0.5,
                     ensemble_score_thresh: float = 0.0, ensemble_topk: int = 1000,
                     n_exp_preds: float | None = None) -> Detections:
    """nnDetection's ensemble stage: concatenate, top ``ensemble_topk`` by score, ``ops.wbc``.

    Args:
        members: consolidated detections of every (model, mirror) member (same frame).
        ensemble_iou: boxes with IoU ``> ensemble_iou`` to a cluster head join it; ensemble_topk: boxes
            entering WBC; ensemble_score_thresh: keep clusters scoring ``> ensemble_score_thresh``.
        n_exp_preds: expected votes per object; default the number of members (missing votes dampen).

    Returns:
        Final detections (weights 1) in the order of their cluster heads' scores.
    """
    if not members:
        raise ValueError("ensemble_members needs at least one member")
    allm = Detections.concat(members, members[0].dim)
    det = allm.select(_by_score(allm.scores, ensemble_topk))
    if len(det) == 0:
        return det
    n_exp = float(len(members) if n_exp_preds is None else n_exp_preds)
    boxes, scores, labels = wbc(det.boxes, det.scores, det.labels, ensemble_iou, n_exp,
                                score_threshold=ensemble_score_thresh, weights=det.weights)
    return Detections(boxes, scores, labels)


def check_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``DEFAULT_PARAMS`` updated by ``params``; unknown keys raise ValueError (typos would pass silently)."""
    unknown = sorted(set(params or {}) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(f"unknown postprocessing parameter(s) {unknown}; known: {sorted(DEFAULT_PARAMS)}")
    return {**DEFAULT_PARAMS, **(params or {})}


def postprocess_members(members: Sequence[Detections], shape: Sequence[int],
                        params: Mapping[str, Any] | None = None) -> Detections:
    """Steps 3-4 (``consolidate_member`` per member, then ``ensemble_members``) from a parameter dict."""
    p = check_params(params)
    model_kw = {k: p[k] for k in _MODEL_KEYS}
    ens_kw = {k: v for k, v in p.items() if k not in _MODEL_KEYS}
    return ensemble_members([consolidate_member(m, shape, **model_kw) for m in members], **ens_kw)


def predict_case(detectors: Sequence[Detector], image: np.ndarray | torch.Tensor, patch_size: Sequence[int],
                 batch_size: int, num_tta: int | None = None, params: Mapping[str, Any] | None = None,
                 device: str | torch.device = "cpu", amp: bool = True, overlap: float = 0.5,
                 model_weights: Sequence[float] | None = None, progress: bool = False,
                 masks: bool = False, grid: str = "nndetection") -> CasePrediction:
    """Detect objects in one preprocessed case with every model (fold) x mirror TTA, then ensemble.

    Args:
        detectors: one per model/fold (see ``Detector``); image: ``[C, *spatial]`` preprocessed case.
        patch_size, batch_size, device, amp, overlap, progress, grid: see ``predict_member_raw``.
        num_tta: mirror transforms per model (``mirror_transforms``); default 8 in 3D, 4 in 2D.
        params: postprocessing parameters (``DEFAULT_PARAMS`` keys, e.g. a sweep result).
        model_weights: factor per model on the position weights (default 1; reset by weighted NMS, as
            in nnDetection).
        masks: also average the segmentation head's foreground probability over every tile, mirror and
            model (``CasePrediction.seg_prob``; one float32 array of the case, ``scripts.masks``).

    Returns:
        Final detections and raw members, in voxel coordinates of ``image``.
    """
    p = check_params(params)
    dim = len(patch_size)
    flips = mirror_transforms(dim, (8 if dim == 3 else 4) if num_tta is None else num_tta)
    weights = [1.0] * len(detectors) if model_weights is None else [float(w) for w in model_weights]
    if not detectors or len(weights) != len(detectors):
        raise ValueError(f"need one or more detectors and one weight each, got {len(detectors)} and {len(weights)}")
    tic, vol = time.perf_counter(), _as_numpy(image)
    members, names = [], []
    seg = None
    if masks:
        from .masks import SegAccumulator

        seg = SegAccumulator()
    for i, (det, w) in enumerate(zip(detectors, weights, strict=True)):
        for t, axes in enumerate(flips):
            raw = predict_member_raw(det, vol, patch_size, batch_size, axes, device, amp, overlap, progress, seg,
                                     grid)
            members.append(Detections(raw.boxes, raw.scores, raw.labels, raw.weights * w))
            names.append(f"model{i}_t{t}")
    shape = tuple(int(s) for s in vol.shape[1:])
    final = postprocess_members(members, shape, p)
    logger.info("case %s: %d member(s), %d raw box(es) -> %d detection(s) in %.1f s", shape, len(members),
                sum(len(m) for m in members), len(final), time.perf_counter() - tic)
    return CasePrediction(final, members, names, shape, p, None if seg is None else seg.probability())


# ------------------------------------------------------------------------------------ raw results I/O
def save_raw_predictions(prediction: CasePrediction, path: str | os.PathLike) -> Path:
    """Write a ``CasePrediction`` as ``.npz`` (plain arrays and a JSON string; atomic rename)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        "shape": np.asarray(prediction.shape, dtype=np.int64),
        "member_names": np.asarray(prediction.member_names, dtype=str),
        "params_json": np.asarray(json.dumps(prediction.params, default=lambda v: v.item())),  # numpy scalars
    }
    for f in _FIELDS:
        arrays[f"final_{f}"] = getattr(prediction.detections, f)
        for i, m in enumerate(prediction.members):
            arrays[f"member{i}_{f}"] = getattr(m, f)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:  # a file object: numpy adds no ".npz" suffix
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_raw_predictions(path: str | os.PathLike) -> CasePrediction:
    """Read a file of ``save_raw_predictions`` (``allow_pickle=False``); ValueError for other files."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["member_names"]]
            dim = len(z["shape"])

            def det(prefix: str) -> Detections:
                return Detections(*(z[f"{prefix}_{f}"].reshape((-1, 2 * dim) if f == "boxes" else -1)
                                    for f in _FIELDS))

            return CasePrediction(det("final"), [det(f"member{i}") for i in range(len(names))], names,
                                  tuple(int(s) for s in z["shape"]), json.loads(str(z["params_json"])))
    except KeyError as e:
        raise ValueError(f"{path}: not a raw prediction file of save_raw_predictions ({e}); re-run inference") from e


# ------------------------------------------------------------------------------------ restoring
def restore_boxes(boxes: np.ndarray, properties: Mapping[str, Any]) -> np.ndarray:
    """Boxes ``[N, 2*dim]`` from preprocessed voxels (transposed axes) back to the original image's voxels.

    Undoes what the case json (``planner/preprocess/run.py``) records: the pixel-edge aligned resampling
    (edges scale by the exact ratio ``shape_after_crop / shape_after_resampling``, i.e. nnDetection's
    spacing_after_resampling / original_spacing), the transpose (``transpose_forward``) and the crop
    (``crop_bbox`` lower corner). Returns float64 StandardMode, half-open, raw axes (NIfTI i, j, k).
    """
    missing = [k for k in ("transpose_forward", "shape_after_crop", "shape_after_resampling", "crop_bbox")
               if k not in properties]
    if missing:
        raise KeyError(f"case properties lack {missing}; re-run nndet_prep to rewrite the case json")
    tf = [int(a) for a in properties["transpose_forward"]]
    d = len(tf)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 2 * d)
    back = np.argsort(tf)  # raw axis a is preprocessed axis back[a]
    crop_shape = np.asarray(properties["shape_after_crop"], dtype=np.float64)
    pre_shape = np.asarray(properties["shape_after_resampling"], dtype=np.float64)[back]
    lo = np.asarray([c[0] for c in properties["crop_bbox"]], dtype=np.float64)
    scale = crop_shape / pre_shape
    perm = np.concatenate([back, back + d])
    return b[:, perm] * np.concatenate([scale, scale]) + np.concatenate([lo, lo])


def voxel_boxes_to_world(boxes: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Axis-aligned world bounding boxes (mm, float64 ``[N, 2*W]``: mins then maxes) of voxel boxes.

    ``boxes`` ``[N, 2*dim]`` are StandardMode voxel boxes of the image ``affine`` (``[W+1, V+1]``, 4x4
    for NIfTI, ``V >= dim``) belongs to. A half-open box [i, j) spans the voxel edges
    ``i - 0.5 .. j - 0.5`` in index coordinates (voxel centres at integers, as NIfTI/DICOM affines);
    its corners are mapped through ``affine``. Frame: the affine's, RAS+ for a NIfTI (nibabel) affine,
    LPS for a DICOM one. Index axes beyond the box's (2D box, 4x4 affine) span the slice at index 0.
    """
    a = np.asarray(affine, dtype=np.float64)
    b = np.asarray(boxes, dtype=np.float64)
    d, v = b.shape[1] // 2, a.shape[1] - 1
    if v < d:
        raise ValueError(f"a {a.shape} affine cannot map {d}D boxes")
    lo = np.concatenate([b[:, :d], np.zeros((len(b), v - d))], axis=1) - 0.5
    hi = np.concatenate([b[:, d:], np.ones((len(b), v - d))], axis=1) - 0.5
    pick = np.asarray(list(itertools.product((0, 1), repeat=v)), dtype=bool)  # [2**v, v]
    corners = np.where(pick[None], hi[:, None], lo[:, None])  # [N, 2**v, v]
    world = corners @ a[:-1, :v].T + a[:-1, v]
    return np.concatenate([world.min(axis=1), world.max(axis=1)], axis=1)

