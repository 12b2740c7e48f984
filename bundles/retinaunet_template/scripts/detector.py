"""Retina U-Net detector glue: anchors, ATSS matching, hard-negative sampling, box coding, losses and
in-model postprocessing with nnDetection's ``RetinaUNetV001`` settings, on MONAI's detection parts (none of
which need torchvision).

Boxes everywhere are MONAI ``StandardMode`` (x1, y1, [z1,] x2, y2, [z2]) in voxels of the preprocessed
image, half-open (a box over voxels i..j spans [i, j + 1)); labels are 0-based foreground classes.

This stays one module although it is over 400 lines: the anchor generator, matcher, sampler and
postprocessing all index one flat anchor order (locations in 'ij' order, then anchors) that
``PlanAnchorGenerator`` produces and ``_flatten_levels`` reproduces for the head outputs, and the MONAI
subclasses here exist only to serve ``RetinaUNetDetector``; keeping them together keeps that contract in
one place.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence

import torch
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.apps.detection.utils.hard_negative_sampler import HardNegativeSampler
from monai.data.box_utils import box_iou
from torch import nn

from .losses import SegLoss, bce_onehot_loss, giou_loss
from .network import RetinaUNet

logger = logging.getLogger(__name__)

BOX_CLIP = math.log(1000.0 / 16)


def anchor_shapes(level_sizes: Sequence[Sequence[float]]) -> list[list[float]]:
    """All per-axis combinations of one level's anchor extents: ``[A, dim]`` (A = product of counts)."""
    return [list(c) for c in itertools.product(*level_sizes)]


def exact_cell_anchors(anchor_shapes: torch.Tensor) -> torch.Tensor:
    """Cell anchors ``[-s/2, +s/2]`` per axis (``[N, 2 * dim]``) for ``[N, dim]`` shapes, not rounded.

    MONAI's ``generate_anchors_using_shape`` does the same and then rounds the corners; this is why we
    have our own (see :class:`PlanAnchorGenerator`).
    """
    half = anchor_shapes / 2.0
    return torch.cat([-half, half], dim=1)


