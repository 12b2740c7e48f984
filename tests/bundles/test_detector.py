"""Detector glue: anchors, ATSS, sampler, coder, losses, postprocess, a tiny overfit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.apps.detection.utils.hard_negative_sampler import HardNegativeSampler
from monai.data.box_utils import box_iou, box_pair_giou

from bundles.retinaunet_template.scripts.detector import (
    BatchedHardNegativeSampler,
    LevelATSSMatcher,
    PlanAnchorGenerator,
    anchor_shapes,
    build_detector,
    class_wise_nms,
    detector_kwargs_from_plan,
    measure_training_step_memory,
    synthetic_batch,
)
from bundles.retinaunet_template.scripts.losses import SegLoss, bce_onehot_loss, giou_loss, pairwise_giou

TINY = {"start_channels": 4, "max_channels": 16, "fpn_channels": 8, "head_channels": 8}


def _sizes(levels, per_axis, dim):
    return [[[v * 2**lvl for v in per_axis] for _ in range(dim)] for lvl in range(levels)]


def _tiny_detector(dim=2, num_classes=2, **kw):
    strides = [[1] * dim, [2] * dim, [2] * dim]
    return build_detector(
        dim, 1, num_classes, [[3] * dim] * 3, strides, [1, 2], _sizes(2, [4, 8], dim), **TINY, **kw
    )


# ---------------------------------------------------------------- anchors


def test_anchor_shapes_are_the_per_axis_product():
    shapes = anchor_shapes([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert len(shapes) == 27
    assert shapes[0] == [1, 4, 7] and shapes[-1] == [3, 6, 9]
    assert len({tuple(s) for s in shapes}) == 27


def test_anchor_generator_uses_explicit_per_level_shapes():
    # anisotropic: level 1 scales axes differently, which MONAI's scalar-per-level API cannot express
    sizes = [[[2, 4], [6], [6]], [[2, 4], [12], [12]]]
    gen = PlanAnchorGenerator(sizes)
    assert gen.num_anchors_per_location() == [2, 2]
    anchors, per_level = gen.anchors_for((8, 16, 16), [(8, 8, 8), (8, 4, 4)], torch.device("cpu"))
    assert per_level == [8 * 8 * 8 * 2, 8 * 4 * 4 * 2]
    assert anchors.shape == (sum(per_level), 6) and anchors.dtype == torch.float32
    lvl1 = anchors[per_level[0] :]
    extents = (lvl1[:, 3:] - lvl1[:, :3]).unique(dim=0)
    assert extents.tolist() == [[2, 12, 12], [4, 12, 12]]
    # first location of level 1 (stride (1, 4, 4)): centre at stride // 2 per axis
    centre = (lvl1[0, :3] + lvl1[0, 3:]) / 2
    assert centre.tolist() == [0.0, 2.0, 2.0]


def test_anchor_levels_must_agree():
    with pytest.raises(ValueError, match="same number"):
        PlanAnchorGenerator([[[2, 4], [2]], [[2], [2]]])


# ---------------------------------------------------------------- ATSS


def _reference_atss(boxes, anchors, per_level, k, num_anchors_per_loc):
    """nnDetection's ATSS written plainly: per level the k*A anchors with nearest centres."""
    b, a = boxes.numpy().astype(np.float64), anchors.numpy().astype(np.float64)
    d = b.shape[1] // 2
    bc, ac = (b[:, :d] + b[:, d:]) / 2, (a[:, :d] + a[:, d:]) / 2
    iou = box_iou(torch.from_numpy(b), torch.from_numpy(a)).numpy()
    best = np.full(len(a), -np.inf)
    match = np.full(len(a), -1)
    for g in range(len(b)):
        cand, start = [], 0
        for n in per_level:
            dist = np.linalg.norm(ac[start : start + n] - bc[g], axis=1)
            cand.extend((start + np.argsort(dist, kind="stable")[: min(k * num_anchors_per_loc, n)]).tolist())
            start += n
        vals = iou[g, cand]
        thr = vals.mean() + vals.std(ddof=1)
        for c in cand:
            if iou[g, c] >= thr and iou[g, c] > best[c]:
                best[c], match[c] = iou[g, c], g
    return torch.from_numpy(match)


