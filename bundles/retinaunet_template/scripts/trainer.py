"""Training steps for ``monai.engines`` (nnDetection's schedule): optimizer, LR schedule, iterations, fold data.

``configs/train.json`` declares every object below and the handlers of ``scripts/handlers.py``; this module
holds the optimizer groups, the warmup/poly/SWA learning-rate schedule, the train and validation
``iteration_update`` steps, the patch-level COCO metrics, the fold's cases and the reader of ``train_log.json``.

Determinism and resume: batches are a function of (seed, epoch) (``handlers.SamplerEpoch``), augmentation a
function of each sample's seed, and the global torch RNG (hard-negative sampling) is reseeded from
(seed, iteration) before every step, so a run resumed from ``model_last.pt`` continues exactly as the
uninterrupted run.

Boxes are MONAI ``StandardMode`` (x1, y1, [z1,] x2, y2, [z2]) voxel boxes of the patch, half-open.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed, precision

logger = logging.getLogger(__name__)

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
MAX_NONFINITE_STEPS = 10


# --------------------------------------------------------------------------------- optimizer, LR
def param_groups(model: nn.Module, weight_decay: float, decay_bias: bool = False) -> list[dict]:
    """Two SGD groups: ``weight_decay`` on conv/linear weights; none on norm-layer params and biases.

    Args:
        model: the network (each trainable parameter lands in exactly one group).
        weight_decay: decay of the first group.
        decay_bias: decay biases of non-norm layers too.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": the rest, "weight_decay": 0.0}]``.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            exempt = isinstance(module, NORM_TYPES) or (name == "bias" and not decay_bias)
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 3e-5,
    nesterov: bool = True,
    decay_bias: bool = False,
) -> torch.optim.SGD:
    """SGD (Nesterov) with weight decay only on weights of non-norm layers (nnDetection's optimizer).

    Args:
        model: the network.
        lr, momentum, nesterov: SGD's.
        weight_decay, decay_bias: see :func:`param_groups`.
    """
    groups = param_groups(model, weight_decay, decay_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)


def scheduled_lr(
    iteration: int,
    base_lr: float,
    warmup_iters: int,
    poly_iters: int,
    iters_per_epoch: int,
    gamma: float = 0.9,
    warmup_start_lr: float = 1e-6,
    swa_start_factor: float = 0.1,
    swa_end_factor: float = 0.001,
) -> float:
    """Learning rate of step ``iteration`` (0-based; steps before it have been taken).

    * ``[0, warmup_iters)``: linear from ``warmup_start_lr`` to ``base_lr``;
    * ``[warmup_iters, poly_iters)``: ``base_lr * (1 - (it - warmup) / (poly_iters - warmup)) ** gamma``;
    * ``>= poly_iters`` (SWA epochs): per epoch, linear from ``base_lr * swa_start_factor`` down to
      ``base_lr * swa_end_factor`` (nnDetection's ``SWACycleLinear``: 1e-3 -> 1e-5 for lr 0.01).

    Args:
        iteration: the step.
        base_lr: peak learning rate.
        warmup_iters, poly_iters, iters_per_epoch: phase boundaries and SWA cycle length, in steps.
        gamma: poly exponent.
        warmup_start_lr, swa_start_factor, swa_end_factor: see above.
    """
    if iteration < warmup_iters:
        return warmup_start_lr + (base_lr - warmup_start_lr) * iteration / warmup_iters
    if iteration < poly_iters:
        return base_lr * (1 - (iteration - warmup_iters) / max(1, poly_iters - warmup_iters)) ** gamma
    pos = (iteration - poly_iters) % iters_per_epoch
    frac = pos / max(1, iters_per_epoch - 1)
    return base_lr * (swa_start_factor + (swa_end_factor - swa_start_factor) * frac)


