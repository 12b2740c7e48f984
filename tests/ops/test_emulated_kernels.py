"""The CUDA kernels executed on the CPU, unchanged: bit-equal to the numpy backend.

``ops/kernels/*.cu`` (as :func:`ops.cuda.kernel_source` gives them to NVRTC) are compiled with g++ against
``cuda_emulation.h`` (the CUDA execution model in C++: blocks on worker threads, the threads of a block
as fibers meeting at ``__syncthreads``, shared memory per block) and launched through the code of
:mod:`ops.cuda` itself, with CuPy replaced by numpy and ``RawModule`` functions by the emulated kernels:
same geometry (:mod:`ops.launch`), same arguments, same pre- and post-processing as on a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from ops import cpu, cuda, launch
from tests.ops import random_boxes

HERE = Path(__file__).resolve().parent
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs g++ to build the emulated kernels")

# -ffp-contract=off: no fused multiply-add (the kernels' __f*_rn intrinsics are plain float operations)
CXXFLAGS = [
    "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden",
    "-Wall", "-Wextra", "-Wno-unknown-pragmas",
]
FORWARD, REVERSE, SHUFFLE = 0, 1, 2  # emu::Schedule: order in which a block's threads run between barriers
THRESHOLDS = (0.0, 1e-5, 0.5, 1.0)

# Deliberately broken kernels (one edit each) that the parity comparison must catch:
# (module, original text, replacement, schedule of the block's threads)
MUTANTS = {
    "iou_row_stride": ("iou", "blockIdx.y * blockDim.y", "blockIdx.y * blockDim.x", FORWARD),
    "nms_row_tile": ("nms", "const int row = blockIdx.y;", "const int row = blockIdx.x;", FORWARD),
    # the barrier before all threads read thread 0's kept_bits: only visible when thread 0 runs last
    "gather_missing_barrier": (
        "nms", "__syncthreads();\n    const unsigned long long kb", "const unsigned long long kb", REVERSE,
    ),
    # dynamic shared memory is not zeroed by the launch (the emulator fills it with 0xA5 per block)
    "gather_uninitialised_shared": ("nms", "removed[w] = 0ULL;", ";", FORWARD),
}
# Not a usable mutant: `(row == col) ? t + 1 : 0` -> `t` also sets a box's own bit, which the gather never
# reads (a box is decided before its row is merged), so results cannot change.


class EmulatedKernel:
    """One emulated kernel, called like a CuPy ``RawKernel``: ``k(grid, block, args, shared_mem=0)``."""

    def __init__(self, lib: ctypes.CDLL, name: str):
        self.name, self._lib = name, lib
        self._launch = getattr(lib, f"emu_launch_{name}")
        self._launch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self._launch.restype = ctypes.c_int
        sig = getattr(lib, f"emu_signature_{name}")
        sig.restype = ctypes.c_char_p
        self.signature = sig().decode().split()

    def __call__(self, grid, block, args, shared_mem: int = 0):
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments, got {len(args)}")
        holders = []  # the argument values; params[i] points at holders[i]
        for i, (want, a) in enumerate(zip(self.signature, args, strict=True)):
            if isinstance(a, np.ndarray):
                if not a.flags.c_contiguous:  # the kernels index row-major memory
                    raise ValueError(f"{self.name} argument {i} is not C-contiguous")
                got = "*" + _type_code(a.dtype)
                holders.append(np.array([a.ctypes.data], np.uintp))
            elif isinstance(a, np.generic):  # as ops.cuda passes scalars: cp.int32(n), cp.float32(thr)
                got = _type_code(a.dtype)
                holders.append(np.array([a]))
            else:
                raise TypeError(f"{self.name} argument {i}: pass a numpy array or scalar, got {type(a)}")
            if got != want:
                raise TypeError(f"{self.name} argument {i}: the kernel takes {want}, got {got}")
        params = np.array([h.ctypes.data for h in holders], np.uintp)
        rc = self._launch(_geometry(grid, block).ctypes.data, shared_mem, params.ctypes.data)
        if rc:
            raise RuntimeError(f"{self.name}: {self._lib.emu_last_error().decode()}")


def _type_code(dtype) -> str:
    """numpy-style code of a C type as ``emu::type_code`` writes it: f4, i4, i8, u8, u1, b1."""
    dt = np.dtype(dtype)
    return f"{dt.kind}{dt.itemsize}"


def _dims(d) -> list[int]:
    d = (d,) if isinstance(d, int) else tuple(d)
    return [int(x) for x in d] + [1] * (3 - len(d))


def _geometry(grid, block) -> np.ndarray:
    return np.array(_dims(grid) + _dims(block), np.uint32)


class EmulatedModule:
    """A built kernel file: ``.function(name)`` as ``RawModule.get_function``, plus emulator settings."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_last_error.restype = ctypes.c_char_p
        self.lib.emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint]
        self.lib.emu_check_launch.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._functions: dict[str, EmulatedKernel] = {}

    def function(self, name: str) -> EmulatedKernel:
        if name not in self._functions:
            self._functions[name] = EmulatedKernel(self.lib, name)
        return self._functions[name]

    def schedule(self, mode: int, seed: int = 0) -> None:
        self.lib.emu_set_schedule(mode, seed)

    def launch_ok(self, geom: launch.Launch) -> bool:
        """Whether a device would accept this launch (grid/block/shared memory limits)."""
        return self.lib.emu_check_launch(_geometry(geom.grid, geom.block).ctypes.data, geom.shared_mem) == 0