def _random_case(seed):
    g = torch.Generator().manual_seed(seed)
    a_per_loc = 5
    lvl0 = torch.rand(40 * a_per_loc, 3, generator=g) * 30
    lvl1 = torch.rand(3 * a_per_loc, 3, generator=g) * 30  # 3 locations: fewer than 4 * A anchors
    size0 = 2 + torch.rand(lvl0.shape[0], 3, generator=g) * 6
    size1 = 8 + torch.rand(lvl1.shape[0], 3, generator=g) * 10
    anchors = torch.cat([torch.cat([lvl0, lvl0 + size0], 1), torch.cat([lvl1, lvl1 + size1], 1)])
    boxes = torch.tensor([[5.0, 5, 5, 17, 15, 16], [18, 12, 20, 22, 18, 24]])
    return boxes, anchors, [lvl0.shape[0], lvl1.shape[0]], a_per_loc


def test_atss_matches_spec_reference_and_differs_from_plain_monai_call():
    differs = 0
    for seed in range(5):
        boxes, anchors, per_level, a = _random_case(seed)
        ours = LevelATSSMatcher(num_candidates=4, num_anchors_per_loc=a).match(boxes, anchors, per_level)
        ref = _reference_atss(boxes, anchors, per_level, 4, a)
        assert torch.equal(ours, ref), seed
        assert (ours >= 0).any()
        # MONAI called as intended (level sizes in locations) takes only min(k*A, locations) candidates
        # on a small level, so its thresholds and matches differ from nnDetection's rule.
        plain = ATSSMatcher(num_candidates=4, center_in_gt=False)(
            boxes, anchors, num_anchors_per_level=[n // a for n in per_level], num_anchors_per_loc=a
        )[1]
        differs += int(not torch.equal(plain, ref))
    assert differs > 0


def test_atss_matches_the_anchor_equal_to_the_box_and_nothing_far_away():
    gen = PlanAnchorGenerator([[[4, 8], [4, 8]]])
    anchors, per_level = gen.anchors_for((32, 32), [(32, 32)], torch.device("cpu"))
    box = torch.tensor([[8.0, 8, 16, 16]])  # equals the 8x8 anchor centred at (12, 12)
    match = LevelATSSMatcher(4, 4).match(box, anchors, per_level)
    exact = ((anchors - box).abs().sum(1) == 0).nonzero().flatten()
    assert exact.numel() == 1 and match[exact].item() == 0
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    far = (centres - 12).abs().max(1).values > 8
    assert (match[far] == -1).all()


# ---------------------------------------------------------------- sampler


def test_batched_sampler_budget_is_per_batch_not_per_image():
    torch.manual_seed(0)
    labels = [torch.zeros(1000, dtype=torch.long), torch.zeros(1000, dtype=torch.long)]
    labels[0][:50] = 1  # all positives in image 0
    probs = torch.rand(2000)
    pos, neg = BatchedHardNegativeSampler(32, 0.33, min_neg=1, pool_size=20)(labels, probs)
    assert int(pos[0].sum()) == int(64 * 0.33) == 21 and int(pos[1].sum()) == 0
    assert int(neg[0].sum() + neg[1].sum()) == int(21 * abs(1 - 1 / 0.33))
    assert not ((pos[0] > 0) & (neg[0] > 0)).any()
    # MONAI's sampler budgets per image: 10 positives from image 0
    mpos, _ = HardNegativeSampler(32, 0.33, min_neg=1, pool_size=20)(labels, probs)
    assert int(mpos[0].sum()) == int(32 * 0.33) == 10


def test_sampler_without_positives_draws_min_negatives_from_the_hardest():
    labels = [torch.zeros(100, dtype=torch.long)]
    probs = torch.linspace(0, 1, 100)
    pos, neg = BatchedHardNegativeSampler(32, 0.33, min_neg=1, pool_size=1)(labels, probs)
    assert int(pos[0].sum()) == 0
    # max(1, 0) * |1 - 1/0.33| = 2 negatives, pool of 2: exactly the two highest-probability anchors
    assert neg[0].nonzero().flatten().tolist() == [98, 99]


# ---------------------------------------------------------------- coder and losses


def test_box_coder_round_trip_and_clamp():
    det = _tiny_detector(dim=3)
    anchors = torch.tensor([[0.0, 0, 0, 4, 4, 4], [10, 10, 10, 30, 20, 16]])
    gt = torch.tensor([[1.0, 0.5, 0, 5, 3, 6], [12, 8, 11, 25, 22, 15]])
    codes = det.coder.encode_single(gt, anchors)
    assert torch.allclose(det.coder.decode_single(codes, anchors), gt, atol=1e-4)
    huge = torch.tensor([[0.0, 0, 0, 50, 50, 50]])
    decoded = det.coder.decode_single(huge, anchors[:1])
    assert torch.allclose(decoded[0, 3:] - decoded[0, :3], torch.full((3,), 4 * 1000 / 16))


def test_giou_loss_hand_cases():
    a = torch.tensor([[0.0, 0, 2, 2]])
    assert giou_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    far = torch.tensor([[10.0, 10, 12, 12]])
    assert giou_loss(a, far).item() > 1.0
    b = torch.tensor([[1.0, 1, 3, 3]])
    # inter 1, union 7, enclosure 9: GIoU = 1/7 - 2/9
    assert pairwise_giou(a, b).item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-6)
    boxes1 = torch.tensor([[0.0, 0, 0, 2, 3, 4], [1, 1, 1, 5, 5, 5], [0, 0, 0, 1, 1, 1]])
    boxes2 = torch.tensor([[1.0, 1, 1, 3, 3, 3], [1, 1, 1, 5, 5, 5], [4, 4, 4, 6, 7, 8]])
    assert torch.allclose(pairwise_giou(boxes1, boxes2), box_pair_giou(boxes1, boxes2), atol=1e-6)
    # normalised by the number of sampled positives, not the rows given
    assert giou_loss(a.repeat(2, 1), far.repeat(2, 1), num_pos=4).item() == pytest.approx(
        giou_loss(a, far).item() / 2
    )


