"""Launch geometry of the CUDA kernels in ``ops/kernels`` (pure Python, no CuPy).

The one definition of grid, block and dynamic shared memory per kernel: :mod:`ops.cuda` launches with
it on the GPU and ``tests/ops/test_emulated_kernels.py`` with it on the CPU emulation of the kernels, so
the geometry the device would get is the geometry that is tested. The layouts the kernels expect are
described at the top of ``iou.cu`` and ``nms.cu``.
"""

from __future__ import annotations

from typing import NamedTuple

IOU_BLOCK = (32, 8)  # x runs along the M columns (coalesced stores), y along the N rows
NMS_TILE = 64  # boxes per bitmask word; must equal ``#define NMS_TILE`` in nms.cu
GATHER_THREADS = 256
MAX_SHARED_WORDS = 5_632  # removed-bitset words in 48 KiB of shared memory, minus the static part
MAX_GRID_Y = 65_535  # CUDA limit on gridDim.y (and z); gridDim.x may go to 2**31 - 1


class Launch(NamedTuple):
    """One kernel launch: ``grid`` and ``block`` dims (1 to 3 ints) and dynamic shared memory bytes."""

    grid: tuple[int, ...]
    block: tuple[int, ...]
    shared_mem: int = 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def iou_launch(n: int, m: int) -> Launch:
    """``box_{iou,giou}_{2,3}d`` for ``n x m`` pairs (``n, m >= 1``, ``ceil(n / 8) <= MAX_GRID_Y``)."""
    bx, by = IOU_BLOCK
    return Launch((_ceil_div(m, bx), _ceil_div(n, by)), IOU_BLOCK)


def iou_row_chunks(n: int, max_grid_y: int = MAX_GRID_Y) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of ``a`` launched separately so that each grid fits ``max_grid_y``.

    Halves recursively (the first half ``n // 2`` rows) until every part fits; ``[(0, n)]`` when it does.
    """
    if _ceil_div(n, IOU_BLOCK[1]) <= max_grid_y:
        return [(0, n)]
    half = n // 2
    head = iou_row_chunks(half, max_grid_y)
    tail = iou_row_chunks(n - half, max_grid_y)
    return head + [(half + s, half + e) for s, e in tail]


def nms_blocks(n: int) -> int:
    """Column blocks ``cb = ceil(n / NMS_TILE)`` of the NMS bitmask (``mask`` is ``[n, cb]`` uint64).

    Raises:
        ValueError: when the gather kernel's ``removed`` bitset (``cb`` words) would not fit in shared
            memory.
    """
    cb = _ceil_div(n, NMS_TILE)
    if cb > MAX_SHARED_WORDS:
        raise ValueError(
            f"NMS on the GPU supports at most {MAX_SHARED_WORDS * NMS_TILE} boxes, got {n}: keep the top-k "
            "by score first"
        )
    return cb


def nms_mask_launch(n: int) -> Launch:
    """``nms_mask_{2,3}d``: one block of ``NMS_TILE`` threads per (column tile, row tile)."""
    cb = nms_blocks(n)
    return Launch((cb, cb), (NMS_TILE,))


def nms_gather_launch(n: int) -> Launch:
    """``nms_gather``: one block, ``cb`` uint64 words (the ``removed`` bitset) of dynamic shared memory."""
    cb = nms_blocks(n)
    return Launch((1,), (GATHER_THREADS,), cb * 8)
