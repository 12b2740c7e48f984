"""Training glue for ``monai.engines`` (SPEC section 7): optimizer, LR schedule, iteration steps, SWA,
checkpoints, patch-level validation metrics, logs, curves and a progress bar.

``configs/train.json`` declares every object below; this module only holds the small pieces MONAI does
not have. Handler order in ``train#handlers`` matters on ``EPOCH_COMPLETED`` (validation -> SWA update ->
log/curves -> checkpoint), so the checkpoint of an epoch holds that epoch's validation metric and SWA state.

Determinism and resume: batches are a function of (seed, epoch) (``SamplerEpoch``), augmentation a function
of each sample's seed, and the global torch RNG (hard-negative sampling) is reseeded from (seed, iteration)
before every step, so a run resumed from ``model_last.pt`` continues exactly as the uninterrupted run.

Boxes are MONAI ``StandardMode`` (x1, y1, [z1,] x2, y2, [z2]) voxel boxes of the patch, half-open.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from planner.io import atomic_path, load_json, save_json

logger = logging.getLogger(__name__)

KEY_METRIC = "mAP_IoU_0.10_0.50_0.05_MaxDet_100"
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
    """Two SGD groups: ``weight_decay`` on conv/linear weights; none on norm-layer params and biases."""
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
    """SGD (Nesterov) with weight decay only on weights of non-norm layers (nnDetection's optimizer)."""
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
        warmup_iters: warmup steps (SPEC: 4000).
        poly_iters: steps until the SWA phase (SPEC: 50 epochs x 2500).
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
def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
    nb = device.type == "cuda"
    images = batch["image"].to(device, non_blocking=nb)
    seg = batch["seg"].to(device, non_blocking=nb)
    targets = [{k: v.to(device, non_blocking=nb) for k, v in t.items()} for t in batch["targets"]]
    return images, targets, seg


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")


class DetectionTrainStep:
    """``iteration_update`` of ``SupervisedTrainer``: one SGD step on the summed detector losses.

    Args:
        lr_scheduler: stepped after every optimizer step.
        scaler: ``torch.amp.GradScaler`` (disabled on CPU); AMP (float16 autocast) runs only on CUDA.
        amp: use autocast on CUDA.
        seed: the global torch RNG is reseeded from (seed, iteration) before each step.

    Returns (per step, in ``engine.state.output``): floats ``loss`` (sum), ``cls``, ``reg``, ``seg_ce``,
    ``seg_dice`` and ``lr`` (the rate this step used).
    """

    def __init__(self, lr_scheduler, scaler: torch.amp.GradScaler, amp: bool = True, seed: int = 0) -> None:
        self.lr_scheduler, self.scaler, self.amp, self.seed = lr_scheduler, scaler, amp, int(seed)
        self.nonfinite = 0

    def __call__(self, engine, batch: dict) -> dict[str, float]:
        torch.manual_seed(self.seed * 1_000_003 + int(engine.state.iteration))
        model, optimizer, device = engine.network, engine.optimizer, engine.state.device
        model.train()
        images, targets, seg = _to_device(batch, device)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, self.amp):
            losses = model(images, targets, seg)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
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
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}, "lr": lr}


class DetectionValStep:
    """``iteration_update`` of ``SupervisedEvaluator``: patch losses, detections and seg Dice counts.

    Returns per batch: float losses (``loss`` and parts), ``detections`` / ``targets`` (per image numpy
    ``boxes``, ``labels`` (+ ``scores``)), ``dice_counts`` = (intersection, predicted fg, true fg) voxels.
    """

    def __init__(self, amp: bool = True) -> None:
        self.amp = amp

    def __call__(self, engine, batch: dict) -> dict[str, Any]:
        model, device = engine.network, engine.state.device
        model.eval()
        images, targets, seg = _to_device(batch, device)
        captured: dict = {}
        hook = model.network.register_forward_hook(lambda m, i, o: captured.update(o))
        try:
            with torch.no_grad(), _autocast(device, self.amp):
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