def test_bce_onehot_loss_known_values():
    logits = torch.tensor([[0.0, 0.0]])
    # positive of class 1 (label 2): targets [0, 1], both logits 0 -> log 2 each
    assert bce_onehot_loss(logits, torch.tensor([2])).item() == pytest.approx(math.log(2))
    x = torch.tensor([[2.0, -1.0]])
    expected = (math.log1p(math.exp(2.0)) + math.log1p(math.exp(-1.0))) / 2  # background: all-zero targets
    assert bce_onehot_loss(x, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_seg_loss_perfect_and_wrong():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:5, 2:5] = 3  # instance id 3 -> foreground
    fg = (target > 0).float()
    perfect = torch.cat([(1 - fg) * 20 - 10, fg * 20 - 10], dim=1)
    out = SegLoss()(perfect, target)
    assert out["seg_ce"].item() < 1e-4 and out["seg_dice"].item() < 1e-3
    wrong = SegLoss()(-perfect, target)
    assert wrong["seg_dice"].item() == pytest.approx(0.5, abs=1e-3)  # 0.5 * (1 - Dice), Dice ~ 0
    assert wrong["seg_ce"].item() == pytest.approx(0.5 * 20, rel=1e-3)


# ---------------------------------------------------------------- detector


def test_training_losses_are_finite_and_train_everything():
    det = _tiny_detector(dim=2).train()
    images, targets, seg = synthetic_batch(2, 1, (32, 32), "cpu")
    targets = [targets[0], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = det(images, targets, seg)
    assert set(losses) == {"cls", "reg", "seg_ce", "seg_dice"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in det.parameters())


def test_seg_loss_off_gives_zero_seg_terms_and_no_seg_head_update_but_every_grad():
    """``seg_loss=False`` (box labels): the segmentation terms are zero, the head gets zero gradients (not None:
    DDP needs a gradient for every parameter), detection gradients are those of the loss without seg terms."""
    torch.manual_seed(0)
    on, off = _tiny_detector(dim=2).train(), _tiny_detector(dim=2, seg_loss=False).train()
    off.load_state_dict(on.state_dict())
    images, targets, seg = synthetic_batch(2, 1, (32, 32), "cpu")
    torch.manual_seed(1)  # the same hard-negative draws in both
    l_on = on(images, targets, seg)
    torch.manual_seed(1)
    l_off = off(images, targets, seg)
    assert float(l_on["seg_ce"]) > 0 and float(l_off["seg_ce"]) == 0.0 == float(l_off["seg_dice"])
    sum(l_off.values()).backward()
    head = [p for n, p in off.named_parameters() if "seg_head" in n]
    assert head and all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in head)
    assert all(p.grad is not None for p in off.parameters())
    (l_on["cls"] + l_on["reg"]).backward()
    for a, b in zip(on.parameters(), off.parameters(), strict=True):  # parts only the seg path uses: None vs 0
        torch.testing.assert_close(torch.zeros_like(a) if a.grad is None else a.grad, b.grad)


