"""Mixed precision of the network pass: float16 autocast on CUDA, bfloat16 autocast on CPUs that have it.

``amp`` in ``configs/train.json`` / ``configs/inference.json`` switches both. On the CPU bfloat16 is used
only where the hardware computes it natively (AVX512-BF16 or AMX, checked once at run time); elsewhere the
pass stays float32 and one log line says why (emulated bfloat16 is slower than float32). ``det_cpu_amp=0``
turns the CPU part off without touching the configs. Losses, box decoding and NMS cast their inputs to
float32 (``scripts/losses.py``, ``Detector.postprocess``), so only the network's convolutions run in 16 bits.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)


@functools.cache
def cpu_bf16() -> bool:
    """True when this CPU has native bfloat16 (AVX512-BF16 or AMX tiles) and ``det_cpu_amp`` is not 0."""
    if os.environ.get("det_cpu_amp", "1") in ("0", "false", "False"):
        logger.info("bfloat16 autocast on the CPU is off (det_cpu_amp=0): float32")
        return False
    check = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        native = any(f() for f in check if f is not None)
    except RuntimeError:  # a torch build without the cpuinfo query
        native = False
    if not native:
        logger.info("bfloat16 autocast on the CPU is off: this CPU has neither AVX512-BF16 nor AMX, so bfloat16 "
                    "would be emulated (slower than float32); the network runs in float32")
    return native


def amp_dtype(device: torch.device | str, amp: bool = True) -> torch.dtype | None:
    """The autocast dtype for ``device`` (None: float32): float16 on CUDA, bfloat16 on a CPU with native support."""
    kind = torch.device(device).type
    if not amp:
        return None
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and cpu_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, amp: bool = True) -> torch.autocast:
    """``torch.autocast`` for the network pass on ``device`` (disabled where :func:`amp_dtype` is None)."""
    kind = torch.device(device).type
    dtype = amp_dtype(device, amp)
    return torch.autocast(kind if kind in ("cuda", "cpu") else "cpu", dtype=dtype or torch.float32,
                          enabled=dtype is not None)


def memory_format(device: torch.device | str, amp: bool = True, dim: int = 3) -> torch.memory_format:
    """The layout of the network pass at inference: ``channels_last_3d`` for 3D bfloat16 on the CPU, where
    oneDNN's bfloat16 3D convolutions are faster in it (network forward of the cpu preset 1.6x on top of
    bfloat16; in float32 the layout change alone was slower), else the default layout. ``det_channels_last=0``
    keeps the default layout."""
    if os.environ.get("det_channels_last", "1") in ("0", "false", "False"):
        return torch.contiguous_format
    if dim == 3 and amp_dtype(device, amp) is torch.bfloat16 and torch.device(device).type == "cpu":
        return torch.channels_last_3d
    return torch.contiguous_format