class LinearWarmupPoly(torch.optim.lr_scheduler.LRScheduler):
    """Per-iteration schedule of :func:`scheduled_lr` (call ``step()`` after every optimizer step).

    Args:
        optimizer: its groups' initial lr is the base lr.
        warmup_iters: warmup steps (nnDetection: 4000).
        poly_iters: steps until the SWA phase (nnDetection: 50 epochs x 2500).
        iters_per_epoch: steps per epoch (length of one SWA cycle).
        gamma, warmup_start_lr, swa_start_factor, swa_end_factor: see :func:`scheduled_lr`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_iters: int,
        poly_iters: int,
        iters_per_epoch: int,
        gamma: float = 0.9,
        warmup_start_lr: float = 1e-6,
        swa_start_factor: float = 0.1,
        swa_end_factor: float = 0.001,
        last_epoch: int = -1,
    ) -> None:
        self.settings = {
            "warmup_iters": int(warmup_iters),
            "poly_iters": int(poly_iters),
            "iters_per_epoch": int(iters_per_epoch),
            "gamma": float(gamma),
            "warmup_start_lr": float(warmup_start_lr),
            "swa_start_factor": float(swa_start_factor),
            "swa_end_factor": float(swa_end_factor),
        }
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [scheduled_lr(self.last_epoch, base, **self.settings) for base in self.base_lrs]


# ------------------------------------------------------------------------------------ iteration steps
def step_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """Seed of the torch RNG before step ``iteration`` of process ``rank`` (rank 0: the single-process seed)."""
    return int(seed) * 1_000_003 + int(iteration) + int(rank) * 2**40


def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
    nb = device.type == "cuda"
    images = batch["image"].to(device, non_blocking=nb)
    seg = batch["seg"].to(device, non_blocking=nb)
    targets = [{k: v.to(device, non_blocking=nb) for k, v in t.items()} for t in batch["targets"]]
    return images, targets, seg


class DetectionTrainStep:
    """``iteration_update`` of ``SupervisedTrainer``: one SGD step on the summed detector losses.

    Args:
        lr_scheduler: stepped after every optimizer step.
        scaler: ``torch.amp.GradScaler`` (float16 on CUDA only; bfloat16 needs no loss scaling).
        amp: autocast of the network pass: float16 on CUDA, bfloat16 on a CPU with native support
            (``scripts.precision``).
        seed: the global torch RNG is reseeded from (seed, iteration) before each step.

    Returns (per step, in ``engine.state.output``): floats ``loss`` (sum), ``cls``, ``reg``, ``seg_ce``,
    ``seg_dice`` and ``lr`` (the rate this step used); under DDP the losses are means over the ranks.

    Under DDP ``engine.network`` is the ``DistributedDataParallel`` wrapper (``configs/multi_gpu_train.json``);
    each rank's losses are normalised over its own share of the batch (positives, sampled anchors, batch Dice),
    and DDP averages the gradients, so a step is the single-process step up to those normalisers and the
    hard-negative draw (seeded per rank).
    """

    def __init__(self, lr_scheduler, scaler: torch.amp.GradScaler, amp: bool = True, seed: int = 0) -> None:
        self.lr_scheduler, self.scaler, self.amp, self.seed = lr_scheduler, scaler, amp, int(seed)
        self.nonfinite = 0

    def __call__(self, engine, batch: dict) -> dict[str, float]:
        torch.manual_seed(step_seed(self.seed, int(engine.state.iteration), distributed.rank()))
        model, optimizer, device = engine.network, engine.optimizer, engine.state.device
        model.train()
        images, targets, seg = _to_device(batch, device)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device, self.amp):
            losses = model(images, targets, seg)
        loss = sum(losses.values())
        # under DDP the skip is decided together: a rank that skipped backward would leave the others waiting
        # in the gradient all-reduce
        if not distributed.all_true(bool(torch.isfinite(loss))):
            self.nonfinite += 1
            logger.warning("non-finite loss at iteration %d (%s): step skipped", engine.state.iteration,
                           {k: float(v) for k, v in losses.items()})
            if self.nonfinite >= MAX_NONFINITE_STEPS:
                raise FloatingPointError(
                    f"{self.nonfinite} non-finite losses in a row: training diverged. Lower lr (-o lr=...) and "
                    "rerun; training resumes from the last checkpoint."
                )
        else:
            self.nonfinite = 0
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        self.lr_scheduler.step()
        out = distributed.mean_over_ranks({"loss": float(loss.detach()), **{k: float(v.detach())
                                                                              for k, v in losses.items()}})
        return {**out, "lr": lr}


class DetectionValStep:
    """``iteration_update`` of ``SupervisedEvaluator``: patch losses, detections and seg Dice counts.

    Returns per batch: float losses (``loss`` and parts), ``detections`` / ``targets`` (per image numpy
    ``boxes``, ``labels`` (+ ``scores``)), ``dice_counts`` = (intersection, predicted fg, true fg) voxels.

    Args:
        amp: autocast as in :class:`DetectionTrainStep`.
    """

    def __init__(self, amp: bool = True) -> None:
        self.amp = amp

    def __call__(self, engine, batch: dict) -> dict[str, Any]:
        model, device = distributed.unwrap(engine.network), engine.state.device
        model.eval()
        images, targets, seg = _to_device(batch, device)
        captured: dict = {}
        hook = model.network.register_forward_hook(lambda m, i, o: captured.update(o))
        try:
            with torch.no_grad(), precision.autocast(device, self.amp):
                losses, dets = model.losses_and_detections(images, targets, seg)
        finally:
            hook.remove()
        pred_fg = captured["seg_logits"].argmax(dim=1) > 0
        true_fg = seg[:, 0] > 0
        counts = [float((pred_fg & true_fg).sum()), float(pred_fg.sum()), float(true_fg.sum())]
        out: dict[str, Any] = {"loss": float(sum(losses.values()))}
        out.update({k: float(v) for k, v in losses.items()})
        out["detections"] = [{k: v.detach().float().cpu().numpy() for k, v in d.items()} for d in dets]
        out["targets"] = [{k: v.cpu().numpy() for k, v in t.items()} for t in targets]
        out["dice_counts"] = counts
        return out


# ------------------------------------------------------------------------------------------- metrics
def _class_names(classes: Sequence[str] | dict | int) -> list[str]:
    if isinstance(classes, int):
        return [str(c) for c in range(classes)]
    if isinstance(classes, dict):
        return [str(classes[k]) for k in sorted(classes, key=int)]
    return [str(c) for c in classes]


def patch_detection_metrics(
    detections: Sequence[dict], targets: Sequence[dict], classes: Sequence[str] | dict | int
) -> dict[str, float]:
    """COCO-style metrics over patches (IoU 0.1..0.5 step 0.05, max 100 detections), nnDetection's keys.

    Args:
        detections: per patch ``{"boxes": [D, 2*dim], "scores": [D], "labels": [D]}`` (0-based labels).
        targets: per patch ``{"boxes": [G, 2*dim], "labels": [G]}``.
        classes: class names (or their count / the dataset's label dict).

    Returns:
        e.g. ``mAP_IoU_0.10_0.50_0.05_MaxDet_100``, ``AP_IoU_0.10_MaxDet_100``, per class
        ``<name>_AP_IoU_0.10_MaxDet_100``; NaN-free (metrics MONAI leaves undefined are dropped).
    """
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    names = _class_names(classes)
    coco = COCOMetric(classes=names, iou_list=(0.1, 0.5), iou_range=(0.1, 0.5, 0.05), max_detection=(100,),
                      verbose=False)
    results = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=coco.iou_thresholds,
        pred_boxes=[np.asarray(d["boxes"], dtype=np.float32) for d in detections],
        pred_classes=[np.asarray(d["labels"]).astype(int) for d in detections],
        pred_scores=[np.asarray(d["scores"], dtype=np.float32) for d in detections],
        gt_boxes=[np.asarray(t["boxes"], dtype=np.float32) for t in targets],
        gt_classes=[np.asarray(t["labels"]).astype(int) for t in targets],
        max_detections=100,
    )
    raw = {k: float(v) for k, v in coco(results)[0].items()}
    # Class means over the classes that have a box in these patches only. MONAI (like nnDetection's
    # evaluator) lets a class without ground truth enter the mean as -1 or 0 (0 when it has detections), which
    # over a handful of validation patches, where a class is often absent, would rank checkpoints by chance.
    present = {names[c] for t in targets for c in np.asarray(t["labels"]).astype(int).reshape(-1)}
    values = {k: v for k, v in raw.items() if np.isfinite(v) and v >= 0
              and not any(k.startswith(f"{n}_") for n in names if n not in present)}
    for key in {k[len(n) + 1:] for k in raw for n in names if k.startswith(f"{n}_")}:
        per_class = [values[f"{n}_{key}"] for n in names if n in present and f"{n}_{key}" in values]
        if per_class:
            values[key] = float(np.mean(per_class))
        else:
            values.pop(key, None)
    return values


# ------------------------------------------------------------------------------------------ fold data
def fold_data(task: str, plan_id: str, fold: int, data_root: str | os.PathLike | None = None,
              splits_file: str | os.PathLike | None = None, num_folds: int = 5) -> dict[str, Any]:
    """Preprocessed folder and the fold's cases (splits created once, or the user's file reused).

    Args:
        task: task folder name under ``data_root`` (e.g. ``Task000D3_Example``).
        plan_id: preprocessed data identifier (e.g. ``D3V001_3d``).
        fold: fold index (nnDetection ``-o exp.fold=X``).
        data_root: ``$det_data`` when None.
        splits_file: default ``<data_root>/<task>/preprocessed/splits_final.json``.

    Returns:
        ``{"preprocessed_dir": str, "splits_file": str, "train": [case ids], "val": [case ids]}``.
    """
    from planner import paths

    from .splits import fold_cases, load_or_create_splits

    root = Path(data_root) if data_root is not None else paths.det_data()
    pre = root / task / "preprocessed"
    images = pre / plan_id / "imagesTr"
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no preprocessed training data; run `nndet_prep {task}` first")
    cases = sorted(p.name[: -len(".json")] for p in images.glob("*.json"))
    if not cases:
        raise FileNotFoundError(f"{images}: no preprocessed cases; run `nndet_prep {task}` again")
    sf = Path(splits_file) if splits_file else pre / "splits_final.json"
    split = fold_cases(load_or_create_splits(sf, cases, num_folds=num_folds), int(fold), sf)
    if not split["val"]:
        raise ValueError(f"{sf}: fold {fold} has no validation cases; fix the splits file")
    return {"preprocessed_dir": str(pre / plan_id), "splits_file": str(sf), "train": split["train"],
            "val": split["val"]}


def read_train_log(output_dir: str | os.PathLike) -> list[dict]:
    """Entries of ``<output_dir>/train_log.json`` (empty if absent).

    Args:
        output_dir: the fold folder.
    """
    f = Path(output_dir) / "train_log.json"
    return json.loads(f.read_text()) if f.is_file() else []
