"""Training and validation handlers MONAI and ignite lack: SWA, checkpoints, logs, curves, patch metrics.

``configs/train.json`` attaches them next to MONAI's ``ValidationHandler``, ``TensorBoardStatsHandler``,
``StatsHandler`` and ``CheckpointLoader``. Order in ``train#handlers`` matters on ``EPOCH_COMPLETED``
(validation -> SWA update -> log/curves -> checkpoint), so the checkpoint of an epoch holds that epoch's
validation metric and SWA state; on ``COMPLETED`` the SWA average is applied before ``model_last.pt`` is written.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Events
from torch import nn

from planner.io import apply_umask, atomic_path, load_json, save_json

from . import distributed
from .trainer import patch_detection_metrics

logger = logging.getLogger(__name__)

KEY_METRIC = "mAP_IoU_0.10_0.50_0.05_MaxDet_100"
LAST_FILE, BEST_FILE = "model_last.pt", "model_best.pt"


# ------------------------------------------------------------------------------------------- trainer
class SamplerEpoch:
    """Trainer handler: sets the training batch sampler to each epoch (0-based) before it starts.

    The batches of epoch ``e`` are then the same whether the run started at 0 or resumed at ``e``.

    Args:
        loader: training ``DataLoader`` whose ``batch_sampler`` has ``set_epoch``.
    """

    # ours: MONAI's workflow only calls set_epoch on a DistributedSampler (``loader.sampler``), not a batch sampler

    def __init__(self, loader) -> None:
        self.loader = loader

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        sampler = getattr(self.loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(engine.state.epoch - 1)


class SWAHandler:
    """Trainer handler: stochastic weight averaging with torch's ``swa_utils``.

    After each epoch ``> start_epoch`` the network weights are added to ``swa_model``; at the end of
    training the average replaces the network weights (which :class:`FoldCheckpoint` then saves as
    ``model_last.pt``). The lr cycle is in ``scripts.trainer.LinearWarmupPoly``.

    Args:
        swa_model: ``torch.optim.swa_utils.AveragedModel`` of ``network``.
        network: the trained module.
        start_epoch: epochs before SWA (nnDetection: 50); ``swa_epochs == 0`` means no averaging.
    """

    # ours: neither MONAI nor ignite has an SWA handler (ignite's EMAHandler is exponential, not an equal mean)

    def __init__(self, swa_model, network: nn.Module, start_epoch: int) -> None:
        self.swa_model, self.network, self.start_epoch = swa_model, network, int(start_epoch)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.update)
        engine.add_event_handler(Events.COMPLETED, self.apply)

    def update(self, engine) -> None:
        """Add this epoch's weights to the average (epochs after ``start_epoch`` only)."""
        if engine.state.epoch > self.start_epoch:
            self.swa_model.update_parameters(self.network)
            logger.info("SWA: epoch %d averaged (%d snapshots)", engine.state.epoch, int(self.swa_model.n_averaged))

    def apply(self, engine) -> None:
        """Copy the average into the network, only when training reached its last epoch."""
        if engine.state.epoch >= engine.state.max_epochs and int(self.swa_model.n_averaged) > 0:
            self.network.load_state_dict(self.swa_model.module.state_dict())
            logger.info("SWA: final weights = average of %d epoch snapshots", int(self.swa_model.n_averaged))


class RunProgressBar:
    """Trainer handler: one tqdm bar over all iterations of the run, with the running loss and epoch.

    A resumed run starts the bar where it stopped, so tqdm's ETA is the time to the end of training.

    Args:
        smoothing: tqdm's rate smoothing.
        disable: tqdm's ``disable`` (None: off when not writing to a terminal).
    """

    # ours: ignite's ProgressBar is one bar per epoch (total = epoch_length), so it has no ETA for the whole run

    def __init__(self, smoothing: float = 0.05, disable: bool | None = None) -> None:
        self.smoothing, self.disable, self.bar, self.ema = smoothing, disable, None, None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        engine.add_event_handler(Events.COMPLETED, self._close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, lambda e, exc: self._close(e))

    def _step(self, engine) -> None:
        from tqdm.auto import tqdm

        s = engine.state
        if self.bar is None:
            self.bar = tqdm(total=s.max_epochs * s.epoch_length, initial=s.iteration - 1, desc="train", unit="it",
                            disable=self.disable, dynamic_ncols=True, smoothing=self.smoothing)
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
    """Trainer handler: per epoch, appends the mean training losses, lr, time and the validator's metrics to
    ``<output_dir>/train_log.json`` and plots them to ``training_curves.png`` (both written atomically).

    A resumed run keeps the entries of the epochs before the one it starts.

    Args:
        output_dir: the fold folder.
        validator: evaluator whose ``state.metrics`` go into each entry (None: training values only).
        key_metric: the metric plotted and logged first.
    """

    # ours: MONAI has no JSON epoch log holding the validation metrics next to the training losses

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
    """Plot train/val loss (left axis) and val mAP / AP@0.1 / Dice (right axis) per epoch to a PNG.

    Args:
        entries: ``train_log.json`` entries.
        path: the PNG (written atomically).
        key_metric: the validation metric drawn first.

    Returns:
        ``path``.
    """
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


