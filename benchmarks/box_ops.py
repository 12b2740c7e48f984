"""Box ops benchmark: ours (CPU numpy / CUDA kernels) vs MONAI and torchvision, one table per run.

Usage (from the repo root):

    python benchmarks/box_ops.py                       # sparse N in 100..30k, dense N in 1k..10k; 3D, 2D
    python benchmarks/box_ops.py --sizes 100 1000 3000 --dense_sizes 1000 --monai_cap 20
    python benchmarks/box_ops.py --sizes --dense_objects 1   # dense rows only, all boxes on one object

Two box sets (StandardMode, float32, scores uniform in [0, 1)):

* ``sparse``: centres uniform in a 256^D volume, sides uniform in 4..40 voxels (almost nothing
  overlaps; nearly every box is kept);
* ``dense``: detector candidates: jittered copies of --dense_objects boxes (default 20; centres uniform
  in 32..224, sides 8..16 voxels), each copy shifted by N(0, 1.5) voxels per axis and its sides scaled
  by 0.8..1.25, so most pairs of the same object overlap above the threshold.

NMS threshold --iou (default 0.5). Each cell is the median of --reps runs (a call slower than 1 s:
that one run; MONAI: one run; skipped once its predicted time exceeds --monai_cap seconds, predicted
from the previous N assuming N^2 growth). "edges only" is our previous CPU NMS (x-sweep edge list,
``ops.cpu.NMS_METHOD = "edges"``), "ours CPU" the default (blocked greedy scan, switching to the edge
list when that is predicted cheaper, see ``ops.cpu``); both return the same indices. CUDA columns
appear when CuPy and a CUDA device exist; torchvision columns (2D only, it has no 3D NMS) when
torchvision imports. The IoU row reports the dense N x N float32 IoU matrix: pairs per second and
output GB/s (the matrix is write-bound).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ops  # noqa: E402
from ops import cpu as ops_cpu  # noqa: E402
from ops.arrays import cupy_module  # noqa: E402


def random_boxes(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    c = rng.uniform(0, 256, (n, dim))
    s = rng.uniform(4, 40, (n, dim))
    return np.concatenate([c - s / 2, c + s / 2], 1).astype(np.float32), rng.random(n).astype(np.float32)


def dense_boxes(rng: np.random.Generator, n: int, dim: int, n_objects: int = 20):
    """Detector-like candidates: jittered copies of ``n_objects`` boxes (see the module docstring)."""
    centre = rng.uniform(32, 224, (n_objects, dim))
    side = rng.uniform(8, 16, (n_objects, dim))
    obj = rng.integers(0, n_objects, n)
    c = centre[obj] + rng.normal(0, 1.5, (n, dim))
    s = side[obj] * rng.uniform(0.8, 1.25, (n, dim))
    return np.concatenate([c - s / 2, c + s / 2], 1).astype(np.float32), rng.random(n).astype(np.float32)


def cpu_time(fn, reps: int) -> float:
    return cpu_times([fn], reps)[0]


def cpu_times(fns, reps: int, slow: float = 1.0) -> list[float]:
    """Median times of ``fns``, their runs interleaved (a shared VM's load drifts between runs).

    A function whose warm-up run took more than ``slow`` seconds reports that run, not repeated.
    """
    ts: list[list[float]] = []
    for fn in fns:
        t = time.perf_counter()
        fn()  # warm-up
        ts.append([time.perf_counter() - t])
    rep = [i for i, t in enumerate(ts) if t[0] <= slow]
    for i in rep:
        ts[i] = []
    for _ in range(reps):
        for i in rep:
            t = time.perf_counter()
            fns[i]()
            ts[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in ts]


def gpu_time(fn, reps: int) -> float:
    cp = cupy_module()
    fn()
    cp.cuda.Device().synchronize()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def edges_only(fn):
    """``fn`` run with the previous CPU NMS (edge list only) through the public API."""

    def run():
        method, ops_cpu.NMS_METHOD = ops_cpu.NMS_METHOD, "edges"
        try:
            return fn()
        finally:
            ops_cpu.NMS_METHOD = method

    return run


def fmt(sec: float | None) -> str:
    if sec is None:
        return "-"
    return f"{sec * 1e3:.2f} ms" if sec < 1 else f"{sec:.2f} s"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[100, 1000, 3000, 10000, 30000], help="sparse N")
    p.add_argument("--dense_sizes", type=int, nargs="*", default=[1000, 3000, 10000], help="dense N")
    p.add_argument("--dense_objects", type=int, default=20, help="objects the dense candidates surround")
    p.add_argument("--dims", type=int, nargs="+", default=[3, 2])
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--monai_cap", type=float, default=60.0, help="skip MONAI beyond this predicted time (s)")
    p.add_argument("--iou_max_n", type=int, default=10000, help="largest N for the dense IoU matrix")
    args = p.parse_args(argv)

    from monai.data.box_utils import non_max_suppression as monai_nms

    try:
        import torchvision

        tv_nms = torchvision.ops.nms
        tv_nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.ones(1), 0.5)  # broken builds fail here
    except Exception:  # not installed or incompatible build
        tv_nms = None
    cp = cupy_module()
    gpu = cp is not None and torch.cuda.is_available()
    rng = np.random.default_rng(0)  # sparse boxes and WBC (as in earlier tables)
    dense_rng = np.random.default_rng(1)

    print(f"# box ops benchmark, {date.today()}, {platform.node()} ({platform.processor() or platform.machine()}), "
          f"torch threads {torch.get_num_threads()}, numpy {np.__version__}, torch {torch.__version__}")
    if gpu:
        print(f"# GPU: {torch.cuda.get_device_name()} (CuPy {cp.__version__})")
    print(f"# NMS IoU threshold {args.iou}; dense boxes: jittered copies of {args.dense_objects} object "
          f"box(es); times are medians of {args.reps} runs (MONAI: 1 run)\n")
    head = ["boxes", "dim", "N", "kept", "ours CPU", "edges only CPU (previous)", "MONAI CPU"]
    head.append("ours vs MONAI")
    if tv_nms:
        head.append("torchvision CPU (2D)")
    if gpu:
        head += ["ours CUDA", "MONAI CUDA", "torchvision CUDA (2D)" if tv_nms else None]
        head = [h for h in head if h]
    head += ["IoU NxN CPU (Mpairs/s)"] + (["IoU NxN CUDA (GB/s out)"] if gpu else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    runs = [("sparse", dim, n) for dim in args.dims for n in args.sizes]
    runs += [("dense", dim, n) for dim in args.dims for n in args.dense_sizes]
    prev: tuple[int, float] | None = None
    prev_gpu: tuple[int, float] | None = None
    for i, (kind, dim, n) in enumerate(runs):
        if i == 0 or runs[i - 1][:2] != (kind, dim):  # MONAI time predictions per box set and dim
            prev = prev_gpu = None
        if kind == "sparse":
            b, s = random_boxes(rng, n, dim)
        else:
            b, s = dense_boxes(dense_rng, n, dim, args.dense_objects)
        bt, st = torch.from_numpy(b), torch.from_numpy(s)
        keep = ops.nms(b, s, args.iou)
        ours = functools.partial(ops.nms, b, s, args.iou)
        assert np.array_equal(edges_only(ours)(), keep), "blocked and edge-list NMS disagree"
        row = [kind, f"{dim}D", str(n), str(len(keep))]
        t_ours, t_edges = cpu_times([ours, edges_only(ours)], args.reps)
        row += [fmt(t_ours), fmt(t_edges)]
        pred = None if prev is None else prev[1] * (n / prev[0]) ** 2
        if pred is not None and pred > args.monai_cap:
            row += [f"skipped (>{args.monai_cap:g} s)", "-"]
        else:
            t = time.perf_counter()
            km = monai_nms(bt, st, args.iou)
            t_m = time.perf_counter() - t
            assert np.array_equal(km.numpy(), keep), "MONAI and ours disagree"
            prev = (n, t_m)
            row += [fmt(t_m), f"{t_m / t_ours:.0f}x"]
        if tv_nms:
            if dim == 2:
                kt = tv_nms(bt, st, args.iou)
                assert np.array_equal(kt.numpy(), keep), "torchvision and ours disagree"
                row.append(fmt(cpu_time(lambda bt=bt, st=st: tv_nms(bt, st, args.iou), args.reps)))
            else:
                row.append("n/a (2D only)")
        if gpu:
            bg, sg = bt.cuda(), st.cuda()
            row.append(fmt(gpu_time(lambda bg=bg, sg=sg: ops.nms(bg, sg, args.iou), args.reps)))
            predg = None if prev_gpu is None else prev_gpu[1] * (n / prev_gpu[0]) ** 2
            if predg is not None and predg > args.monai_cap:
                row.append(f"skipped (>{args.monai_cap:g} s)")
            else:
                torch.cuda.synchronize()
                t = time.perf_counter()
                monai_nms(bg, sg, args.iou)
                torch.cuda.synchronize()
                prev_gpu = (n, time.perf_counter() - t)
                row.append(fmt(prev_gpu[1]))
            if tv_nms:
                row.append(fmt(gpu_time(lambda bg=bg, sg=sg: tv_nms(bg, sg, args.iou), args.reps))
                           if dim == 2 else "n/a (2D only)")
        if n <= args.iou_max_n:
            t_iou = cpu_time(lambda b=b: ops.box_iou(b, b), max(1, args.reps // 2))
            row.append(f"{n * n / t_iou / 1e6:.0f}")
            if gpu:
                bg = cp.asarray(b)
                t_g = gpu_time(lambda bg=bg: ops.box_iou(bg, bg), args.reps)
                row.append(f"{n * n * 4 / t_g / 1e9:.0f}")
        else:
            row += ["-"] + (["-"] if gpu else [])
        print("| " + " | ".join(row) + " |", flush=True)

    # WBC as used by nnDetection's ensembling: 40 members (5 folds x 8 TTA) x 100 boxes, 3D
    objects = rng.uniform(20, 236, (100, 3))
    sizes = rng.uniform(4, 40, (100, 3))
    jitter = rng.normal(0, 1.5, (40, 100, 6))
    wb = (np.concatenate([objects - sizes / 2, objects + sizes / 2], 1)[None] + jitter).reshape(-1, 6)
    wb = np.concatenate([np.minimum(wb[:, :3], wb[:, 3:]), np.maximum(wb[:, :3], wb[:, 3:])], 1).astype(np.float32)
    ws = rng.random(len(wb)).astype(np.float32)
    wl = rng.integers(0, 2, len(wb))
    wbc = functools.partial(ops.wbc, wb, ws, wl, 0.5, 40)
    t_w, t_we = cpu_times([wbc, edges_only(wbc)], args.reps)
    line = f"\nWBC 40 members x 100 boxes (3D, IoU 0.5, n_exp_preds 40): ours CPU {fmt(t_w)}"
    line += f" (edges only, previous: {fmt(t_we)})"
    if gpu:
        wbg, wsg, wlg = cp.asarray(wb), cp.asarray(ws), cp.asarray(wl)
        line += f", ours CUDA {fmt(gpu_time(lambda: ops.wbc(wbg, wsg, wlg, 0.5, 40), args.reps))}"
    print(line)


if __name__ == "__main__":
    main()
