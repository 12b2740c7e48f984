"""CUDA backend: CuPy ``RawModule`` kernels from ``ops/kernels/*.cu`` (compiled at run time, cached).

Each kernel file is compiled once per process and device (CuPy also keeps its on-disk cache, keyed by
the full source text: headers are inlined before compiling so an edited header is never served stale).
NVRTC flags: ``--fmad=false`` (the sources also use explicit ``__f*_rn`` intrinsics) so the float32
overlap arithmetic is bit-identical to the numpy backend, see :mod:`ops.boxes`.

All functions take validated, C-contiguous CuPy arrays on the current device and return CuPy arrays.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ops.arrays import cupy_module
from ops.boxes import rank_order

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
NVRTC_OPTIONS = ("--std=c++14", "--fmad=false")
NMS_TILE = 64
GATHER_THREADS = 256
MAX_SHARED_WORDS = 5_632  # removed-bitset words in 48 KiB of shared memory, minus the static part

_modules: dict[tuple[str, int], object] = {}
_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.MULTILINE)


def kernel_source(name: str) -> str:
    """Source of ``ops/kernels/<name>.cu`` with local ``#include "x.cuh"`` lines inlined."""
    src = (KERNEL_DIR / f"{name}.cu").read_text()
    return _INCLUDE.sub(lambda m: (KERNEL_DIR / m.group(1)).read_text(), src)


def _function(module: str, kernel: str):
    cp = cupy_module()
    dev = cp.cuda.runtime.getDevice()
    key = (module, dev)
    mod = _modules.get(key)
    if mod is None:
        log.debug("compiling ops/kernels/%s.cu for device %d", module, dev)
        mod = cp.RawModule(code=kernel_source(module), options=NVRTC_OPTIONS)
        _modules[key] = mod
    return mod.get_function(kernel)


def box_iou(a, b, giou: bool = False):
    """Dense IoU/GIoU ``[N, M]`` float32 of float32 boxes ``a [N, 2D]``, ``b [M, 2D]``."""
    cp = cupy_module()
    n, m = a.shape[0], b.shape[0]
    d = a.shape[1] // 2
    out = cp.empty((n, m), cp.float32)
    if n == 0 or m == 0:
        return out
    fn = _function("iou", f"box_{'giou' if giou else 'iou'}_{d}d")
    grid_y = (n + 7) // 8
    if grid_y > 65535:
        half = n // 2
        out[:half] = box_iou(a[:half], b, giou)
        out[half:] = box_iou(cp.ascontiguousarray(a[half:]), b, giou)
        return out
    fn(((m + 31) // 32, grid_y), (32, 8), (a, b, cp.int32(n), cp.int32(m), out))
    return out


def _greedy(boxes_sorted, labels_sorted, thr, want_head: bool):
    """Bitmask mask + on-device greedy reduction over boxes already in rank order.

    Returns:
        ``(keep uint8 [N], head int32 [N] or None)``.
    """
    cp = cupy_module()
    n = boxes_sorted.shape[0]
    d = boxes_sorted.shape[1] // 2
    cb = (n + NMS_TILE - 1) // NMS_TILE
    if cb > MAX_SHARED_WORDS:
        raise ValueError(
            f"NMS on the GPU supports at most {MAX_SHARED_WORDS * NMS_TILE} boxes, got {n}: keep the top-k "
            "by score first"
        )
    use_labels = labels_sorted is not None
    labels = labels_sorted if use_labels else cp.zeros(1, cp.int64)
    mask = cp.zeros((n, cb), cp.uint64)
    _function("nms", f"nms_mask_{d}d")(
        (cb, cb), (NMS_TILE,), (boxes_sorted, labels, cp.int32(use_labels), cp.int32(n), cp.float32(thr), mask)
    )
    keep = cp.empty(n, cp.uint8)
    head = cp.empty(n if want_head else 1, cp.int32)
    _function("nms", "nms_gather")(
        (1,), (GATHER_THREADS,), (mask, cp.int32(n), cp.int32(cb), keep, head, cp.int32(want_head)),
        shared_mem=cb * 8,
    )
    return keep, (head if want_head else None)


def _sorted_inputs(boxes, keys, labels):
    cp = cupy_module()
    order = rank_order(keys)
    bs = cp.ascontiguousarray(boxes[order])
    ls = None if labels is None else cp.ascontiguousarray(labels[order].astype(cp.int64))
    return order, bs, ls


def nms(boxes, keys, thr, labels=None, max_keep=None):
    """Greedy NMS ranked by float32 ``keys`` -> kept indices (int64) in rank order (first ``max_keep``)."""
    cp = cupy_module()
    if boxes.shape[0] == 0 or max_keep == 0:
        return cp.zeros(0, cp.int64)
    order, bs, ls = _sorted_inputs(boxes, keys, labels)
    keep, _ = _greedy(bs, ls, thr, want_head=False)
    kept = order[cp.flatnonzero(keep)]
    return kept if max_keep is None else kept[:max_keep]


def wbc_clusters(boxes, scores, labels, thr):
    """Class-wise WBC clustering -> ``(order [N] int64, head [N] int64)`` (see ``ops.cpu.wbc_clusters``)."""
    order, bs, ls = _sorted_inputs(boxes, scores, labels)
    _, head = _greedy(bs, ls, thr, want_head=True)
    return order, head.astype(order.dtype)
