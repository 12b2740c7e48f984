"""Retina U-Net losses (nnDetection's choices): BCE classification, GIoU regression, 0.5 CE + 0.5 Dice seg.

Boxes are MONAI ``StandardMode`` (x1, y1, [z1,] x2, y2, [z2]) in voxels of the preprocessed image,
half-open (size = x2 - x1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

GIOU_EPS = 1e-7


def pairwise_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = GIOU_EPS) -> torch.Tensor:
    """Generalised IoU of box pairs (row i of ``boxes1`` with row i of ``boxes2``).

    Ours rather than MONAI's ``box_pair_giou``: that one raises on non-finite values, while under AMP a
    rare overflow should give a non-finite loss that the GradScaler skips, not stop training.

    Args:
        boxes1, boxes2: ``[N, 2 * dim]`` StandardMode boxes.

    Returns:
        ``[N]`` GIoU in [-1, 1] (float32).
    """
    dim = boxes1.shape[-1] // 2
    b1, b2 = boxes1.float(), boxes2.float()
    size1 = (b1[:, dim:] - b1[:, :dim]).clamp(min=0)
    size2 = (b2[:, dim:] - b2[:, :dim]).clamp(min=0)
    inter = (torch.min(b1[:, dim:], b2[:, dim:]) - torch.max(b1[:, :dim], b2[:, :dim])).clamp(min=0).prod(-1)
    union = size1.prod(-1) + size2.prod(-1) - inter
    iou = inter / (union + eps)
    enclosure = (
        (torch.max(b1[:, dim:], b2[:, dim:]) - torch.min(b1[:, :dim], b2[:, :dim])).clamp(min=0).prod(-1)
    )
    return iou - (enclosure - union) / (enclosure + eps)


def giou_loss(
    pred_boxes: torch.Tensor, target_boxes: torch.Tensor, num_pos: int | None = None
) -> torch.Tensor:
    """GIoU regression loss: ``sum(1 - GIoU) / max(1, num_pos)`` (nnDetection's GIoURegressor).

    Args:
        pred_boxes, target_boxes: ``[P, 2 * dim]`` decoded predictions and matched GT boxes.
        num_pos: normaliser (number of sampled positives in the batch); defaults to ``P``.
    """
    if num_pos is None:
        num_pos = pred_boxes.shape[0]
    if pred_boxes.numel() == 0:
        return pred_boxes.sum() * 0.0
    return (1.0 - pairwise_giou(pred_boxes, target_boxes)).sum() / max(1, num_pos)


def bce_onehot_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE with one-hot targets, mean over all sampled anchors and classes.

    Args:
        logits: ``[S, C]`` classification logits of the sampled anchors.
        labels: ``[S]`` anchor labels, 0 = background (all-zero target), k >= 1 = class k - 1.
    """
    num_classes = logits.shape[1]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    target = F.one_hot(labels.long(), num_classes + 1)[:, 1:].to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="mean")


class SegLoss(nn.Module):
    """fg/bg segmentation loss: ``ce_weight * CE + dice_weight * soft Dice`` (nnDetection's DiCESegmenterFgBg).

    Dice: softmax, batch dice, no background channel, smooth 1e-5 (MONAI ``DiceLoss``, 1 - Dice).
    """

    def __init__(self, ce_weight: float = 0.5, dice_weight: float = 0.5, smooth: float = 1e-5) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.dice = DiceLoss(
            include_background=False,
            to_onehot_y=True,
            softmax=True,
            batch=True,
            smooth_nr=smooth,
            smooth_dr=smooth,
        )

    def forward(self, seg_logits: torch.Tensor, seg_target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            seg_logits: ``[B, 2, *spatial]``.
            seg_target: ``[B, 1, *spatial]`` or ``[B, *spatial]`` instance ids or class map; > 0 is foreground.

        Returns:
            ``{"seg_ce": weighted CE, "seg_dice": weighted Dice loss}``.
        """
        if seg_target.dim() == seg_logits.dim() - 1:
            seg_target = seg_target[:, None]
        fg = (seg_target > 0).long()
        logits = seg_logits.float()
        ce = F.cross_entropy(logits, fg[:, 0])
        dice = self.dice(logits, fg)
        return {"seg_ce": self.ce_weight * ce, "seg_dice": self.dice_weight * dice}