class PatchDetectionMetrics:
    """Evaluator handler: collects :class:`DetectionValStep` outputs over an epoch, then writes
    ``val_loss`` (and parts), the COCO metrics and ``seg_dice`` into ``engine.state.metrics``."""

    def __init__(self, classes: Sequence[str] | dict | int) -> None:
        self.classes = classes

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._compute)

    def _reset(self, engine) -> None:
        self.dets, self.gts, self.losses, self.counts = [], [], {}, np.zeros(3)

    def _collect(self, engine) -> None:
        out = engine.state.output
        n = len(out["detections"])
        self.dets += out["detections"]
        self.gts += out["targets"]
        for k in ("loss", "cls", "reg", "seg_ce", "seg_dice"):
            if k in out:
                s, c = self.losses.get(k, (0.0, 0))
                self.losses[k] = (s + out[k] * n, c + n)
        self.counts += np.asarray(out["dice_counts"])

    def _compute(self, engine) -> None:
        metrics = {f"val_{'loss' if k == 'loss' else k + '_loss'}": s / max(c, 1)
                   for k, (s, c) in self.losses.items()}
        metrics.update(patch_detection_metrics(self.dets, self.gts, self.classes))
        inter, pred, true = self.counts
        metrics["seg_dice"] = float(2 * inter / (pred + true)) if pred + true > 0 else 1.0
        engine.state.metrics.update(metrics)


