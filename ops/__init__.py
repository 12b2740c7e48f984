"""Box ops for detection: IoU/GIoU, NMS, class-wise and weighted NMS, weighted box clustering.

CUDA kernels (CuPy ``RawModule``, optional extra ``gpu``) with exact numpy fallbacks; the array kind of
the boxes picks the backend. Box mode and the half-open corner convention: :mod:`ops.boxes`.
"""

from __future__ import annotations

from ops.api import batched_nms, box_giou, box_iou, nms, wbc, weighted_nms

__all__ = ["box_iou", "box_giou", "nms", "batched_nms", "weighted_nms", "wbc"]
