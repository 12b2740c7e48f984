"""Training step: iterations/s, share of step time spent waiting for data, peak memory vs the plan.

Usage (from the repo root):

    python benchmarks/train_step.py                       # GPU when present: default plan of a CT-like task
    python benchmarks/train_step.py --preset cpu --size 96 --steps 20   # a quick CPU run
    python benchmarks/train_step.py --preset cpu --size 96 --ddp 1      # DDP overhead at N=1 vs plain steps
    python benchmarks/train_step.py --ddp 8                             # GPU: throughput 1 vs 8 GPUs, efficiency
    python benchmarks/train_step.py --preset cpu --size 64 --precision  # float32 vs bfloat16 autocast steps
    python benchmarks/train_step.py --memory                            # memory estimate vs CPU measurement
    python benchmarks/train_step.py --memory --memory_voxels 0 --memory_batch 1   # the plans' own patches, batch 1

``--ddp 1`` times plain steps and steps through a ``DistributedDataParallel`` wrapper (a one-process gloo or
NCCL group) alternately on the same batches, so both see the same machine load; the overhead is the ratio of
their medians. ``--ddp N`` (N > 1) also starts N processes (one per GPU, or gloo CPU processes), each stepping
its share (``batch / N``) of the plan's global batch, and reports global samples/s and the scaling efficiency
``throughput_N / (N * throughput_1)`` (on the CPU the processes share the cores: correctness only).

A CT-like synthetic task (anisotropic spacing, HU-like intensities, our toy generator) is written to a
temporary folder, planned and preprocessed with ``nndet_prep``; the generated bundle's own
``configs/train.json`` objects (network, optimizer, schedule, AMP scaler, loader with
``det_num_threads`` workers, augmentation, the iteration step) are then run for ``--steps`` iterations.
Per step it records the time spent waiting for the next batch and the step itself (CUDA synchronised).
It also measures the loader alone (batches/s it can deliver with the same workers). On a GPU it reports
``torch.cuda.max_memory_reserved`` next to the planner's estimate (``memory_estimate_bytes``) and the GPU
utilisation sampled through NVML when ``pynvml`` is installed.

``--memory`` needs no GPU: for the five calibration plans of ``benchmarks/memory_probe.py`` (3D CT-like, its
low-resolution plan, 2D, 2 modalities, the cpu preset) it measures one training step on the CPU under bfloat16
autocast (saved-for-backward bytes, parameters, per-phase peaks of the allocator) and prints it next to the
planner's estimate at the same patch and batch (``--memory_voxels``: patches shrunk to at most that many
voxels, 0 = the plan's; ``--memory_batch``: 0 = the plan's batch).
"""

from __future__ import annotations

import argparse
import contextlib
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

from planner.paths import use_cpu_threads  # noqa: E402


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


def load_objects(bundle: Path, workers: int, iterations: int, rank: int = 0, world_size: int = 1):
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
    parser["rank"], parser["world_size"] = rank, world_size
    return {k: parser.get_parsed_content(k) for k in
            ("device", "network", "optimizer", "train#dataloader", "train#step")}