# ------------------------------------------------------------------------------------------ handlers
class SamplerEpoch:
    """Trainer handler: before each epoch, sets the training batch sampler to that epoch (0-based) so the
    batches of epoch ``e`` are the same whether the run started at 0 or resumed at ``e``."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        sampler = getattr(self.loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(engine.state.epoch - 1)


class SWAHandler:
    """Stochastic weight averaging (torch's ``swa_utils``): after each epoch ``> start_epoch`` the network
    weights are added to ``swa_model``; at the end of training the average replaces the network weights
    (which ``CheckpointHandler`` then saves as ``model_last.pt``). The lr cycle is in :class:`LinearWarmupPoly`.

    Args:
        swa_model: ``torch.optim.swa_utils.AveragedModel`` of ``network``.
        network: the trained module.
        start_epoch: epochs before SWA (SPEC: 50); ``swa_epochs == 0`` means no averaging.
    """

    def __init__(self, swa_model, network: nn.Module, start_epoch: int) -> None:
        self.swa_model, self.network, self.start_epoch = swa_model, network, int(start_epoch)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self.update)
        engine.add_event_handler(Events.COMPLETED, self.apply)

    def update(self, engine) -> None:
        if engine.state.epoch > self.start_epoch:
            self.swa_model.update_parameters(self.network)
            logger.info("SWA: epoch %d averaged (%d snapshots)", engine.state.epoch, int(self.swa_model.n_averaged))

    def apply(self, engine) -> None:
        if engine.state.epoch >= engine.state.max_epochs and int(self.swa_model.n_averaged) > 0:
            self.network.load_state_dict(self.swa_model.module.state_dict())
            logger.info("SWA: final weights = average of %d epoch snapshots", int(self.swa_model.n_averaged))


def optional_tensorboard(log_dir: str | os.PathLike, **kwargs):
    """MONAI's ``TensorBoardStatsHandler`` when the ``tensorboard`` package is installed, else a handler that
    only logs that TensorBoard is off (``pip install tensorboard`` turns it on)."""
    if importlib.util.find_spec("tensorboard") is None:
        return _Off(f"TensorBoard logs off: the 'tensorboard' package is not installed (pip install tensorboard); "
                    f"metrics are still in train_log.json and training_curves.png under {Path(log_dir).parent}")
    from monai.handlers import TensorBoardStatsHandler

    return TensorBoardStatsHandler(log_dir=str(log_dir), **kwargs)


class _Off:
    def __init__(self, message: str) -> None:
        self.message = message

    def attach(self, engine) -> None:
        logger.info(self.message)


class ProgressBar:
    """Trainer handler: one tqdm bar over all iterations of the run (resumed runs start where they were),
    with the running loss, epoch and tqdm's ETA."""

    def __init__(self, smoothing: float = 0.05, disable: bool | None = None) -> None:
        self.smoothing, self.disable, self.bar, self.ema = smoothing, disable, None, None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        engine.add_event_handler(Events.COMPLETED, self._close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, lambda e, exc: self._close(e))

    def _step(self, engine) -> None:
        from tqdm.auto import tqdm

        s = engine.state
        if self.bar is None:
            total = s.max_epochs * s.epoch_length
            self.bar = tqdm(total=total, initial=s.iteration - 1, desc="train", unit="it", disable=self.disable,
                            dynamic_ncols=True, smoothing=self.smoothing)
        loss = s.output["loss"]
        if math.isfinite(loss):
            self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        self.bar.set_postfix(epoch=f"{s.epoch}/{s.max_epochs}", loss=f"{self.ema or float('nan'):.3f}", refresh=False)
        self.bar.update(1)

    def _close(self, engine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainingLog:
    """Trainer handler: per epoch, mean training losses, lr, time and the validator's metrics appended to
    ``<output_dir>/train_log.json`` and plotted to ``training_curves.png`` (both written atomically).

    A resumed run keeps the entries of the epochs before the one it starts.
    """

    def __init__(self, output_dir: str | os.PathLike, validator=None, key_metric: str = KEY_METRIC) -> None:
        self.dir, self.validator, self.key_metric = Path(output_dir), validator, key_metric
        self.sums: dict[str, float] = {}
        self.count, self.start, self.entries = 0, None, None

    @property
    def log_file(self) -> Path:
        return self.dir / "train_log.json"

    @property
    def curves_file(self) -> Path:
        return self.dir / "training_curves.png"

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine) -> None:
        self.sums, self.count, self.start = {}, 0, time.time()

    def _collect(self, engine) -> None:
        for k, v in engine.state.output.items():
            if k != "lr" and math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def _write(self, engine) -> None:
        epoch = engine.state.epoch
        if self.entries is None:
            old = load_json(self.log_file) if self.log_file.is_file() else []
            self.entries = [e for e in old if e.get("epoch", 0) < epoch]
        entry: dict[str, Any] = {"epoch": epoch, "iteration": int(engine.state.iteration),
                                 "lr": float(engine.optimizer.param_groups[0]["lr"]),
                                 "time_s": round(time.time() - (self.start or time.time()), 2)}
        entry.update({f"train_{k}" if k == "loss" else f"train_{k}_loss": v / max(self.count, 1)
                      for k, v in self.sums.items()})
        if self.validator is not None:
            entry.update({k: float(v) for k, v in self.validator.state.metrics.items()
                          if isinstance(v, (int, float))})
        self.entries.append(entry)
        save_json(self.entries, self.log_file)
        plot_training_curves(self.entries, self.curves_file, self.key_metric)
        logger.info("epoch %d/%d: %s", epoch, engine.state.max_epochs, ", ".join(
            f"{k}={entry[k]:.4f}" for k in ("train_loss", "val_loss", self.key_metric, "AP_IoU_0.10_MaxDet_100",
                                            "seg_dice") if k in entry))


def plot_training_curves(entries: Sequence[dict], path: str | os.PathLike, key_metric: str = KEY_METRIC) -> Path:
    """PNG with train/val loss (left axis) and val mAP / AP@0.1 / Dice (right axis) per epoch (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    epochs = [e["epoch"] for e in entries]
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        ax.plot(epochs, [e.get(key, np.nan) for e in entries], style, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    for key, color in ((key_metric, "tab:green"), ("AP_IoU_0.10_MaxDet_100", "tab:olive"), ("seg_dice", "tab:red")):
        ax2.plot(epochs, [e.get(key, np.nan) for e in entries], ":", color=color, marker=".", label=key)
    ax2.set_ylabel("validation metric")
    ax2.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="center right", fontsize=7, ncol=1, framealpha=0.8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)


class CheckpointHandler:
    """Trainer handler: ``model_last.pt`` after every epoch and at the end, ``model_best.pt`` when the
    validator's ``key_metric`` improves, and resume from ``model_last.pt`` at start.

    Files hold only tensors and plain values (``torch.load(weights_only=True)`` works):
    ``model_last.pt`` = ``{"network", "optimizer", "lr_scheduler", "scaler", "swa_model", ... (every entry of
    ``save_dict``), "epoch", "iteration", "best_metric", "best_epoch", "key_metric", "finished"}``; after the
    last epoch its ``network`` holds the SWA-averaged weights. ``model_best.pt`` = ``{"network", "epoch",
    "key_metric", "metric"}``. Writes are atomic.

    Args:
        output_dir: the fold folder.
        save_dict: name -> object with ``state_dict`` / ``load_state_dict`` (must include ``network``).
        validator: evaluator whose ``state.metrics[key_metric]`` ranks checkpoints (None: no best file).
        key_metric: metric name (higher is better).
        resume: load ``model_last.pt`` at start if it exists.
    """

    def __init__(self, output_dir: str | os.PathLike, save_dict: dict[str, Any], validator=None,
                 key_metric: str = KEY_METRIC, resume: bool = True) -> None:
        self.dir, self.save_dict, self.validator = Path(output_dir), dict(save_dict), validator
        self.key_metric, self.resume = key_metric, bool(resume)
        self.best_metric, self.best_epoch = -math.inf, -1

    @property
    def last_file(self) -> Path:
        return self.dir / "model_last.pt"

    @property
    def best_file(self) -> Path:
        return self.dir / "model_best.pt"

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_epoch)
        engine.add_event_handler(Events.COMPLETED, self.save_last)

    def load(self, engine) -> None:
        if not (self.resume and self.last_file.is_file()):
            return
        ckpt = torch.load(self.last_file, map_location="cpu", weights_only=True)
        for name, obj in self.save_dict.items():
            if name in ckpt:
                obj.load_state_dict(ckpt[name])
            else:
                logger.warning("%s has no '%s' state: starting it fresh", self.last_file, name)
        engine.state.epoch, engine.state.iteration = int(ckpt["epoch"]), int(ckpt["iteration"])
        self.best_metric, self.best_epoch = float(ckpt.get("best_metric", -math.inf)), int(ckpt.get("best_epoch", -1))
        logger.info("resumed from %s at epoch %d (iteration %d)", self.last_file, engine.state.epoch,
                    engine.state.iteration)

    def _save(self, obj: dict, path: Path) -> None:
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(obj, tmp)

    def save_epoch(self, engine) -> None:
        metric = None if self.validator is None else self.validator.state.metrics.get(self.key_metric)
        if metric is not None and float(metric) > self.best_metric:
            self.best_metric, self.best_epoch = float(metric), int(engine.state.epoch)
            self._save({"network": self.save_dict["network"].state_dict(), "epoch": self.best_epoch,
                        "key_metric": self.key_metric, "metric": self.best_metric}, self.best_file)
            logger.info("new best %s=%.4f at epoch %d: %s", self.key_metric, self.best_metric, self.best_epoch,
                        self.best_file)
        self.save_last(engine, finished=False)

    def save_last(self, engine, finished: bool | None = None) -> None:
        if finished is None:
            finished = engine.state.epoch >= engine.state.max_epochs
        state = {name: obj.state_dict() for name, obj in self.save_dict.items()}
        state.update(epoch=int(engine.state.epoch), iteration=int(engine.state.iteration),
                     best_metric=self.best_metric, best_epoch=self.best_epoch, key_metric=self.key_metric,
                     finished=bool(finished))
        self._save(state, self.last_file)


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
    """Entries of ``<output_dir>/train_log.json`` (empty if absent)."""
    f = Path(output_dir) / "train_log.json"
    return json.loads(f.read_text()) if f.is_file() else []