class FoldCheckpoint:
    """Trainer handler: ``model_last.pt`` after every epoch and at the end, ``model_best.pt`` whenever the
    validator's ``key_metric`` improves; resume is MONAI's ``CheckpointLoader`` with :attr:`load_dict`.

    Files hold only tensors and plain values (``torch.load(weights_only=True)`` works) and are written
    atomically by ignite's ``DiskSaver``:

    * ``model_last.pt``: each ``save_dict`` entry's ``state_dict()``; ``"progress"`` = this handler's
      :meth:`state_dict` (``epoch``, ``iteration``, ``finished``, ``best_metric``, ``best_epoch``,
      ``key_metric``), what ``CheckpointLoader`` gives back to :meth:`load_state_dict`; and ``epoch``,
      ``iteration``, ``finished`` (True only after the final epoch) again at the top level for readers. After
      the last epoch its ``network`` holds the SWA-averaged weights.
    * ``model_best.pt``: ``{"network", "epoch", "key_metric", "metric"}``.

    Args:
        output_dir: the fold folder.
        save_dict: name -> object with ``state_dict`` / ``load_state_dict`` (must include ``network``).
        validator: evaluator whose ``state.metrics[key_metric]`` ranks checkpoints (None: no best file).
        key_metric: metric name (higher is better).
        write: write the files (False on DDP ranks other than 0: they still track the best metric and give
            ``CheckpointLoader`` the progress to resume from).
    """

    # ours, written with ignite's atomic DiskSaver: MONAI's CheckpointSaver saves with DiskSaver(atomic=False)
    # after deleting the previous file, can keep a fixed name only for the final and best files (not per epoch),
    # stores only state_dict() entries (no plain epoch/finished keys) and fails on epochs without the key metric

    def __init__(self, output_dir: str | os.PathLike, save_dict: dict[str, Any], validator=None,
                 key_metric: str = KEY_METRIC, write: bool = True) -> None:
        from ignite.handlers import DiskSaver

        if "network" not in save_dict:
            raise ValueError(f"save_dict needs a 'network' entry, got {sorted(save_dict)}")
        self.dir, self.save_dict, self.validator = Path(output_dir), dict(save_dict), validator
        self.key_metric, self.best_metric, self.best_epoch = key_metric, -math.inf, -1
        self.write = bool(write)
        # made on every rank: under torch.distributed ignite's first rank query is a collective (a new group);
        # ignite checks and creates the folder on rank 0 only
        self.saver = DiskSaver(self.dir, atomic=True, create_dir=True, require_empty=False)
        self.engine = None

    @property
    def last_file(self) -> Path:
        return self.dir / LAST_FILE

    @property
    def best_file(self) -> Path:
        return self.dir / BEST_FILE

    @property
    def load_dict(self) -> dict[str, Any]:
        """``CheckpointLoader``'s ``load_dict`` for ``model_last.pt``: ``save_dict`` and ``progress``."""
        return {**self.save_dict, "progress": self}

    def attach(self, engine) -> None:
        self.engine = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def state_dict(self, finished: bool = False) -> dict[str, Any]:
        """The run's progress: trainer epoch and iteration, ``finished``, best metric so far and its epoch."""
        s = self.engine.state
        return {"epoch": int(s.epoch), "iteration": int(s.iteration), "finished": bool(finished),
                "best_metric": float(self.best_metric), "best_epoch": int(self.best_epoch),
                "key_metric": self.key_metric}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved epoch and iteration, with the saved best metric (called by ``CheckpointLoader``)."""
        if self.engine is None:
            raise RuntimeError("FoldCheckpoint must be attached to the trainer before CheckpointLoader runs")
        if state.get("key_metric", self.key_metric) != self.key_metric:
            logger.warning("%s ranked checkpoints by %s, this run by %s: best metric starts over", self.last_file,
                           state["key_metric"], self.key_metric)
        else:
            self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        self.engine.state.epoch, self.engine.state.iteration = int(state["epoch"]), int(state["iteration"])
        logger.info("resumed from %s at epoch %d (iteration %d), best %s=%.4f at epoch %d", self.last_file,
                    self.engine.state.epoch, self.engine.state.iteration, self.key_metric, self.best_metric,
                    self.best_epoch)

    def epoch_completed(self, engine) -> None:
        """Write ``model_best.pt`` if the key metric improved, then ``model_last.pt``."""
        metric = None if self.validator is None else self.validator.state.metrics.get(self.key_metric)
        if metric is not None and float(metric) > self.best_metric:
            self.best_metric, self.best_epoch = float(metric), int(engine.state.epoch)
            if self.write:
                self.saver({"network": self.save_dict["network"].state_dict(), "epoch": self.best_epoch,
                            "key_metric": self.key_metric, "metric": self.best_metric}, BEST_FILE)
                apply_umask(self.best_file)  # ignite makes it 0600 | group/other read, whatever the umask
                logger.info("new best %s=%.4f at epoch %d: %s", self.key_metric, self.best_metric,
                            self.best_epoch, self.best_file)
        self.save_last(finished=False)

    def completed(self, engine) -> None:
        """Write the final ``model_last.pt`` (``finished`` when the last epoch was reached)."""
        self.save_last(finished=engine.state.epoch >= engine.state.max_epochs)

    def save_last(self, finished: bool) -> None:
        if not self.write:
            return
        progress = self.state_dict(finished)
        state = {name: obj.state_dict() for name, obj in self.save_dict.items()}
        state.update(progress=progress, epoch=progress["epoch"], iteration=progress["iteration"],
                     finished=progress["finished"])
        self.saver(state, LAST_FILE)
        apply_umask(self.last_file)


# ---------------------------------------------------------------------------------------- evaluator
class PatchDetectionMetrics:
    """Evaluator handler: collects ``DetectionValStep`` outputs over an epoch, then writes ``val_loss`` (and
    parts), the COCO metrics (``scripts.trainer.patch_detection_metrics``) and ``seg_dice`` into
    ``engine.state.metrics``. Under DDP the patches of every rank are gathered first, so every rank holds the
    metrics of the whole validation set (a collective: all ranks validate).

    Args:
        classes: class names (or their count / the dataset's label dict).
    """

    # ours: MONAI's detection metrics are functions (COCOMetric, matching_batch), not an ignite metric or handler

    def __init__(self, classes: Sequence[str] | dict | int) -> None:
        self.classes = classes

    def attach(self, engine) -> None:
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

    def _gather(self) -> None:
        """Under DDP: every rank's patches, back in the single-process order (rank r held patches r::N)."""
        parts = distributed.all_gather((self.dets, self.gts, self.losses, self.counts))
        if len(parts) == 1:
            return
        n = sum(len(p[0]) for p in parts)
        world = len(parts)
        self.dets = [parts[i % world][0][i // world] for i in range(n)]
        self.gts = [parts[i % world][1][i // world] for i in range(n)]
        losses: dict[str, tuple[float, int]] = {}
        for p in parts:
            for k, (s, c) in p[2].items():
                s0, c0 = losses.get(k, (0.0, 0))
                losses[k] = (s0 + s, c0 + c)
        self.losses, self.counts = losses, sum(p[3] for p in parts)

    def _compute(self, engine) -> None:
        self._gather()
        metrics = {f"val_{'loss' if k == 'loss' else k + '_loss'}": s / max(c, 1)
                   for k, (s, c) in self.losses.items()}
        metrics.update(patch_detection_metrics(self.dets, self.gts, self.classes))
        inter, pred, true = self.counts
        metrics["seg_dice"] = float(2 * inter / (pred + true)) if pred + true > 0 else 1.0
        engine.state.metrics.update(metrics)