class PlanAnchorGenerator(AnchorGeneratorWithAnchorShape):
    """MONAI's anchor generator with an explicit set of anchor shapes per level.

    MONAI's constructor takes one shape set times a scalar per level; our plan scales the optimised
    shapes by the per-axis stride of each level (anisotropic strides are not a scalar), so the cell
    anchors are built here from ``sizes`` directly. Grid placement and ordering (locations in 'ij'
    order, then anchors) are MONAI's: centre of cell i at ``i * stride + stride // 2``. Unlike MONAI's
    ``generate_anchors_using_shape`` (and nnDetection's generator), the corners are not rounded to whole
    voxels: rounding half to even turns sizes 3 and 5 into 4, 7 and 9 into 8, so the network would not
    have the anchors the planner optimised (mean best IoU 0.778 planned vs 0.733 built on a small-lesion
    simulation, and duplicate shapes where two planned sizes round alike). Here the built extents equal
    the planned sizes exactly (half-voxel corners for odd sizes, which the box coder takes as they are).

    Args:
        sizes: ``sizes[level][axis]`` = anchor extents (voxels) along that axis (``AnchorPlan.sizes``).
    """

    def __init__(self, sizes: Sequence[Sequence[Sequence[float]]]) -> None:
        shapes = [anchor_shapes(level) for level in sizes]
        if len({len(s) for s in shapes}) != 1:
            raise ValueError(f"every level needs the same number of anchors per location, got {sizes}")
        super().__init__(feature_map_scales=[1] * len(shapes), base_anchor_shapes=shapes[0], indexing="ij")
        self.cell_anchors = [exact_cell_anchors(torch.tensor(s, dtype=torch.float32)) for s in shapes]

    def anchors_for(
        self, image_size: Sequence[int], level_sizes: Sequence[Sequence[int]], device: torch.device
    ) -> tuple[torch.Tensor, list[int]]:
        """Anchors of one image (float32, independent of autocast).

        Returns:
            ``[N, 2 * dim]`` anchors over all levels and the number of anchors per level.
        """
        strides = [
            [
                torch.tensor(image_size[a] // g[a], dtype=torch.int64, device=device)
                for a in range(self.spatial_dims)
            ]
            for g in level_sizes
        ]
        self.set_cell_anchors(torch.float32, device)
        per_level = self.grid_anchors([list(g) for g in level_sizes], strides)
        return torch.cat(per_level), [int(a.shape[0]) for a in per_level]


class LevelATSSMatcher(ATSSMatcher):
    """MONAI's ATSS matcher with nnDetection's candidate count per level.

    nnDetection takes ``min(num_candidates * A, anchors in level)`` candidates per level; MONAI, called
    as intended (level sizes in locations), takes ``min(num_candidates * A, locations in level)``, which
    is fewer on small coarse levels (tests show the difference). Calling MONAI with level sizes in
    anchors, one anchor per location and ``num_candidates * A`` candidates gives nnDetection's rule.
    Threshold mean + std of candidate IoUs, no ignore band, highest IoU wins; ``center_in_gt`` False.
    """

    def __init__(
        self, num_candidates: int = 4, num_anchors_per_loc: int = 27, center_in_gt: bool = False
    ) -> None:
        super().__init__(
            num_candidates=num_candidates * num_anchors_per_loc,
            similarity_fn=box_iou,
            center_in_gt=center_in_gt,
        )
        self.candidates_per_location = num_candidates

    def match(
        self, boxes: torch.Tensor, anchors: torch.Tensor, anchors_per_level: Sequence[int]
    ) -> torch.Tensor:
        """Args: boxes ``[G, 2*dim]``, anchors ``[N, 2*dim]``, anchors_per_level (in anchors, not locations).

        Returns:
            ``[N]`` index of the matched box per anchor, -1 for background.
        """
        return self(boxes, anchors, num_anchors_per_level=list(anchors_per_level), num_anchors_per_loc=1)[1]


class BatchedHardNegativeSampler(HardNegativeSampler):
    """nnDetection's per-*batch* hard-negative sampler on MONAI's selection code.

    MONAI's sampler applies the budget per image; nnDetection pools the batch: budget
    ``batch_size_per_image * B``, positives <= int(budget * positive_fraction) drawn at random over the
    batch, negatives ``max(1, num_pos) * |1 - 1/positive_fraction|`` (at least ``min_neg``) drawn at
    random from the ``num_neg * pool_size`` background anchors with the highest fg probability.
    """

    def __call__(self, target_labels: list[torch.Tensor], concat_fg_probs: torch.Tensor):
        """Args:
            target_labels: per image ``[N_i]`` anchor labels (0 background, >= 1 foreground).
            concat_fg_probs: ``[sum N_i]`` max foreground probability per anchor.

        Returns:
            Lists of per-image uint8 masks ``[N_i]`` for sampled positives and negatives.
        """
        labels = torch.cat(target_labels)
        positive = torch.where(labels >= 1)[0]
        negative = torch.where(labels == 0)[0]
        budget = self.batch_size_per_image * len(target_labels)
        num_pos = min(positive.numel(), int(budget * self.positive_fraction))
        pos_mask = self.select_positives(positive, num_pos, labels)
        neg_mask = self.select_negatives(negative, self.get_num_neg(negative, num_pos), concat_fg_probs)
        sizes = [int(t.shape[0]) for t in target_labels]
        return list(pos_mask.split(sizes)), list(neg_mask.split(sizes))


_NMS: Callable | None = None


def class_wise_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float, max_keep: int | None = None
) -> torch.Tensor:
    """Indices kept by class-wise NMS, sorted by descending score (``ops.batched_nms`` when present); with
    ``max_keep`` only the first ``max_keep`` (ops stops scanning once they are known)."""
    global _NMS
    if _NMS is None:
        try:
            from ops import batched_nms as nms  # type: ignore[import-not-found]

            logger.debug("class-wise NMS: ops.batched_nms")
        except ImportError:
            # MONAI's Python-loop NMS: correct, slow on many boxes (we cap at topk before it).
            from monai.data.box_utils import batched_nms as monai_batched_nms

            def nms(b, s, lab, iou, max_keep=None):  # ops' signature; MONAI has no early stop
                return monai_batched_nms(b, s, lab, iou)[:max_keep]

            logger.debug("class-wise NMS: monai.data.box_utils.batched_nms (ops not importable)")
        _NMS = nms
    keep = torch.as_tensor(_NMS(boxes, scores, labels, iou, max_keep=max_keep), dtype=torch.long, device=boxes.device)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def _flatten_levels(maps: list[torch.Tensor], per_anchor: int) -> torch.Tensor:
    """``[B, A*K, *sp]`` per level -> ``[B, sum(prod(sp)*A), K]`` (locations 'ij' order, then anchors)."""
    out = []
    for m in maps:
        b, dim = m.shape[0], m.dim() - 2
        m = m.view(b, -1, per_anchor, *m.shape[2:]).permute(0, *range(3, 3 + dim), 1, 2)
        out.append(m.reshape(b, -1, per_anchor))
    return torch.cat(out, dim=1)