def test_eval_can_return_the_segmentation_heads_foreground_probability():
    det = _tiny_detector(dim=2).eval()
    with torch.no_grad():
        plain = det(torch.randn(2, 1, 32, 32))
        torch.manual_seed(1)
        x = torch.randn(2, 1, 32, 32)
        both = det(x, return_seg=True)
        logits = det.network(x)["seg_logits"]
    assert "seg_probs" not in plain[0]
    expected = 1 - torch.softmax(logits, 1)[:, 0]
    for d, e in zip(both, expected, strict=True):
        assert d["seg_probs"].shape == (32, 32)
        torch.testing.assert_close(d["seg_probs"], e)


def test_training_without_targets_is_an_error():
    det = _tiny_detector().train()
    with pytest.raises(ValueError, match="targets"):
        det(torch.randn(1, 1, 16, 16))


def test_postprocess_topk_threshold_small_boxes_nms_and_limit():
    det = _tiny_detector(dim=2, num_classes=2, detections_per_img=5, score_thresh=0.05)
    n = 40
    anchors = torch.tensor([[10.0, 10, 20, 20]]).repeat(n, 1)
    anchors[:20] += torch.arange(20.0)[:, None] * 0.2  # a heap of overlapping boxes
    anchors[20:30] += torch.arange(10.0)[:, None] * 15  # well separated boxes
    anchors[30:] = torch.tensor([[60.0, 60, 60.005, 70]])  # too thin: removed
    logits = torch.full((n, 2), -10.0)
    logits[:, 0] = torch.linspace(3, -3, n)
    logits[:20, 1] = 2.0  # same heap, other class: survives class-wise NMS
    reg = torch.zeros(n, 4)
    out = det.postprocess(logits, reg, anchors, (64, 64))
    scores, boxes, labels = out["scores"], out["boxes"], out["labels"]
    assert len(scores) == 5
    assert torch.all(scores[:-1] >= scores[1:]) and (scores > 0.05).all()
    assert (boxes >= 0).all() and (boxes <= 64).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 0.01).all()
    for c in labels.unique():
        same = boxes[labels == c]
        iou = box_iou(same, same) - torch.eye(len(same))
        assert (iou <= 0.6).all()
    assert set(labels.tolist()) == {0, 1}


