"""Array kinds in and out of the box ops: numpy, torch (CPU/CUDA) and CuPy.

The first box argument decides the backend and the kind returned: numpy arrays and CPU tensors run
the numpy backend (tensors are shared zero-copy with ``Tensor.numpy()``), CUDA tensors and CuPy arrays
run the CUDA backend (CUDA tensors pass zero-copy through DLPack, on the tensor's device and current
stream). CuPy is optional (extra ``gpu``); a CUDA tensor without CuPy falls back to the CPU with one
warning, never silently.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

try:  # torch is a core dependency, but keep ``import ops`` cheap and robust
    import torch
except ImportError:  # pragma: no cover
    torch = None

_cupy: Any = None
_cupy_checked = False
_warned_fallback = False


def cupy_module():
    """The ``cupy`` module if importable and a CUDA device is usable, else None (checked once)."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                _cupy = cupy
        except Exception as exc:  # ImportError, CUDARuntimeError without a driver
            log.debug("CuPy not usable (%s); box ops run on the CPU", exc)
    return _cupy


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.startswith("cupy")


@dataclass(frozen=True)
class Backend:
    """Where an op runs and what it returns.

    Attributes:
        kind: "numpy", "torch" or "cupy" (the kind of the first box argument).
        gpu: run the CUDA backend (inputs converted to CuPy arrays).
        device: torch device (torch kind) or CuPy device (cupy kind) of the input.
    """

    kind: str
    gpu: bool
    device: Any = None

    @property
    def xp(self):
        return cupy_module() if self.gpu else np

    def to_array(self, x: Any, dtype: Any = None):
        """Convert any accepted input to this backend's array type (numpy or CuPy)."""
        if x is None:
            return None
        if torch is not None and isinstance(x, torch.Tensor):
            x = x.detach()
            if self.gpu and x.is_cuda:
                arr = self.xp.from_dlpack(x.contiguous())
            elif self.gpu:
                arr = self.xp.asarray(x.numpy())
            else:
                arr = x.cpu().numpy()
        elif _is_cupy(x):
            arr = x if self.gpu else x.get()
        else:
            arr = self.xp.asarray(np.asarray(x))
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def to_output(self, arr):
        """Convert a backend result back to the input kind (same device for torch)."""
        if self.kind == "numpy":
            return arr
        if self.kind == "cupy":
            return arr
        if self.gpu:
            return torch.from_dlpack(arr)
        out = torch.from_numpy(np.ascontiguousarray(arr))
        return out if self.device is None or self.device.type == "cpu" else out.to(self.device)

    @contextlib.contextmanager
    def context(self):
        """Device and stream for the CUDA backend (torch's current stream for CUDA tensors)."""
        if not self.gpu:
            yield
            return
        cp = cupy_module()
        if self.kind == "torch":
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            with cp.cuda.Device(idx):
                stream = cp.cuda.ExternalStream(torch.cuda.current_stream(idx).cuda_stream)
                with stream:
                    yield
        else:
            with self.device:
                yield


def backend_of(x: Any) -> Backend:
    """Pick the backend for an op whose first box argument is ``x``; logs the choice at debug level."""
    global _warned_fallback
    if torch is not None and isinstance(x, torch.Tensor):
        if x.is_cuda:
            if cupy_module() is not None:
                b = Backend("torch", True, x.device)
            else:
                if not _warned_fallback:
                    log.warning(
                        "box ops got CUDA tensors but CuPy is not installed: running on the CPU (slow); "
                        "install the GPU extra: pip install 'nndet-monai[gpu]'"
                    )
                    _warned_fallback = True
                b = Backend("torch", False, x.device)
        else:
            b = Backend("torch", False, x.device)
    elif _is_cupy(x):
        if cupy_module() is None:
            raise RuntimeError("got a CuPy array but no CUDA device is usable")
        b = Backend("cupy", True, x.device)
    else:
        b = Backend("numpy", False)
    log.debug("box op backend: %s (%s input)", "cuda" if b.gpu else "cpu", b.kind)
    return b
