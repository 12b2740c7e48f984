"""CUDA kernels: every .cu compiles with nvcc -ptx (CI), and GPU results equal the CPU (with a GPU)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import ops
from ops.arrays import cupy_module
from ops.cuda import KERNEL_DIR, kernel_source
from tests.ops import random_boxes

KERNELS = sorted(KERNEL_DIR.glob("*.cu"))


def test_kernel_files_present_and_headers_inline():
    names = {p.name for p in KERNELS}
    assert {"iou.cu", "nms.cu"} <= names
    for p in KERNELS:
        src = kernel_source(p.stem)
        assert '#include "' not in src and "box_iou_pair" in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("cu", KERNELS, ids=lambda p: p.name)
def test_kernel_compiles_to_ptx(cu: Path, tmp_path: Path):
    out = tmp_path / (cu.stem + ".ptx")
    res = subprocess.run(
        ["nvcc", "-ptx", "--fmad=false", "-std=c++14", f"-I{KERNEL_DIR}", str(cu), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    ptx = out.read_text()
    for line in cu.read_text().splitlines():
        if line.startswith('extern "C" __global__ void '):
            name = line.split("void ")[1].split("(")[0]
            assert f".entry {name}(" in ptx, name
    assert "fma.rn.f32" not in ptx  # no contraction: results must equal the numpy backend bit for bit


gpu = pytest.mark.skipif(cupy_module() is None, reason="needs CuPy and a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dim", [2, 3])
def test_gpu_matches_cpu(dim):
    cp = cupy_module()
    import torch

    rng = np.random.default_rng(dim)
    for n, extent in ((0, 64), (1, 64), (63, 40), (64, 40), (65, 40), (2000, 120), (5000, 256)):
        b = random_boxes(rng, n, dim, extent=extent)
        b[: n // 10, dim:] = b[: n // 10, :dim]  # some zero-size boxes
        s = rng.integers(0, 50, n).astype(np.float32)  # many ties
        lab = rng.integers(0, 3, n)
        w = rng.uniform(0.5, 1, n)
        bg, sg, lg, wg = cp.asarray(b), cp.asarray(s), cp.asarray(lab), cp.asarray(w)
        np.testing.assert_array_equal(ops.box_iou(bg, bg[:300]).get(), ops.box_iou(b, b[:300]))
        np.testing.assert_array_equal(ops.box_giou(bg, bg[:300]).get(), ops.box_giou(b, b[:300]))
        for thr in (0.0, 0.1, 0.5):
            np.testing.assert_array_equal(ops.nms(bg, sg, thr).get(), ops.nms(b, s, thr))
            np.testing.assert_array_equal(ops.batched_nms(bg, sg, lg, thr).get(), ops.batched_nms(b, s, lab, thr))
            np.testing.assert_array_equal(
                ops.weighted_nms(bg, sg, lg, wg, thr).get(), ops.weighted_nms(b, s, lab, w, thr)
            )
            g, c = ops.wbc(bg, sg, lg, thr, 5, weights=wg), ops.wbc(b, s, lab, thr, 5, weights=w)
            np.testing.assert_array_equal(g[2].get(), c[2])
            np.testing.assert_allclose(g[0].get(), c[0], rtol=1e-5)
            np.testing.assert_allclose(g[1].get(), c[1], rtol=1e-5)
        if torch.cuda.is_available():
            t = torch.from_numpy(b).cuda()
            keep = ops.nms(t, torch.from_numpy(s).cuda(), 0.3)
            assert keep.is_cuda and keep.dtype == torch.int64
            np.testing.assert_array_equal(keep.cpu().numpy(), ops.nms(b, s, 0.3))
