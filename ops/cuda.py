"""CUDA backend: CuPy ``RawModule`` kernels from ``ops/kernels/*.cu`` (compiled at run time, cached).

Each kernel file is compiled once per process and device (CuPy also keeps its on-disk cache, keyed by
the full source text: headers are inlined before compiling so an edited header is never served stale).
NVRTC flags: ``--fmad=false`` (the sources also use explicit ``__f*_rn`` intrinsics) so the float32
overlap arithmetic is bit-identical to the numpy backend, see :mod:`ops.boxes`, for every value that is not
subnormal: CuPy appends ``-ftz=true`` to the options of every ``RawModule`` (an option given by us cannot undo
it, NVRTC keeps the last), so a float32 result below 1.2e-38 becomes 0 on the GPU. Box coordinates in voxels
or mm never come near that (it would take extents below 1e-19); ``tests/ops/test_nvrtc.py`` compiles the
kernels with CuPy's exact options on NVRTC and keeps the deviation visible as a strict xfail.

Launch geometry (grid, block, dynamic shared memory): :mod:`ops.launch`, shared with the CPU emulation
test of the kernels. All functions take validated, C-contiguous CuPy arrays on the current device and
return CuPy arrays.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ops.arrays import cupy_module
from ops.boxes import rank_order
from ops.launch import (
    GATHER_THREADS,  # noqa: F401  (re-exported, as NMS_TILE and MAX_SHARED_WORDS)
    MAX_SHARED_WORDS,  # noqa: F401
    NMS_TILE,  # noqa: F401
    iou_launch,
    iou_row_chunks,
    nms_blocks,
    nms_gather_launch,
    nms_mask_launch,
)

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
NVRTC_OPTIONS = ("--std=c++14", "--fmad=false")

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
    # rows are split so that each launch's grid_y fits the CUDA limit (see ops.launch)
    for s0, s1 in iou_row_chunks(n):
        g = iou_launch(s1 - s0, m)
        fn(g.grid, g.block, (cp.ascontiguousarray(a[s0:s1]), b, cp.int32(s1 - s0), cp.int32(m), out[s0:s1]))
    return out


def _greedy(boxes_sorted, labels_sorted, thr, want_head: bool):
    """Bitmask mask + on-device greedy reduction over boxes already in rank order.

    Returns:
        ``(keep uint8 [N], head int32 [N] or None)``.
    """
    cp = cupy_module()
    n = boxes_sorted.shape[0]
    d = boxes_sorted.shape[1] // 2
    if n == 0:  # a (0, 0) grid is an invalid launch
        return cp.zeros(0, cp.uint8), (cp.zeros(0, cp.int32) if want_head else None)
    cb = nms_blocks(n)  # ValueError when the gather kernel's bitset would not fit in shared memory
    mask_launch, gather_launch = nms_mask_launch(n), nms_gather_launch(n)
    use_labels = labels_sorted is not None
    labels = labels_sorted if use_labels else cp.zeros(1, cp.int64)
    mask = cp.zeros((n, cb), cp.uint64)
    args = (boxes_sorted, labels, cp.int32(use_labels), cp.int32(n), cp.float32(thr), mask)
    _function("nms", f"nms_mask_{d}d")(mask_launch.grid, mask_launch.block, args)
    keep = cp.empty(n, cp.uint8)
    head = cp.empty(n if want_head else 1, cp.int32)
    args = (mask, cp.int32(n), cp.int32(cb), keep, head, cp.int32(want_head))
    gather = _function("nms", "nms_gather")
    gather(gather_launch.grid, gather_launch.block, args, shared_mem=gather_launch.shared_mem)
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