def test_class_wise_nms_keeps_other_classes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10, 10]])
    keep = class_wise_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1]), 0.6)
    assert keep.tolist() == [0, 2]


def test_nms_fallback_agrees_with_ops():
    ops = pytest.importorskip("ops")
    from monai.data.box_utils import batched_nms as monai_batched_nms

    g = torch.Generator().manual_seed(3)
    lo = torch.rand(300, 3, generator=g) * 20
    boxes = torch.cat([lo, lo + 2 + torch.rand(300, 3, generator=g) * 8], 1)
    scores = torch.rand(300, generator=g)
    labels = torch.randint(0, 3, (300,), generator=g)
    ours = torch.as_tensor(ops.batched_nms(boxes, scores, labels, 0.6))
    theirs = monai_batched_nms(boxes, scores, labels, 0.6)
    assert ours.tolist() == theirs.tolist()


def test_eval_mode_returns_sorted_limited_detections():
    det = _tiny_detector(dim=2, topk_candidates=500).eval()
    out = det(torch.randn(3, 1, 32, 32))
    assert len(out) == 3
    for o in out:
        assert o["boxes"].shape[1] == 4 and len(o["boxes"]) <= 100
        assert torch.all(o["scores"][:-1] >= o["scores"][1:])


def test_network_and_anchor_plan_must_agree():
    with pytest.raises(ValueError, match="anchor plan"):
        from bundles.retinaunet_template.scripts.detector import RetinaUNetDetector

        RetinaUNetDetector(_tiny_detector().network, _sizes(3, [4, 8], 2))


def test_kwargs_from_plan():
    arch = SimpleNamespace(
        dim=2,
        in_channels=1,
        num_classes=1,
        conv_kernels=[[3, 3]] * 3,
        strides=[[1, 1], [2, 2], [2, 2]],
        decoder_levels=[1, 2],
        start_channels=4,
        max_channels=16,
        fpn_channels=8,
        head_channels=8,
        seg_classes=2,
    )
    plan = SimpleNamespace(architecture=arch, anchors=SimpleNamespace(sizes=_sizes(2, [4, 8, 12], 2)))
    det = build_detector(**detector_kwargs_from_plan(plan))
    assert det.num_anchors == 9 and det.network.num_anchors == 9


def test_overfits_one_cube():
    """One 3D image with one cube: the summed loss falls clearly and the top box finds the cube."""
    torch.manual_seed(0)
    det = build_detector(
        3,
        1,
        1,
        [[3, 3, 3]] * 3,
        [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        [1, 2],
        _sizes(2, [6, 10], 3),
        topk_candidates=500,
        **TINY,
    )
    image = 0.1 * torch.randn(1, 1, 24, 24, 24)
    image[:, :, 6:14, 8:16, 10:18] += 1.0
    seg = (image > 0.5).float()
    targets = [{"boxes": torch.tensor([[6.0, 8, 10, 14, 16, 18]]), "labels": torch.tensor([0])}]
    opt = torch.optim.Adam(det.parameters(), lr=3e-3)
    det.train()
    history = []
    for _ in range(40):
        losses = det(image, targets, seg)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:3])
    det.eval()
    top = det(image)[0]
    assert box_iou(top["boxes"][:1], targets[0]["boxes"]).item() > 0.5


def test_memory_helper_refuses_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        measure_training_step_memory(_tiny_detector(), 1, (16, 16), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_helper_on_gpu():
    det = _tiny_detector(dim=3)
    params = sum(p.numel() for p in det.parameters())
    one = measure_training_step_memory(det, 1, (32, 32, 32), "cuda")
    two = measure_training_step_memory(det, 2, (32, 32, 32), "cuda")
    # weights, gradients and momentum (fp32) are always there; activations grow with the batch
    assert one >= 12 * params
    assert two > one + 0.5 * (one - 12 * params)
    assert two < 2**32  # a tiny network on a 32^3 patch: far below 4 GiB unless something leaks
