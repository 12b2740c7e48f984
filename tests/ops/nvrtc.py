"""Device-free NVRTC: compile CUDA C++ the way ``cupy.RawModule`` does at run time, through ctypes.

``libnvrtc`` comes from the ``nvidia-cuda-nvrtc`` wheel (``site-packages/nvidia/cu13/lib``); NVRTC needs no
driver and no GPU. ``load()`` says why not when no library is found or loads (tests skip then).

What CuPy 14 adds to ``RawModule(code=..., options=...)`` before ``nvrtcCompileProgram`` (see
``cupy/_core/_compile_with_cache`` and ``cupy/cuda/compiler.py``), mirrored by :func:`cupy_options`:

* ``--std=c++17`` unless an option already names a standard (CuPy 13: ``--std=c++14``);
* ``-ftz=true`` (always appended after the user options);
* ``-arch=sm_XX`` (cubin; XX the device's compute capability, at most what NVRTC supports), or
  ``-arch=compute_XX`` (PTX) with ``CUPY_COMPILE_WITH_PTX=1``;
* ``--device-as-default-execution-space`` (no jitify).

Like CuPy, :meth:`Nvrtc.compile` names the program ``kern.cu`` in a fresh, empty temporary directory:
NVRTC looks up ``#include "x.cuh"`` next to the program name, so a local include that was not inlined
fails here as it does at run time (nvcc with ``-I ops/kernels`` finds it). Not mirrored: CuPy's ``-I``
paths (its bundled CCCL, ``cupy/_core/include`` and ``<CUDA_PATH>/include``). The kernels include
nothing once ``ops.cuda.kernel_source`` has inlined them, so this check is stricter: any ``#include``
left in a source fails here.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# wheel layouts: CUDA 13 (nvidia-cuda-nvrtc 13.x) and CUDA 12 (nvidia-cuda-nvrtc-cu12)
_WHEEL_GLOBS = ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.1*")
_ENV_OVERRIDE = "NNDET_NVRTC_LIBRARY"


def find_library() -> Path | None:
    """``libnvrtc.so`` to load: ``$NNDET_NVRTC_LIBRARY``, else the nvidia wheel on ``sys.path``, else None."""
    override = os.environ.get(_ENV_OVERRIDE)
    if override:
        return Path(override)
    for entry in sys.path:
        for pattern in _WHEEL_GLOBS:
            hits = sorted(glob.glob(os.path.join(entry or ".", pattern)))
            if hits:
                return Path(hits[-1])
    return None


@dataclass(frozen=True)
class Result:
    ok: bool
    log: str
    ptx: str
    cubin: bytes
    options: tuple[str, ...]


def cupy_options(options: tuple[str, ...], arch: int, *, ptx: bool = False) -> tuple[str, ...]:
    """The NVRTC options cupy.RawModule compiles ``options`` with for compute capability ``arch`` (80, 90)."""
    opts = tuple(options)
    if not any("-std=" in o for o in opts):
        opts += ("--std=c++17",)
    opts += ("-ftz=true",)
    opts += (f"-arch={'compute' if ptx else 'sm'}_{arch}",)
    return opts + ("--device-as-default-execution-space",)


class Nvrtc:
    """The few NVRTC entry points a compile check needs."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # NVRTC dlopens libnvrtc-builtins.so.<major>.<minor> by name; older wheels (13.0) lack an
        # RPATH of $ORIGIN, so load the builtins next to it first
        for builtins in sorted(self.path.parent.glob("libnvrtc-builtins.so.*")):
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(self.path))
        vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        sigs = {
            "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
            "nvrtcGetNumSupportedArchs": [ctypes.POINTER(ctypes.c_int)],
            "nvrtcGetSupportedArchs": [ctypes.POINTER(ctypes.c_int)],
            "nvrtcCreateProgram": [ctypes.POINTER(vp), cp, cp, ctypes.c_int, ctypes.POINTER(cp),
                                   ctypes.POINTER(cp)],
            "nvrtcCompileProgram": [vp, ctypes.c_int, ctypes.POINTER(cp)],
            "nvrtcGetProgramLogSize": [vp, ctypes.POINTER(sz)],
            "nvrtcGetProgramLog": [vp, ctypes.c_char_p],
            "nvrtcGetPTXSize": [vp, ctypes.POINTER(sz)],
            "nvrtcGetPTX": [vp, ctypes.c_char_p],
            "nvrtcGetCUBINSize": [vp, ctypes.POINTER(sz)],
            "nvrtcGetCUBIN": [vp, ctypes.c_char_p],
            "nvrtcDestroyProgram": [ctypes.POINTER(vp)],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib.nvrtcGetErrorString.argtypes, lib.nvrtcGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
        self._lib = lib

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what}: {self._lib.nvrtcGetErrorString(rc).decode()}")

    @functools.cached_property
    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    @functools.cached_property
    def supported_archs(self) -> tuple[int, ...]:
        n = ctypes.c_int()
        self._check(self._lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * n.value)()
        self._check(self._lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        return tuple(archs)

    def _blob(self, prog, size_fn, get_fn) -> bytes:
        size = ctypes.c_size_t()
        if size_fn(prog, ctypes.byref(size)) != 0 or size.value == 0:
            return b""  # e.g. no cubin for a virtual -arch=compute_XX
        buf = ctypes.create_string_buffer(size.value)
        self._check(get_fn(prog, buf), get_fn.__name__)
        return buf.raw

    def compile(self, source: str, options: tuple[str, ...], name: str | None = None) -> Result:
        """``nvrtcCreateProgram`` (no headers) + ``nvrtcCompileProgram``; a failed compile is ``ok=False``.

        ``name`` defaults to ``kern.cu`` in an empty temporary directory, as CuPy does.
        """
        if name is None:
            with tempfile.TemporaryDirectory() as tmp:
                return self.compile(source, options, os.path.join(tmp, "kern.cu"))
        lib, prog = self._lib, ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            rc = lib.nvrtcCompileProgram(prog, len(options), argv)
            log = self._blob(prog, lib.nvrtcGetProgramLogSize, lib.nvrtcGetProgramLog)
            log_text = log.rstrip(b"\0").decode(errors="replace")
            if rc != 0:
                err = lib.nvrtcGetErrorString(rc).decode()
                return Result(False, f"{err}\n{log_text}", "", b"", tuple(options))
            ptx = self._blob(prog, lib.nvrtcGetPTXSize, lib.nvrtcGetPTX).rstrip(b"\0").decode()
            cubin = self._blob(prog, lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
            return Result(True, log_text, ptx, cubin, tuple(options))
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def load() -> tuple[Nvrtc | None, str]:
    """``(library, "")``, or ``(None, why not)`` when no libnvrtc is installed or it does not load."""
    path = find_library()
    if path is None:
        return None, (f"no libnvrtc: pip install nvidia-cuda-nvrtc (the CUDA 13 NVRTC wheel) or set "
                      f"{_ENV_OVERRIDE}")
    try:
        lib = Nvrtc(path)
        lib.version  # noqa: B018 - a library that cannot answer this is no use
    except (OSError, AttributeError, RuntimeError) as e:
        return None, f"{path} does not load: {e}"
    return lib, ""