def _compile(out: Path, module: str, source: str) -> tuple[subprocess.Popen, Path]:
    out.mkdir(parents=True)
    (out / f"{module}.cu").write_text(source)  # what the driver includes (already inlined: no -I ops/kernels)
    lib = out / f"lib{module}.so"
    cmd = [CXX, *CXXFLAGS, f"-DEMU_{module.upper()}", f"-I{out}", str(HERE / "cuda_emulation_kernels.cpp"),
           "-o", str(lib)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), lib


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, dict[str, EmulatedModule]]:
    """``{"good" | mutant: {"iou": module, "nms": module}}``, all compiled at once (in parallel)."""
    root = tmp_path_factory.mktemp("emulated_kernels")
    sources = {m: cuda.kernel_source(m) for m in ("iou", "nms")}
    jobs = {("good", m): _compile(root / "good" / m, m, src) for m, src in sources.items()}
    for name, (m, old, new, _) in MUTANTS.items():
        assert sources[m].count(old) == 1, f"mutant {name}: {old!r} must occur exactly once in {m}.cu"
        jobs[(name, m)] = _compile(root / name / m, m, sources[m].replace(old, new))
    out: dict[str, dict[str, EmulatedModule]] = {}
    for (variant, m), (proc, lib) in jobs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"g++ failed for {variant}/{m}:\n{log}"
        out.setdefault(variant, {})[m] = EmulatedModule(lib)
    # a mutant's other kernel file is the good one
    return {variant: {**out["good"], **mods} for variant, mods in out.items()}


@contextmanager
def emulated_cuda(modules: dict[str, EmulatedModule], schedule: int = FORWARD, seed: int = 0):
    """``ops.cuda`` running on numpy arrays with the emulated kernels."""
    for mod in modules.values():
        mod.schedule(schedule, seed)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cuda, "cupy_module", lambda: np)
            mp.setattr(cuda, "_function", lambda module, kernel: modules[module].function(kernel))
            yield
    finally:  # mutants share the good other module: leave every module in the default order
        for mod in modules.values():
            mod.schedule(FORWARD)


def parity_inputs(dim: int, n: int, seed: int):
    """Boxes with overlaps, exact duplicates and zero-size boxes; scores with many ties; labels."""
    rng = np.random.default_rng(seed)
    extent = max(24.0, 6.0 * n ** (1 / dim))  # a few overlaps per box
    boxes = random_boxes(rng, n, dim, extent=extent, size=(2.0, 16.0))
    if n >= 4:
        boxes[1::9] = boxes[0]  # duplicates: IoU exactly 1
        boxes[2::10, dim:] = boxes[2::10, :dim]  # zero-size on every axis
        boxes[3::10, dim] = boxes[3::10, 0]  # zero-size on one axis
    scores = rng.integers(0, max(2, n // 8), n).astype(np.float32)  # ties
    labels = rng.integers(0, 3, n)
    return boxes, scores, labels


def parity_mismatches(modules, dim: int, n: int, seed: int = 0, schedule: int = FORWARD) -> list[str]:
    """Outputs of ``ops.cuda`` on the emulated kernels that differ from ``ops.cpu`` (empty: all bit-equal)."""
    boxes, scores, labels = parity_inputs(dim, n, seed)
    other = boxes[: min(n, 97)]
    bad = []

    def check(what, fn_emulated, fn_cpu):
        try:
            got = fn_emulated()
        except RuntimeError as e:  # the emulator refused the launch (geometry, divergent barrier)
            bad.append(f"{what}: {e}")
            return
        want = fn_cpu()
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        if not all(g.dtype == w.dtype and np.array_equal(g, w) for g, w in zip(got, want, strict=True)):
            bad.append(what)

    with emulated_cuda(modules, schedule, seed):
        for giou in (False, True):
            check(f"{'giou' if giou else 'iou'}", lambda g=giou: cuda.box_iou(boxes, other, g),
                  lambda g=giou: cpu.box_iou(boxes, other, g))
        for thr in map(np.float32, THRESHOLDS):
            for lab in (None, labels):
                tag = f"thr={thr:g} labels={'on' if lab is not None else 'off'}"
                check(f"nms {tag}", lambda t=thr, la=lab: cuda.nms(boxes, scores, t, la),
                      lambda t=thr, la=lab: cpu.nms(boxes, scores, t, la))
                check(f"wbc {tag}", lambda t=thr, la=lab: cuda.wbc_clusters(boxes, scores, la, t),
                      lambda t=thr, la=lab: cpu.wbc_clusters(boxes, scores, la, t))
        thr = np.float32(0.5)
        check("nms max_keep=3", lambda: cuda.nms(boxes, scores, thr, labels, max_keep=3),
              lambda: cpu.nms(boxes, scores, thr, labels, max_keep=3))
    return bad


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 2_500])
@pytest.mark.parametrize("dim", [2, 3])
def test_emulated_kernels_match_cpu(builds, dim, n):
    assert parity_mismatches(builds["good"], dim, n, seed=10 * n + dim) == []


