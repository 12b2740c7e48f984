"""DDP pieces without a process group: batch split, validation split and gather, seeds, rank-0-only files."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from torch import nn

from bundles.retinaunet_template.scripts import distributed, handlers
from bundles.retinaunet_template.scripts.data import FixedBatchSampler, OversamplingBatchSampler
from bundles.retinaunet_template.scripts.handlers import FoldCheckpoint, PatchDetectionMetrics
from bundles.retinaunet_template.scripts.trainer import step_seed

INSTANCES = [(c, k) for c in range(5) for k in range(c % 3)]


def _batches(batch_size, rank=0, world=1, epoch=3, seed=7):
    s = OversamplingBatchSampler(5, INSTANCES, batch_size, num_batches=6, oversample_foreground=0.5, seed=seed,
                                 rank=rank, world_size=world)
    s.set_epoch(epoch)
    return list(s)


@pytest.mark.parametrize("batch_size,world", [(4, 2), (6, 3), (2, 2), (8, 4)])
def test_rank_shares_are_the_single_process_batch(batch_size, world):
    single = _batches(batch_size)
    shards = [_batches(batch_size, r, world) for r in range(world)]
    for i, batch in enumerate(single):
        parts = [s[i] for s in shards]
        assert all(len(p) == batch_size // world for p in parts)
        merged = [parts[j % world][j // world] for j in range(batch_size)]
        assert merged == batch  # same requests (mode, case, instance, seed) in the same places
    # every rank gets random and foreground patches alike (strided, not halves)
    assert all({m for m, *_ in s[0]} == {"random", "fg"} for s in shards if batch_size // world >= 2)


def test_a_batch_that_does_not_split_grows_to_a_multiple_of_the_ranks():
    assert (distributed.per_rank_batch(4, 3), distributed.global_batch(4, 3)) == (2, 6)
    assert (distributed.per_rank_batch(2, 8), distributed.global_batch(2, 8)) == (1, 8)
    shards = [_batches(5, r, 2) for r in range(2)]
    assert all(len(b) == 3 for s in shards for b in s)
    assert [len(b) for b in _batches(5)] == [5] * 6  # one process: the plan's batch, as before
    with pytest.raises(ValueError, match="rank 2"):
        OversamplingBatchSampler(5, INSTANCES, 4, 6, rank=2, world_size=2)


def test_resumed_epoch_is_the_same_for_any_world_size():
    # epoch 3 of a run with 2 ranks holds the patches epoch 3 of a single-process run would
    two = [_batches(4, r, 2, epoch=3) for r in range(2)]
    one = _batches(4, epoch=3)
    assert sorted(sum((b for s in two for b in s), [])) == sorted(sum(one, []))
    assert _batches(4, epoch=3) != _batches(4, epoch=4)


def _val_outputs(requests):
    """Fake DetectionValStep outputs: one 'patch' per request, tagged by its place in the full list."""
    return [{"loss": float(i), "detections": [{"tag": i}], "targets": [{"tag": i}], "dice_counts": [i, 1, 1]}
            for i in requests]


def _metrics_over(outputs, monkeypatch, captured):
    m = PatchDetectionMetrics(classes=["a"])
    monkeypatch.setattr(handlers, "patch_detection_metrics",
                        lambda dets, gts, classes: captured.update(dets=dets, gts=gts) or {})
    m._reset(None)
    for out in outputs:
        m._collect(SimpleNamespace(state=SimpleNamespace(output=out)))
    return m


def test_validation_split_over_ranks_is_gathered_back_in_order(monkeypatch):
    full = FixedBatchSampler(4, [(0, 0), (1, 0), (1, 1), (3, 0)], batch_size=3)
    flat = [r for b in full for r in b]
    world = 3
    shards = [FixedBatchSampler(4, [(0, 0), (1, 0), (1, 1), (3, 0)], 3, r, world) for r in range(world)]
    assert sorted(r for s in shards for b in s for r in b) == sorted(flat)  # every patch once
    # each rank's metric handler holds its share; the gather restores the single-process order and sums
    index = {req: i for i, req in enumerate(flat)}
    per_rank = []
    for s in shards:
        captured: dict = {}
        m = _metrics_over(_val_outputs([index[r] for b in s for r in b]), monkeypatch, captured)
        per_rank.append((m.dets, m.gts, m.losses, m.counts))
    final: dict = {}
    m = _metrics_over(_val_outputs([index[r] for b in shards[0] for r in b]), monkeypatch, final)
    monkeypatch.setattr(distributed, "all_gather", lambda obj: per_rank)
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}))
    m._compute(engine)
    assert [d["tag"] for d in final["dets"]] == list(range(len(flat)))
    assert engine.state.metrics["val_loss"] == pytest.approx(np.mean(range(len(flat))))
    assert engine.state.metrics["seg_dice"] == pytest.approx(2 * sum(range(len(flat))) / (2 * len(flat)))


def test_too_few_validation_patches_for_the_ranks_is_an_error():
    with pytest.raises(ValueError, match="2 validation patches cannot be shared by 3 processes"):
        FixedBatchSampler(2, [], batch_size=2, rank=0, world_size=3)


def test_step_seed_of_rank_zero_is_the_single_process_seed():
    assert step_seed(3, 17) == 3 * 1_000_003 + 17  # unchanged for one process: old runs resume identically
    seeds = {step_seed(3, it, r) for it in range(1, 50) for r in range(8)}
    assert len(seeds) == 49 * 8


def test_without_a_process_group_everything_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    net = nn.Linear(2, 2)
    assert distributed.wrap(net, torch.device("cpu")) is net and distributed.unwrap(net) is net
    assert distributed.mean_over_ranks({"a": 1.5}) == {"a": 1.5}
    assert distributed.all_true(False) is False and distributed.all_gather(3) == [3]
    monkeypatch.setenv("RANK", "2")  # torchrun's environment before the group exists
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (2, 4, False)
    with pytest.raises(RuntimeError, match="torchrun"):
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        distributed.init()


def test_checkpoint_of_a_rank_other_than_zero_writes_nothing_but_tracks_progress(tmp_path):
    net = nn.Linear(1, 1)
    validator = SimpleNamespace(state=SimpleNamespace(metrics={handlers.KEY_METRIC: 0.5}))
    ckpt = FoldCheckpoint(tmp_path / "fold0", {"network": net}, validator, write=False)
    engine = Engine(lambda e, b: {"loss": 1.0})
    ckpt.attach(engine)
    engine.run(range(2), max_epochs=2)
    assert not list((tmp_path / "fold0").glob("*"))
    assert (ckpt.best_metric, ckpt.best_epoch) == (0.5, 1)
    writer = FoldCheckpoint(tmp_path / "main", {"network": net}, validator, write=True)
    writer.attach(engine2 := Engine(lambda e, b: {"loss": 1.0}))
    engine2.run(range(2), max_epochs=1)
    assert {p.name for p in (tmp_path / "main").iterdir()} == {"model_last.pt", "model_best.pt"}
