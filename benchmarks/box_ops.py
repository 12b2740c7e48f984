"""Box ops benchmark: ours (CPU numpy / CUDA kernels) vs MONAI and torchvision, one table per run.

Usage (from the repo root):

    python benchmarks/box_ops.py                       # N in 100, 1k, 3k, 10k, 30k; 3D and 2D
    python benchmarks/box_ops.py --sizes 100 1000 3000 --monai_cap 20

Boxes: centres uniform in a 256^D volume, sides uniform in 4..40 voxels, scores uniform in [0, 1)
(StandardMode, float32). NMS threshold --iou (default 0.5). Each cell is the median of --reps runs
(MONAI: one run; skipped once its predicted time exceeds --monai_cap seconds, predicted from the
previous N assuming N^2 growth). CUDA columns appear when CuPy and a CUDA device exist; torchvision
columns (2D only, it has no 3D NMS) when torchvision imports. The IoU row reports the dense
N x N float32 IoU matrix: pairs per second and output GB/s (the matrix is write-bound).
"""

from __future__ import annotations

import argparse
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
from ops.arrays import cupy_module  # noqa: E402


def random_boxes(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    c = rng.uniform(0, 256, (n, dim))
    s = rng.uniform(4, 40, (n, dim))
    return np.concatenate([c - s / 2, c + s / 2], 1).astype(np.float32), rng.random(n).astype(np.float32)


def cpu_time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


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


def fmt(sec: float | None) -> str:
    if sec is None:
        return "-"
    return f"{sec * 1e3:.2f} ms" if sec < 1 else f"{sec:.2f} s"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 3000, 10000, 30000])
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
    rng = np.random.default_rng(0)

    print(f"# box ops benchmark, {date.today()}, {platform.node()} ({platform.processor() or platform.machine()}), "
          f"torch threads {torch.get_num_threads()}, numpy {np.__version__}, torch {torch.__version__}")
    if gpu:
        print(f"# GPU: {torch.cuda.get_device_name()} (CuPy {cp.__version__})")
    print(f"# NMS IoU threshold {args.iou}; times are medians of {args.reps} runs (MONAI: 1 run)\n")
    head = ["dim", "N", "kept", "ours CPU", "MONAI CPU", "ours vs MONAI"]
    if tv_nms:
        head.append("torchvision CPU (2D)")
    if gpu:
        head += ["ours CUDA", "MONAI CUDA", "torchvision CUDA (2D)" if tv_nms else None]
        head = [h for h in head if h]
    head += ["IoU NxN CPU (Mpairs/s)"] + (["IoU NxN CUDA (GB/s out)"] if gpu else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for dim in args.dims:
        prev: tuple[int, float] | None = None
        prev_gpu: tuple[int, float] | None = None
        for n in args.sizes:
            b, s = random_boxes(rng, n, dim)
            bt, st = torch.from_numpy(b), torch.from_numpy(s)
            keep = ops.nms(b, s, args.iou)
            row = [f"{dim}D", str(n), str(len(keep))]
            t_ours = cpu_time(lambda b=b, s=s: ops.nms(b, s, args.iou), args.reps)
            row.append(fmt(t_ours))
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
    t_w = cpu_time(lambda: ops.wbc(wb, ws, wl, 0.5, 40), args.reps)
    line = f"\nWBC 40 members x 100 boxes (3D, IoU 0.5, n_exp_preds 40): ours CPU {fmt(t_w)}"
    if gpu:
        wbg, wsg, wlg = cp.asarray(wb), cp.asarray(ws), cp.asarray(wl)
        line += f", ours CUDA {fmt(gpu_time(lambda: ops.wbc(wbg, wsg, wlg, 0.5, 40), args.reps))}"
    print(line)


if __name__ == "__main__":
    main()