class RetinaUNetDetector(nn.Module):
    """Network + anchors + ATSS matcher + batched hard-negative sampler + box coder + postprocessing.

    Args:
        network: a ``RetinaUNet`` (or any module returning its output dict).
        anchor_sizes: ``AnchorPlan.sizes`` (one entry per decoder level).
        num_candidates: ATSS candidates per level, in anchor locations (x A anchors).
        batch_size_per_image, positive_fraction, pool_size, min_neg: sampler settings.
        topk_candidates, score_thresh, min_box_size, nms_thresh, detections_per_img: postprocess settings.
    """

    def __init__(
        self,
        network: nn.Module,
        anchor_sizes: Sequence[Sequence[Sequence[float]]],
        num_candidates: int = 4,
        batch_size_per_image: int = 32,
        positive_fraction: float = 0.33,
        pool_size: float = 20,
        min_neg: int = 1,
        topk_candidates: int = 10000,
        score_thresh: float = 0.0,
        min_box_size: float = 0.01,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        seg_ce_weight: float = 0.5,
        seg_dice_weight: float = 0.5,
        seg_loss: bool = True,
    ) -> None:
        super().__init__()
        self.network = network
        self.dim = network.dim
        self.num_classes = network.num_classes
        self.anchor_generator = PlanAnchorGenerator(anchor_sizes)
        self.num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        if self.num_anchors != network.num_anchors or len(anchor_sizes) != len(network.decoder_levels):
            raise ValueError(
                f"anchor plan ({len(anchor_sizes)} levels, {self.num_anchors}/location) does not fit the network "
                f"({len(network.decoder_levels)} decoder levels, {network.num_anchors}/location)"
            )
        self.matcher = LevelATSSMatcher(num_candidates, self.num_anchors, center_in_gt=False)
        self.sampler = BatchedHardNegativeSampler(batch_size_per_image, positive_fraction, min_neg, pool_size)
        self.coder = BoxCoder(weights=(1.0,) * (2 * self.dim), boxes_xform_clip=BOX_CLIP)
        self.seg_loss = SegLoss(seg_ce_weight, seg_dice_weight)
        self.use_seg_loss = bool(seg_loss)
        self.topk_candidates = topk_candidates
        self.score_thresh = score_thresh
        self.min_box_size = min_box_size
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def forward(
        self,
        images: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
        seg_target: torch.Tensor | None = None,
        return_seg: bool = False,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training mode: loss dict; eval mode: detections per image.

        Args:
            images: ``[B, C, *spatial]``.
            targets: per image ``{"boxes": [G, 2*dim], "labels": [G]}`` (optionally ``"seg"``
                ``[1, *spatial]`` when ``seg_target`` is not given).
            seg_target: ``[B, 1, *spatial]`` instance/fg map (> 0 foreground).
            return_seg: eval mode: also give each image's foreground probability of the segmentation head,
                ``"seg_probs"`` float32 ``[*spatial]`` (``scripts.masks``).

        Returns:
            training: ``{"cls", "reg", "seg_ce", "seg_dice"}`` (total loss = their sum);
            eval: per image ``{"boxes": [R, 2*dim], "scores": [R], "labels": [R]}``, R <= detections_per_img,
            sorted by score.
        """
        out = self.network(images)
        anchors, per_level = self._anchors(images, out)
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets (boxes and labels per image)")
            return self._losses(out, anchors, per_level, targets, seg_target)
        dets = self._detect(out, anchors, images.shape[2:])
        if return_seg:
            probs = 1.0 - torch.softmax(out["seg_logits"].float(), dim=1)[:, 0]  # every non-background class
            for d, p in zip(dets, probs, strict=True):
                d["seg_probs"] = p
        return dets

    def losses_and_detections(
        self,
        images: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        seg_target: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """One forward pass giving both (validation)."""
        out = self.network(images)
        anchors, per_level = self._anchors(images, out)
        losses = self._losses(out, anchors, per_level, targets, seg_target)
        return losses, self._detect(out, anchors, images.shape[2:])

    def _anchors(self, images: torch.Tensor, out: dict) -> tuple[torch.Tensor, list[int]]:
        level_sizes = [tuple(m.shape[2:]) for m in out["cls_logits"]]
        return self.anchor_generator.anchors_for(tuple(images.shape[2:]), level_sizes, images.device)

    def _match(self, anchors: torch.Tensor, per_level: list[int], boxes: torch.Tensor, labels: torch.Tensor):
        n = anchors.shape[0]
        if boxes.numel() == 0:
            return torch.zeros(n, dtype=torch.long, device=anchors.device), anchors.new_zeros(
                (n, 2 * self.dim)
            )
        idx = self.matcher.match(boxes, anchors, per_level)
        safe = idx.clamp(min=0)
        anchor_labels = torch.where(idx >= 0, labels.long()[safe] + 1, torch.zeros_like(idx))
        return anchor_labels, boxes[safe]

    def _losses(self, out, anchors, per_level, targets, seg_target) -> dict[str, torch.Tensor]:
        cls = _flatten_levels(out["cls_logits"], self.num_classes)
        reg = _flatten_levels(out["box_regression"], 2 * self.dim)
        labels, matched = [], []
        for t in targets:
            boxes = t["boxes"].to(anchors.device, torch.float32).reshape(-1, 2 * self.dim)
            lab, mb = self._match(anchors, per_level, boxes, t["labels"].to(anchors.device))
            labels.append(lab)
            matched.append(mb)
        fg_probs = torch.sigmoid(cls.detach().float()).max(dim=-1).values
        pos_masks, neg_masks = self.sampler(labels, fg_probs.reshape(-1))
        pos = torch.stack(pos_masks).bool()
        sampled = pos | torch.stack(neg_masks).bool()
        all_labels = torch.stack(labels)
        losses = {"cls": bce_onehot_loss(cls[sampled], all_labels[sampled])}
        num_pos = int(pos.sum())
        if num_pos > 0:
            anchors_pos = anchors[None].expand(pos.shape[0], -1, -1)[pos]
            pred_boxes = self.coder.decode_single(reg[pos].float(), anchors_pos)
            losses["reg"] = giou_loss(pred_boxes, torch.stack(matched)[pos], num_pos)
        else:
            losses["reg"] = reg.sum() * 0.0
        if not self.use_seg_loss:
            # off (box labels, train.json seg_loss false): zero terms that keep the segmentation head in the
            # graph, so DDP finds a gradient for every parameter and the logs keep their keys
            zero = out["seg_logits"].float().sum() * 0.0
            losses.update(seg_ce=zero, seg_dice=zero)
            return losses
        if seg_target is None:
            seg_target = torch.stack([t["seg"] for t in targets])
        losses.update(self.seg_loss(out["seg_logits"], seg_target.to(out["seg_logits"].device)))
        return losses

    @torch.no_grad()
    def _detect(self, out, anchors, image_size) -> list[dict[str, torch.Tensor]]:
        cls = _flatten_levels(out["cls_logits"], self.num_classes)
        reg = _flatten_levels(out["box_regression"], 2 * self.dim)
        return [self.postprocess(cls[b], reg[b], anchors, image_size) for b in range(cls.shape[0])]

    @torch.no_grad()
    def postprocess(
        self,
        cls_logits: torch.Tensor,
        box_regression: torch.Tensor,
        anchors: torch.Tensor,
        image_size: Sequence[int],
    ) -> dict[str, torch.Tensor]:
        """One image: top-k over anchors x classes, score threshold, clip, small boxes, class-wise NMS.

        Args:
            cls_logits: ``[N, C]``; box_regression: ``[N, 2*dim]``; anchors: ``[N, 2*dim]``.
            image_size: spatial size used to clip boxes.
        """
        scores = torch.sigmoid(cls_logits.float()).flatten()
        k = min(self.topk_candidates, scores.numel())
        scores, idx = scores.topk(k)
        keep = scores > self.score_thresh
        scores, idx = scores[keep], idx[keep]
        anchor_idx, labels = idx // self.num_classes, idx % self.num_classes
        boxes = self.coder.decode_single(box_regression[anchor_idx].float(), anchors[anchor_idx])
        for a in range(self.dim):
            boxes[:, a].clamp_(0, image_size[a])
            boxes[:, a + self.dim].clamp_(0, image_size[a])
        keep = ((boxes[:, self.dim :] - boxes[:, : self.dim]) >= self.min_box_size).all(dim=1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if boxes.shape[0] > 0:
            keep = class_wise_nms(boxes, scores, labels, self.nms_thresh, self.detections_per_img)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return {"boxes": boxes, "scores": scores, "labels": labels}


def build_detector(
    dim: int,
    in_channels: int,
    num_classes: int,
    conv_kernels: Sequence[Sequence[int]],
    strides: Sequence[Sequence[int]],
    decoder_levels: Sequence[int],
    anchor_sizes: Sequence[Sequence[Sequence[float]]],
    start_channels: int = 32,
    max_channels: int = 320,
    fpn_channels: int = 128,
    head_channels: int = 128,
    seg_classes: int = 2,
    **detector_kwargs,
) -> RetinaUNetDetector:
    """Factory with plain keyword arguments (for ``_target_`` in bundle configs)."""
    num_anchors = len(anchor_shapes(anchor_sizes[0]))
    network = RetinaUNet(
        dim,
        in_channels,
        num_classes,
        conv_kernels,
        strides,
        decoder_levels,
        start_channels=start_channels,
        max_channels=max_channels,
        fpn_channels=fpn_channels,
        head_channels=head_channels,
        num_anchors=num_anchors,
        seg_classes=seg_classes,
    )
    return RetinaUNetDetector(network, anchor_sizes, **detector_kwargs)


def detector_kwargs_from_plan(plan) -> dict:
    """``build_detector`` keyword arguments from a ``planner.plan.Plan`` (duck-typed: no planner import)."""
    a = plan.architecture
    return {
        "dim": a.dim,
        "in_channels": a.in_channels,
        "num_classes": a.num_classes,
        "conv_kernels": a.conv_kernels,
        "strides": a.strides,
        "decoder_levels": a.decoder_levels,
        "anchor_sizes": plan.anchors.sizes,
        "start_channels": a.start_channels,
        "max_channels": a.max_channels,
        "fpn_channels": a.fpn_channels,
        "head_channels": a.head_channels,
        "seg_classes": a.seg_classes,
    }


def synthetic_batch(batch_size: int, in_channels: int, patch_size: Sequence[int], device: torch.device | str):
    """Random images with one centred box (half the patch) per image and its seg map (for measurements)."""
    dim = len(patch_size)
    images = torch.randn(batch_size, in_channels, *patch_size, device=device)
    lo = [s // 4 for s in patch_size]
    hi = [s // 4 + s // 2 for s in patch_size]
    box = torch.tensor([*lo, *hi], dtype=torch.float32, device=device)
    targets = [{"boxes": box[None], "labels": torch.zeros(1, dtype=torch.long, device=device)}] * batch_size
    seg = torch.zeros(batch_size, 1, *patch_size, device=device)
    seg[(slice(None), slice(None), *(slice(lo[a], hi[a]) for a in range(dim)))] = 1
    return images, targets, seg


def measure_training_step_memory(
    detector: RetinaUNetDetector,
    batch_size: int,
    patch_size: Sequence[int],
    device: str | torch.device = "cuda",
    steps: int = 3,
) -> int:
    """Peak CUDA memory (bytes, ``torch.cuda.max_memory_allocated``) over a few AMP SGD training steps."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("measure_training_step_memory needs a CUDA device")
    detector = detector.to(device).train()
    opt = torch.optim.SGD(detector.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda")
    images, targets, seg = synthetic_batch(batch_size, detector.network.in_channels, patch_size, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = sum(detector(images, targets, seg).values())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))
