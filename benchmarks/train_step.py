"""Training step: iterations/s, share of step time spent waiting for data, peak memory vs the plan.

Usage (from the repo root):

    python benchmarks/train_step.py                       # GPU when present: default plan of a CT-like task
    python benchmarks/train_step.py --preset cpu --size 96 --steps 20   # a quick CPU run

A CT-like synthetic task (anisotropic spacing, HU-like intensities, our toy generator) is written to a
temporary folder, planned and preprocessed with ``nndet_prep``; the generated bundle's own
``configs/train.json`` objects (network, optimizer, schedule, AMP scaler, loader with
``det_num_threads`` workers, augmentation, the iteration step) are then run for ``--steps`` iterations.
Per step it records the time spent waiting for the next batch and the step itself (CUDA synchronised).
It also measures the loader alone (batches/s it can deliver with the same workers). On a GPU it reports
``torch.cuda.max_memory_reserved`` next to the planner's estimate (``memory_estimate_bytes``) and the GPU
utilisation sampled through NVML when ``pynvml`` is installed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _gpu_util_sampler(stop: threading.Event, out: list[float]) -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # noqa: BLE001 - NVML is optional
        return
    while not stop.is_set():
        out.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        time.sleep(0.1)


def make_task(root: Path, size: int, cases: int, preset: str):
    from planner.prep import run_prep
    from planner.toy import generate_example

    task = generate_example(root, preset="cpu", num_train=cases, num_test=0, size=size, spacing=(0.8, 0.8, 2.5),
                            modality="CT", task_name="Task150D3_CTBench", num_processes=min(4, os.cpu_count() or 1))
    result = run_prep(task.name, preset=preset, num_processes=2, num_processes_preprocessing=2)
    return task.name, result.plans[0], result.bundles[0]


def load_objects(bundle: Path, workers: int, iterations: int):
    from monai.bundle import ConfigParser

    if str(bundle) not in sys.path:
        sys.path.insert(0, str(bundle))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["num_workers"] = workers
    parser["iterations"] = iterations
    parser["warmup"] = 1
    parser["num_folds"] = 2
    return {k: parser.get_parsed_content(k) for k in
            ("device", "network", "optimizer", "train#dataloader", "train#step")}


def run(args) -> None:
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["det_data"], os.environ["det_models"] = f"{tmp}/data", f"{tmp}/models"
        Path(f"{tmp}/data").mkdir()
        task, plan, bundle = make_task(Path(f"{tmp}/data"), args.size, args.cases, args.preset)
        workers = args.workers if args.workers is not None else int(os.environ.get("det_num_threads", 6))
        objs = load_objects(bundle, workers, max(args.steps + args.warmup, args.loader_batches))
        device, network, loader, step = objs["device"], objs["network"], objs["train#dataloader"], objs["train#step"]

        # the loader alone
        t0 = time.perf_counter()
        n = 0
        for _ in loader:
            n += 1
        loader_rate = n / (time.perf_counter() - t0)

        engine = SimpleNamespace(network=network, optimizer=objs["optimizer"],
                                 state=SimpleNamespace(device=device, iteration=0))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        util: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_gpu_util_sampler, args=(stop, util), daemon=True)
        waits, steps = [], []
        it = iter(loader)
        for i in range(args.steps + args.warmup):
            if i == args.warmup:
                sampler.start()
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            engine.state.iteration = i + 1
            step(engine, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= args.warmup:
                waits.append(t1 - t0)
                steps.append(t2 - t1)
        stop.set()
        total = sum(waits) + sum(steps)
        print(f"\ntask {task}, plan {plan.plan_id}: patch {plan.patch_size}, batch {plan.batch_size}, "
              f"device {device}, loader workers {workers}, {args.steps} timed steps after {args.warmup} warmup\n")
        print("| metric | value |\n|---|---|")
        print(f"| iterations/s | {args.steps / total:.2f} |")
        print(f"| step time (median) | {statistics.median(steps) * 1e3:.0f} ms |")
        print(f"| waiting for data (share of step time) | {100 * sum(waits) / total:.1f} % |")
        print(f"| loader alone | {loader_rate:.2f} batches/s |")
        if util:
            print(f"| GPU utilisation (NVML, mean) | {statistics.mean(util):.0f} % |")
        if device.type == "cuda":
            peak = torch.cuda.max_memory_reserved()
            est = plan.memory_estimate_bytes
            print(f"| peak GPU memory reserved | {peak / 2**30:.2f} GiB |")
            print(f"| planner estimate | {est / 2**30:.2f} GiB ({100 * (est - peak) / peak:+.1f} % vs measured) |")
            print(f"| budget | {plan.memory_budget_bytes / 2**30:.2f} GiB |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", choices=["default", "cpu"])
    p.add_argument("--size", type=int, default=256, help="in-plane edge of the synthetic CT-like cases (voxels)")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--loader_batches", type=int, default=40, help="batches timed for the loader-alone rate")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default det_num_threads or 6)")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
