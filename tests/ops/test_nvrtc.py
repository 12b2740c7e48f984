"""NVRTC compile check, no device: every kernel compiles the way cupy.RawModule compiles it at run time.

``ops.cuda`` hands ``kernel_source(name)`` and ``NVRTC_OPTIONS`` to ``cupy.RawModule``, i.e. to NVRTC, not
to nvcc (``test_kernels.py``): NVRTC has no host headers and no include path, so a source nvcc accepts
can still fail on the GPU machine. Needs the NVRTC wheel (``pip install nvidia-cuda-nvrtc``, in the
``dev`` extra); skipped without it. Options: see ``tests.ops.nvrtc.cupy_options``.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from ops.cuda import KERNEL_DIR, NVRTC_OPTIONS, kernel_source
from tests.ops.nvrtc import cupy_options, load

NVRTC, WHY_NOT = load()
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason=WHY_NOT)

ARCHS = (80, 90)  # A100, H100/H200
STEMS = sorted(p.stem for p in KERNEL_DIR.glob("*.cu"))
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
# a contracted multiply-add in f32, with or without the .ftz that CuPy's -ftz=true adds
_FMA_F32 = re.compile(r"\bfma\.rn(?:\.ftz)?(?:\.sat)?\.f32\b")


def _compile(source: str, options: tuple[str, ...], arch: int):
    assert arch in NVRTC.supported_archs, f"NVRTC {NVRTC.version} cannot target sm_{arch}"
    return NVRTC.compile(source, cupy_options(options, arch))


def test_kernel_sources_found():
    assert {"iou", "nms"} <= set(STEMS)
    for stem in STEMS:
        assert _KERNEL.search(kernel_source(stem)), stem


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("stem", STEMS)
def test_kernel_compiles_with_nvrtc(stem: str, arch: int):
    res = _compile(kernel_source(stem), NVRTC_OPTIONS, arch)
    assert res.ok, f"NVRTC {NVRTC.version} {' '.join(res.options)}:\n{res.log}"
    assert "warning" not in res.log.lower(), res.log
    assert res.cubin[:4] == b"\x7fELF", "no cubin for -arch=sm_XX"
    names = _KERNEL.findall(kernel_source(stem))
    for name in names:
        assert f".entry {name}(" in res.ptx, name
        assert name.encode() + b"\0" in res.cubin, name  # extern "C": the symbol is the plain name
    fma = sorted(set(_FMA_F32.findall(res.ptx)))
    assert not fma, f"{fma}: --fmad=false lost, results would differ from the numpy backend"


@needs_nvrtc
def test_fma_check_sees_a_contraction():
    """Without --fmad=false a*b+c contracts to fma.rn.ftz.f32 (the .ftz from CuPy), which the check matches."""
    src = 'extern "C" __global__ void axpy(const float* a, const float* b, float* c) {\n' \
          "  c[threadIdx.x] = a[threadIdx.x] * b[threadIdx.x] + c[threadIdx.x];\n}\n"
    contracted = _compile(src, ("--std=c++14",), 80)
    assert contracted.ok, contracted.log
    assert _FMA_F32.search(contracted.ptx), contracted.ptx
    exact = _compile(src, NVRTC_OPTIONS, 80)
    assert exact.ok and not _FMA_F32.search(exact.ptx), exact.ptx


@needs_nvrtc
@pytest.mark.xfail(strict=True, reason="cupy.RawModule appends -ftz=true after our options: float32 "
                   "subnormals flush to zero on the GPU, unlike numpy (tiny boxes near the origin)")
def test_runtime_keeps_subnormals():
    res = _compile(kernel_source("iou"), NVRTC_OPTIONS, 80)
    assert res.ok, res.log
    assert ".ftz.f32" not in res.ptx


def test_cupy_keeps_our_options():
    """CuPy's first step (no device needed) only adds -I paths and keeps NVRTC_OPTIONS and their order."""
    core = pytest.importorskip("cupy._core.core")
    try:
        opts = core.assemble_cupy_compiler_options(NVRTC_OPTIONS)
    except Exception as e:  # no NVRTC for CuPy to ask its version
        pytest.skip(f"CuPy cannot assemble its options here: {e}")
    assert tuple(o for o in opts if not o.startswith("-I")) == NVRTC_OPTIONS, opts


# sources nvcc compiles (-I ops/kernels, host headers) and NVRTC, as CuPy calls it, does not
REJECTED = {
    "local-include-not-inlined": (lambda: (KERNEL_DIR / "iou.cu").read_text(), "box_overlap.cuh"),
    "host-header": (lambda: "#include <cstdio>\n" + kernel_source("iou"), "cstdio"),
}


@needs_nvrtc
@pytest.mark.parametrize("case", sorted(REJECTED))
def test_nvrtc_rejects_what_nvcc_accepts(case: str):
    source, include = REJECTED[case]
    res = _compile(source(), NVRTC_OPTIONS, 80)
    assert not res.ok, f"NVRTC compiled {case}: the check would not catch it"
    assert "NVRTC_ERROR_COMPILATION" in res.log and f"{include}\"" in res.log, res.log


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("case", sorted(REJECTED))
def test_nvcc_accepts_what_nvrtc_rejects(case: str, tmp_path):
    """The other half: nvcc (as in test_kernels.py) passes these, so only the NVRTC check catches them."""
    cu = tmp_path / "kern.cu"
    cu.write_text(REJECTED[case][0]())
    res = subprocess.run(
        ["nvcc", "-ptx", "-arch=sm_80", "--fmad=false", "-std=c++14", f"-I{KERNEL_DIR}", str(cu),
         "-o", str(tmp_path / "kern.ptx")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
