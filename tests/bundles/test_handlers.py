"""Handlers of scripts/handlers.py on a bare ignite engine: checkpoint files, best-metric resume, SWA, bar."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from torch import nn

from bundles.retinaunet_template.scripts.handlers import (
    KEY_METRIC,
    FoldCheckpoint,
    RunProgressBar,
    SWAHandler,
)

ITERS = 3


def _run(out, metrics: list[float], max_epochs: int, stop_after: int | None = None, swa_start: int | None = None):
    """A trainer whose network weight equals the iteration count and whose 'validation' yields ``metrics``."""
    net = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    validator = SimpleNamespace(state=SimpleNamespace(metrics={}))

    def step(engine, batch):
        with torch.no_grad():
            net.weight.fill_(float(engine.state.iteration))
        return {"loss": 1.0 / engine.state.iteration}

    engine = Engine(step)
    engine.add_event_handler(Events.EPOCH_COMPLETED,
                             lambda e: validator.state.metrics.update({KEY_METRIC: metrics[e.state.epoch - 1]}))
    save_dict = {"network": net, "optimizer": opt}
    if swa_start is not None:
        swa = torch.optim.swa_utils.AveragedModel(net, use_buffers=True)
        SWAHandler(swa, net, start_epoch=swa_start).attach(engine)
        save_dict["swa_model"] = swa
    ckpt = FoldCheckpoint(out, save_dict, validator)
    if ckpt.last_file.is_file():
        CheckpointLoader(str(ckpt.last_file), ckpt.load_dict, map_location="cpu").attach(engine)
    ckpt.attach(engine)
    if stop_after is not None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
    engine.run(range(ITERS), max_epochs=max_epochs)
    return engine, ckpt


def test_checkpoints_load_weights_only_and_best_survives_a_resume(tmp_path):
    metrics = [0.2, 0.5, 0.4, 0.45]  # best at epoch 2; epochs 3 and 4 are worse, but better than nothing
    engine, ckpt = _run(tmp_path, metrics, max_epochs=4, stop_after=2)
    last = torch.load(ckpt.last_file, weights_only=True)
    assert set(last) == {"network", "optimizer", "progress", "epoch", "iteration", "finished"}
    assert (last["epoch"], last["iteration"], last["finished"]) == (2, 2 * ITERS, False)
    assert last["progress"] == {"epoch": 2, "iteration": 2 * ITERS, "finished": False, "best_metric": 0.5,
                                "best_epoch": 2, "key_metric": KEY_METRIC}
    best = torch.load(ckpt.best_file, weights_only=True)
    assert set(best) == {"network", "epoch", "key_metric", "metric"} and best["epoch"] == 2

    engine, ckpt = _run(tmp_path, metrics, max_epochs=4)
    assert engine.state.epoch == 4 and engine.state.iteration == 4 * ITERS
    best = torch.load(ckpt.best_file, weights_only=True)
    # the resumed run knew the best so far: epochs 3 and 4 did not replace epoch 2's weights
    assert (best["epoch"], best["metric"], best["key_metric"]) == (2, 0.5, KEY_METRIC)
    assert float(best["network"]["weight"]) == 2 * ITERS
    last = torch.load(ckpt.last_file, weights_only=True)
    assert last["finished"] and (last["epoch"], last["iteration"]) == (4, 4 * ITERS)
    assert float(last["network"]["weight"]) == 4 * ITERS
    assert last["progress"]["best_epoch"] == 2


def test_best_follows_the_key_metric_and_skips_epochs_without_it(tmp_path):
    _run(tmp_path / "up", [0.1, 0.3, 0.2], max_epochs=3)
    assert torch.load(tmp_path / "up" / "model_best.pt", weights_only=True)["epoch"] == 2
    # an epoch whose validation has no key metric (no boxes) ranks nothing and does not fail
    engine, ckpt = _run(tmp_path / "none", [0.1, 0.3, 0.2], max_epochs=3, stop_after=1)
    ckpt.validator.state.metrics.clear()
    ckpt.epoch_completed(engine)
    assert torch.load(ckpt.best_file, weights_only=True)["metric"] == pytest.approx(0.1)


def test_model_last_after_the_last_epoch_holds_the_swa_average(tmp_path):
    # weights after epochs 1..3 are 3, 6, 9; SWA averages epochs 2 and 3
    _, ckpt = _run(tmp_path, [0.1, 0.2, 0.3], max_epochs=3, swa_start=1)
    last = torch.load(ckpt.last_file, weights_only=True)
    assert last["finished"] and int(last["swa_model"]["n_averaged"]) == 2
    assert float(last["network"]["weight"]) == pytest.approx((6 + 9) / 2)
    # model_best holds the weights validated at epoch 3, before the average replaced them
    assert float(torch.load(ckpt.best_file, weights_only=True)["network"]["weight"]) == 9


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    engine, ckpt = _run(tmp_path, [0.1, 0.2], max_epochs=2)
    before = torch.load(ckpt.last_file, weights_only=True)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_last(finished=True)
    monkeypatch.undo()
    after = torch.load(ckpt.last_file, weights_only=True)
    assert after["iteration"] == before["iteration"] and after["finished"] == before["finished"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best.pt", "model_last.pt"]


def test_progress_bar_spans_the_run_and_starts_where_a_resume_does(capsys):
    engine = Engine(lambda e, b: {"loss": 0.5})
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "iteration", 4) or setattr(e.state, "epoch", 2))
    RunProgressBar(disable=False).attach(engine)
    engine.run(range(2), max_epochs=4)
    err = capsys.readouterr().err
    assert "8/8" in err and "epoch=4/4" in err and "loss=0.500" in err
    assert "| 4/8" in err and "| 0/8" not in err  # resumed after iteration 4 of 8: one bar for all epochs
