"""Training glue: optimizer groups, LR schedule, SWA, patch metrics, checkpoints and exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bundles.retinaunet_template.scripts.detector import build_detector
from bundles.retinaunet_template.scripts.handlers import (
    KEY_METRIC,
    FoldCheckpoint,
    PatchDetectionMetrics,
    SamplerEpoch,
    SWAHandler,
    TrainingLog,
)
from bundles.retinaunet_template.scripts.trainer import (
    DetectionTrainStep,
    DetectionValStep,
    LinearWarmupPoly,
    build_optimizer,
    param_groups,
    patch_detection_metrics,
    scheduled_lr,
)
from tests.bundles.test_data import write_case

TINY = {"start_channels": 4, "max_channels": 8, "fpn_channels": 8, "head_channels": 8}


def tiny_detector(dim=3, num_classes=2):
    torch.manual_seed(0)
    sizes = [[[3, 5] for _ in range(dim)], [[6, 10] for _ in range(dim)]]
    return build_detector(dim, 1, num_classes, [[3] * dim] * 3, [[1] * dim, [2] * dim, [2] * dim], [1, 2],
                          sizes, **TINY)


# ----------------------------------------------------------------------------------- optimizer
def test_no_weight_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.GroupNorm(2, 4),
                          nn.Conv3d(4, 2, 1))
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=3e-5)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 3e-5 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(model[0].weight), id(model[3].weight)}
    assert ids(no_decay["params"]) == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                       id(model[2].weight), id(model[2].bias), id(model[3].bias)}
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_param_groups_cover_the_detector_once():
    det = tiny_detector()
    groups = param_groups(det, 1e-4)
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed)) == len(list(det.parameters()))
    norms = [m for m in det.modules() if isinstance(m, (nn.GroupNorm, nn.InstanceNorm3d))]
    assert norms, "the network has norm layers"
    no_decay = {id(p) for p in groups[1]["params"]}
    assert all(id(p) in no_decay for m in norms for p in m.parameters())
    decayed = {id(p) for p in groups[0]["params"]}
    # conv weights decay, and the per-level regression scales (not norm layers, as in nnDetection)
    assert all(p.ndim > 1 or n.endswith(".scale") for n, p in det.named_parameters() if id(p) in decayed)


# ---------------------------------------------------------------------------------- LR schedule
NNDET_SCHEDULE = {"base_lr": 0.01, "warmup_iters": 4000, "poly_iters": 50 * 2500, "iters_per_epoch": 2500}


def test_lr_warmup_linear_from_1e6_to_base():
    assert scheduled_lr(0, **NNDET_SCHEDULE) == pytest.approx(1e-6)
    assert scheduled_lr(2000, **NNDET_SCHEDULE) == pytest.approx((1e-6 + 0.01) / 2)
    assert scheduled_lr(4000, **NNDET_SCHEDULE) == pytest.approx(0.01)


def test_lr_poly_decay_after_warmup():
    # halfway through the poly phase: 0.01 * 0.5 ** 0.9
    mid = 4000 + (125000 - 4000) // 2
    assert scheduled_lr(mid, **NNDET_SCHEDULE) == pytest.approx(0.01 * 0.5**0.9, rel=1e-4)
    assert scheduled_lr(124999, **NNDET_SCHEDULE) == pytest.approx(0.01 * (1 / 121000) ** 0.9, rel=1e-6)
    values = [scheduled_lr(i, **NNDET_SCHEDULE) for i in range(4000, 125000, 5000)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_lr_swa_cycles_each_epoch_from_lr_over_10_to_lr_over_1000():
    for epoch in (50, 55, 59):
        start = epoch * 2500
        assert scheduled_lr(start, **NNDET_SCHEDULE) == pytest.approx(1e-3)
        assert scheduled_lr(start + 2499, **NNDET_SCHEDULE) == pytest.approx(1e-5)
        assert scheduled_lr(start + 1249.5, **NNDET_SCHEDULE) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-3)


def test_scheduler_sets_the_optimizer_lr_per_step():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = LinearWarmupPoly(opt, warmup_iters=10, poly_iters=30, iters_per_epoch=10)
    seen = []
    for _ in range(40):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-6) and seen[10] == pytest.approx(0.01)
    assert seen[20] == pytest.approx(0.01 * 0.5**0.9)
    assert seen[30] == pytest.approx(1e-3) and seen[39] == pytest.approx(1e-5)
    # the schedule state survives a weights-only round trip
    state = sched.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    sched2 = LinearWarmupPoly(opt2, warmup_iters=10, poly_iters=30, iters_per_epoch=10)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch


# -------------------------------------------------------------------------------------------- SWA
class _State:
    def __init__(self, epoch, max_epochs):
        self.epoch, self.max_epochs = epoch, max_epochs


class _Engine:
    def __init__(self, epoch, max_epochs):
        self.state = _State(epoch, max_epochs)


def test_swa_final_weights_are_the_mean_of_epoch_snapshots():
    net = nn.Linear(3, 2)
    swa = torch.optim.swa_utils.AveragedModel(net, use_buffers=True)
    handler = SWAHandler(swa, net, start_epoch=2)
    snapshots = []
    for epoch in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p))
        if epoch > 2:
            snapshots.append([p.detach().clone() for p in net.parameters()])
        handler.update(_Engine(epoch, 5))
    handler.apply(_Engine(5, 5))
    assert int(swa.n_averaged) == 3
    for p, *snaps in zip(net.parameters(), *snapshots, strict=True):
        torch.testing.assert_close(p.detach(), torch.stack(snaps).mean(0))


def test_swa_not_applied_when_training_stopped_early():
    net = nn.Linear(3, 2)
    swa = torch.optim.swa_utils.AveragedModel(net)
    handler = SWAHandler(swa, net, start_epoch=0)
    handler.update(_Engine(1, 5))
    with torch.no_grad():
        net.weight.add_(1.0)
    before = net.weight.detach().clone()
    handler.apply(_Engine(3, 5))
    torch.testing.assert_close(net.weight.detach(), before)


# ------------------------------------------------------------------------------------ patch metrics
def _box(*v):
    return np.asarray([v], dtype=np.float32)


def test_patch_metrics_perfect_none_and_missing_class():
    gts = [{"boxes": _box(2, 2, 2, 8, 8, 8), "labels": np.array([0])},
           {"boxes": np.zeros((0, 6), np.float32), "labels": np.zeros(0, int)}]
    perfect = [{"boxes": _box(2, 2, 2, 8, 8, 8), "scores": np.array([0.9]), "labels": np.array([0])},
               {"boxes": np.zeros((0, 6), np.float32), "scores": np.zeros(0), "labels": np.zeros(0, int)}]
    m = patch_detection_metrics(perfect, gts, ["a", "b"])  # class b has no box: mean over class a
    assert m[KEY_METRIC] == pytest.approx(1.0) and m["AP_IoU_0.10_MaxDet_100"] == pytest.approx(1.0)
    # shifted by 3 voxels: IoU = 3^3 / (2 * 6^3 - 3^3) = 0.067 < 0.1 -> a false positive and a miss
    wrong = [dict(perfect[0], boxes=_box(5, 5, 5, 11, 11, 11)), perfect[1]]
    assert patch_detection_metrics(wrong, gts, ["a", "b"])[KEY_METRIC] == pytest.approx(0.0)
    # false positives of class b, which has no box in these patches, next to two found boxes of class a: the
    # mean is class a's AP (it was 0.0, MONAI's mean of a's 1.0 and b's -1, found in a toy training run)
    two = [{"boxes": np.concatenate([_box(2, 2, 2, 8, 8, 8), _box(10, 10, 10, 14, 14, 14)]), "scores": np.array([0.9, 0.5]),
            "labels": np.array([0, 1])} for _ in range(2)]
    m = patch_detection_metrics(two, [gts[0], gts[0]], ["a", "b"])
    assert m[KEY_METRIC] == pytest.approx(1.0) and m["AP_IoU_0.10_MaxDet_100"] == pytest.approx(1.0)
    assert not any(k.startswith("b_") for k in m)


# --------------------------------------------------------------------------- resume (tiny workflow)
PATCH = (16, 16, 16)
EPOCHS, ITERS = 3, 3


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre") / "D3V001_3d" / "imagesTr"
    d.mkdir(parents=True)
    for i in range(4):
        lo = 3 + 2 * i
        write_case(d, f"c{i}", (20, 20, 20), [((lo, 4, 5), (lo + 6, 11, 12), i % 2)], seed=i)
    return d.parent


def _workflow(data, out, crash_after_epoch: int | None = None):
    from ignite.engine import Events
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import CheckpointLoader, ValidationHandler

    from bundles.retinaunet_template.scripts.data import make_train_loader, make_val_loader

    torch.manual_seed(123)
    det = tiny_detector()
    opt = build_optimizer(det, lr=0.01)
    sched = LinearWarmupPoly(opt, warmup_iters=2, poly_iters=(EPOCHS - 1) * ITERS, iters_per_epoch=ITERS)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    swa = torch.optim.swa_utils.AveragedModel(det, use_buffers=True)
    loader = make_train_loader(data, ["c0", "c1", "c2"], PATCH, 2, num_batches=ITERS, num_workers=0, seed=7)
    val_loader = make_val_loader(data, ["c3"], PATCH, 2, num_workers=0)
    evaluator = SupervisedEvaluator(torch.device("cpu"), val_loader, det, iteration_update=DetectionValStep(),
                                    val_handlers=[PatchDetectionMetrics(2)], decollate=False)
    losses: list[float] = []

    class Record:
        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))

    ckpt = FoldCheckpoint(out, {"network": det, "optimizer": opt, "lr_scheduler": sched, "scaler": scaler,
                                "swa_model": swa}, evaluator)
    # as configs/train.json: MONAI's CheckpointLoader resumes when model_last.pt exists
    resume = [CheckpointLoader(str(ckpt.last_file), ckpt.load_dict, map_location="cpu")] if ckpt.last_file.is_file() else []
    handlers = [ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
                SWAHandler(swa, det, start_epoch=EPOCHS - 1), TrainingLog(out, evaluator), SamplerEpoch(loader),
                *resume, ckpt, Record()]
    trainer = SupervisedTrainer(torch.device("cpu"), EPOCHS, loader, det, opt, None, epoch_length=ITERS,
                                iteration_update=DetectionTrainStep(sched, scaler, amp=True, seed=3),
                                train_handlers=handlers, decollate=False)
    if crash_after_epoch is not None:
        def crash(engine):
            if engine.state.epoch == crash_after_epoch:
                raise KeyboardInterrupt("simulated stop")
        trainer.add_event_handler(Events.EPOCH_COMPLETED, crash)
    return trainer, det, losses


def test_resume_continues_exactly_like_the_uninterrupted_run(tiny_data, tmp_path):
    full, det_full, losses_full = _workflow(tiny_data, tmp_path / "full")
    full.run()
    assert len(losses_full) == EPOCHS * ITERS

    first, _, losses_first = _workflow(tiny_data, tmp_path / "resumed", crash_after_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    ckpt = torch.load(tmp_path / "resumed" / "model_last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 2 * ITERS and not ckpt["finished"]
    assert losses_first == losses_full[: 2 * ITERS]

    second, det_resumed, losses_second = _workflow(tiny_data, tmp_path / "resumed")
    second.run()
    assert len(losses_second) == ITERS  # only the missing epoch ran
    np.testing.assert_allclose(losses_second, losses_full[2 * ITERS:], rtol=1e-6, atol=1e-7)
    for (name, a), b in zip(det_full.state_dict().items(), det_resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)

    final = torch.load(tmp_path / "resumed" / "model_last.pt", weights_only=True)
    assert final["finished"] and final["epoch"] == EPOCHS
    assert int(final["swa_model"]["n_averaged"]) == 1
    log = __import__("json").loads((tmp_path / "resumed" / "train_log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert all(math.isfinite(e["train_loss"]) and "val_loss" in e for e in log)
    assert (tmp_path / "resumed" / "training_curves.png").stat().st_size > 0
    best = torch.load(tmp_path / "full" / "model_best.pt", weights_only=True)
    assert best["key_metric"] == KEY_METRIC and set(best["network"]) == set(det_full.state_dict())