@contextlib.contextmanager
def bench_task(args):
    """The synthetic task of ``args`` in a temporary ``det_data``: yields (task, plan, bundle, loader workers)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["det_data"], os.environ["det_models"] = f"{tmp}/data", f"{tmp}/models"
        Path(f"{tmp}/data").mkdir()
        task, plan, bundle = make_task(Path(f"{tmp}/data"), args.size, args.cases, args.preset)
        yield task, plan, bundle, (args.workers if args.workers is not None
                                   else int(os.environ.get("det_num_threads", 6)))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp(network, device):
    import torch

    return torch.nn.parallel.DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)


def _step_times(step, engine, loader_iter, steps: int, warmup: int) -> float:
    """Median seconds per ``step`` of ``engine.network`` (the plain network or a DDP wrapper of it)."""
    import torch

    device = engine.state.device
    times = []
    for i in range(steps + warmup):
        batch = next(loader_iter)
        engine.state.iteration += 1
        t0 = time.perf_counter()
        step(engine, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) if times else float("nan")


def ddp_overhead(bundle: Path, workers: int, steps: int, warmup: int) -> tuple[float, float]:
    """(plain, DDP N=1) median step seconds, measured alternately in blocks of 5 on the same loader."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    objs = load_objects(bundle, workers, 4 * (steps + warmup) + 20)
    device, network, step = objs["device"], objs["network"], objs["train#step"]
    use_cpu_threads(device)  # as train.json's initialize: every core for the network on the CPU
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        engine = SimpleNamespace(network=network, optimizer=objs["optimizer"],
                                 state=SimpleNamespace(device=device, iteration=0))
        it = iter(objs["train#dataloader"])
        _step_times(step, engine, it, 0, warmup)
        wrapped, plain, ddp = _ddp(network, device), [], []
        for _ in range(max(1, steps // 5)):
            engine.network = network
            plain.append(_step_times(step, engine, it, 5, 0))
            engine.network = wrapped
            ddp.append(_step_times(step, engine, it, 5, 0))
        return statistics.median(plain), statistics.median(ddp)
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank: int, world: int, port: int, bundle: str, workers: int, steps: int, warmup: int, out: str):
    import json

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    objs = load_objects(Path(bundle), workers, steps + warmup + 2, rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    network = objs["network"].to(device)
    use_cpu_threads(device)  # cores // LOCAL_WORLD_SIZE on the CPU
    engine = SimpleNamespace(network=_ddp(network, device), optimizer=objs["optimizer"],
                             state=SimpleNamespace(device=device, iteration=0))
    t = _step_times(objs["train#step"], engine, iter(objs["train#dataloader"]), steps, warmup)
    times = [None] * world
    dist.all_gather_object(times, t)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": max(times)}))
    dist.destroy_process_group()


def ddp_scaling(bundle: Path, world: int, workers: int, steps: int, warmup: int) -> float:
    """Median step seconds of a ``world``-process DDP run (each process its share of the global batch)."""
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/ddp.json"
        mp.start_processes(_ddp_worker, args=(world, _free_port(), str(bundle), max(0, workers // world), steps,
                                              warmup, out), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())["step_s"]


def run_precision(args) -> None:
    """float32 against autocast (bfloat16 on this CPU, float16 on CUDA) on the same network and loader, timed
    alternately in blocks of 5 steps so that both see the same machine load."""
    import torch

    from bundles.retinaunet_template.scripts.precision import amp_dtype

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with bench_task(args) as (task, plan, bundle, workers):
        objs = load_objects(bundle, workers, 2 * (args.steps + args.warmup) + 20)
        device, network, step = objs["device"], objs["network"], objs["train#step"]
        use_cpu_threads(device)
        dtype = amp_dtype(device, True)
        if dtype is None:
            print(f"no autocast dtype on {device} (see scripts/precision.py): nothing to compare")
            return
        engine = SimpleNamespace(network=network, optimizer=objs["optimizer"],
                                 state=SimpleNamespace(device=device, iteration=0))
        it = iter(objs["train#dataloader"])
        times: dict[bool, list[float]] = {False: [], True: []}
        for amp in (False, True):  # warm-up of both (oneDNN builds its kernels per dtype and shape)
            step.amp = amp
            _step_times(step, engine, it, 0, args.warmup)
        for _ in range(max(1, args.steps // 5)):
            for amp in (False, True):
                step.amp = amp
                times[amp].append(_step_times(step, engine, it, 5, 0))
        f32, mixed = statistics.median(times[False]), statistics.median(times[True])
        name = str(dtype).replace("torch.", "")
        print(f"\ntask {task}, plan {plan.plan_id}: patch {plan.patch_size}, batch {plan.batch_size}, device {device}, "
              f"{torch.get_num_threads()} torch threads, {args.steps} timed steps per setting\n")
        print("| precision | step (median) | vs float32 |\n|---|---|---|")
        print(f"| float32 | {f32 * 1e3:.0f} ms | 1.00 |")
        print(f"| {name} autocast | {mixed * 1e3:.0f} ms | **{f32 / mixed:.2f}x** |")


def run_memory(args) -> None:
    """The planner's memory estimate next to a CPU measurement of one training step, for the five plans."""
    import torch

    from benchmarks import memory_probe as mp
    from planner.plan.memory import CALIBRATION_FACTOR, DEFAULT_BOXES_PER_IMAGE

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.perf_counter()
    plans = mp.probe_plans()
    rows = []
    for name, plan in plans.items():
        if args.memory_plans and name not in args.memory_plans:
            continue
        voxels, batch = mp.TEST_SIZES[name]
        if args.memory_voxels is not None:
            voxels = args.memory_voxels or None
        if args.memory_batch is not None:
            batch = args.memory_batch or None
        patch, batch = mp.probe_sizes(plan, voxels, batch)
        rows.append(mp.compare(name, plan, patch, batch))
        print(f"{name}: plan {plan.plan_id} patch {plan.patch_size} batch {plan.batch_size}, measured at {patch} "
              f"batch {batch} in {rows[-1].measured.seconds:.1f} s", flush=True)
    print(f"\nCPU, bfloat16 autocast with CUDA's float32 ops in float32, {DEFAULT_BOXES_PER_IMAGE} GT boxes per "
          f"image, CALIBRATION_FACTOR {CALIBRATION_FACTOR}; {time.perf_counter() - t0:.0f} s in all\n")
    print(mp.table(rows))
    print("\nMiB, measured / estimated (saved: what encoder, decoder and heads keep, CPU hooks / meta pass)\n")
    print(mp.phase_table(rows))
    ratios = [c.ratio for c in rows]
    acts = [c.activation_ratio for c in rows if c.activation_ratio is not None]
    print(f"\nestimate / measured peak: min {min(ratios):.3f}, max {max(ratios):.3f}")
    if acts:
        print(f"measured / estimated activation part (what CALIBRATION_FACTOR scales): min {min(acts):.3f}, "
              f"mean {sum(acts) / len(acts):.3f}, max {max(acts):.3f}")


def run_ddp(args) -> None:
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with bench_task(args) as (task, plan, bundle, workers):
        plain, ddp1 = ddp_overhead(bundle, workers, args.steps, args.warmup)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"\ntask {task}, plan {plan.plan_id}: patch {plan.patch_size}, global batch {plan.batch_size}, "
              f"device {device}, {args.steps} timed steps per setting\n")
        print("| setting | processes | step (median) | samples/s | vs plain |\n|---|---|---|---|---|")
        rate = plan.batch_size / plain
        print(f"| plain training step | 1 | {plain * 1e3:.0f} ms | {rate:.2f} | 1.00 |")
        print(f"| DDP wrapper, one process | 1 | {ddp1 * 1e3:.0f} ms | {plan.batch_size / ddp1:.2f} | "
              f"{plain / ddp1:.2f} (overhead {100 * (ddp1 - plain) / plain:+.1f} %) |")
        if args.ddp > 1:
            from bundles.retinaunet_template.scripts.distributed import global_batch

            step_n = ddp_scaling(bundle, args.ddp, workers, args.steps, args.warmup)
            rate_n = global_batch(plan.batch_size, args.ddp) / step_n
            print(f"| DDP | {args.ddp} | {step_n * 1e3:.0f} ms | {rate_n:.2f} | {rate_n / rate:.2f} "
                  f"(scaling efficiency {100 * rate_n / (args.ddp * rate):.0f} %) |")
            if device == "cpu":
                print(f"\n(CPU: the {args.ddp} processes share {os.cpu_count()} cores; efficiency is not a target here)")


def run(args) -> None:
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with bench_task(args) as (task, plan, bundle, workers):
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
    p.add_argument("--ddp", type=int, default=0, help="N >= 1: DDP overhead at N=1 vs plain steps, and with N > 1 "
                   "the throughput of N processes (one per GPU) and the scaling efficiency")
    p.add_argument("--precision", action="store_true", help="float32 vs autocast (bfloat16 on a CPU with native "
                   "support, float16 on CUDA) training steps, alternately on the same batches")
    p.add_argument("--memory", action="store_true", help="the planner's memory estimate vs one training step "
                   "measured on the CPU (bfloat16 autocast), for the five calibration plans")
    p.add_argument("--memory_voxels", type=int, default=None, help="--memory: shrink each plan's patch to at most "
                   "this many voxels, half of it in 2D (0: the plan's patch; default: the sizes of "
                   "tests/planner/test_memory_measured.py, memory_probe.TEST_SIZES)")
    p.add_argument("--memory_batch", type=int, default=None, help="--memory: images per step (0: the plan's batch; "
                   "default: as the test)")
    p.add_argument("--memory_plans", nargs="*", default=None, help="--memory: only these plans (3d 3dlr1 2d "
                   "3d_2mod 3d_cpu)")
    args = p.parse_args(argv)
    if args.memory:
        run_memory(args)
    elif args.precision:
        run_precision(args)
    elif args.ddp:
        run_ddp(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