@pytest.mark.parametrize("schedule", [REVERSE, SHUFFLE])
@pytest.mark.parametrize("n", [65, 700])
def test_emulated_kernels_match_cpu_any_thread_order(builds, n, schedule):
    # no result may depend on the order in which a block's threads run between barriers
    assert parity_mismatches(builds["good"], 3, n, seed=n + schedule, schedule=schedule) == []


def test_iou_row_chunks_cover_every_row(builds, monkeypatch):
    # the grid_y split of box_iou, exercised with a tiny limit: 100 rows -> 13 blocks along y > 3
    monkeypatch.setattr(cuda, "iou_row_chunks", functools.partial(launch.iou_row_chunks, max_grid_y=3))
    assert len(cuda.iou_row_chunks(100)) > 1
    boxes, _, _ = parity_inputs(3, 100, 1)
    with emulated_cuda(builds["good"]):
        got = cuda.box_iou(boxes, boxes[:40], True)
    np.testing.assert_array_equal(got, cpu.box_iou(boxes, boxes[:40], True))


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_parity_catches_a_broken_kernel(builds, name):
    *_, schedule = MUTANTS[name]
    bad = [m for dim, n in ((2, 65), (3, 200)) for m in parity_mismatches(builds[name], dim, n, 0, schedule)]
    assert bad, f"mutant {name} was not caught"


def test_launch_geometry_within_device_limits(builds):
    mod = builds["good"]["nms"]
    for n in (1, 63, 64, 65, 2_500, launch.MAX_SHARED_WORDS * launch.NMS_TILE):
        assert mod.launch_ok(launch.nms_mask_launch(n)) and mod.launch_ok(launch.nms_gather_launch(n)), n
    with pytest.raises(ValueError, match="at most"):
        launch.nms_blocks(launch.MAX_SHARED_WORDS * launch.NMS_TILE + 1)
    # the removed bitset plus the gather kernel's static shared memory (diag[64], kept_bits) fit in 48 KiB
    assert launch.MAX_SHARED_WORDS * 8 + (launch.NMS_TILE + 1) * 8 <= 48 * 1024
    rows = 8 * launch.MAX_GRID_Y + 1
    assert not mod.launch_ok(launch.iou_launch(rows, 5))  # one launch would exceed grid_y
    chunks = launch.iou_row_chunks(3 * rows)
    assert chunks[0][0] == 0 and chunks[-1][1] == 3 * rows
    assert all(a[1] == b[0] for a, b in zip(chunks[:-1], chunks[1:], strict=True))
    assert all(mod.launch_ok(launch.iou_launch(e - s, 5)) for s, e in chunks)
    assert not mod.launch_ok(launch.nms_gather_launch(1)._replace(shared_mem=48 * 1024 + 1))


def test_kernel_constants_and_exports(builds):
    src = cuda.kernel_source("nms")
    assert int(re.search(r"^#define NMS_TILE (\d+)$", src, re.MULTILINE).group(1)) == launch.NMS_TILE
    for m in ("iou", "nms"):
        names = re.findall(r'^extern "C" __global__ void (\w+)\(', cuda.kernel_source(m), re.MULTILINE)
        assert names
        for name in names:  # every kernel has an emulated launcher
            assert builds["good"][m].function(name).signature


def test_emulated_kernel_checks_arguments(builds):
    gather = builds["good"]["nms"].function("nms_gather")
    assert gather.signature == ["*u8", "i4", "i4", "*u1", "*i4", "i4"]
    mask = np.zeros((1, 1), np.uint64)
    keep, head = np.empty(1, np.uint8), np.empty(1, np.int32)
    with pytest.raises(TypeError, match="takes i4, got i8"):
        gather((1,), (256,), (mask, np.int64(1), np.int32(1), keep, head, np.int32(1)), shared_mem=8)
    with pytest.raises(RuntimeError, match="invalid grid"):
        gather((0,), (256,), (mask, np.int32(1), np.int32(1), keep, head, np.int32(1)))
