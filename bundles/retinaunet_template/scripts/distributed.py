"""torch.distributed for ``configs/multi_gpu_train.json``: process group, rank facts, gathers, batch split.

Launched by ``torchrun`` (or ``nndet_train --gpus N``), which sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE`` and the rendezvous. Without a process group every function here answers as the only
process of a run of one (rank 0, world size 1), so ``configs/train.json`` alone needs none of it.

Rules of a DDP run (see ``docs/distributed.md`` of the project):

* The plan's ``batch_size`` B is the *global* batch. Each of N ranks takes ``ceil(B / N)`` samples of every
  global batch (strided: rank r takes samples r, r + N, ...); when N does not divide B the global batch grows to
  ``N * ceil(B / N)`` and a warning says so (a smaller one would leave ranks without a sample).
* The global batches are the single-process run's: drawn from (seed, epoch) in every rank alike, so a run
  resumed with another N continues with the same patches.
* The per-step torch RNG (hard-negative sampling) is seeded from (seed, iteration, rank).
* No SyncBatchNorm: the network uses instance norm, which has no batch statistics to synchronise.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MIN = 30


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank (0 without a process group; ``RANK`` of torchrun before the group exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of processes (1 without a process group; ``WORLD_SIZE`` of torchrun before it exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0: the only process that writes checkpoints, logs, TensorBoard events and plots."""
    return rank() == 0


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init(timeout_min: float = DEFAULT_TIMEOUT_MIN) -> torch.device:
    """Join the process group torchrun set up: NCCL on CUDA, gloo on the CPU; returns this rank's device.

    Also: CUDA device of the rank selected; INFO logging on rank 0 only (other ranks log warnings and errors).

    Raises:
        RuntimeError: not launched by torchrun (no ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` in the environment).
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"configs/multi_gpu_train.json runs under torchrun (environment lacks {', '.join(missing)}): "
            "torchrun --nproc_per_node N -m monai.bundle run training --config_file "
            "\"['configs/train.json','configs/multi_gpu_train.json']\" ..., or nndet_train TASK --gpus N"
        )
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_min))
    level = logging.INFO if is_main() else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank()}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    logger.info("DDP: %d processes (%s backend), this is rank %d on %s", world_size(), dist.get_backend(), rank(),
                device)
    return device


def finalize() -> None:
    """Leave the process group (after training, on every rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``network`` (already on ``device``); the network itself without a group.

    The trainer steps the wrapper (gradients are averaged over ranks in backward); checkpoints, SWA and
    validation use the plain network, so every saved state is rank-independent.
    """
    if not is_distributed():
        return network
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (the argument itself otherwise)."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def per_rank_batch(batch_size: int, world: int | None = None) -> int:
    """Samples per rank of a global batch of ``batch_size`` over ``world`` ranks: ``ceil(batch_size / world)``."""
    world = world_size() if world is None else int(world)
    return max(1, math.ceil(int(batch_size) / world))


def global_batch(batch_size: int, world: int | None = None) -> int:
    """The global batch actually drawn: ``world * per_rank_batch`` (``batch_size`` when ``world`` divides it)."""
    world = world_size() if world is None else int(world)
    return world * per_rank_batch(batch_size, world)


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
    """A tensor for a collective: on this rank's GPU under NCCL (which takes no CPU tensors), else on the CPU."""
    on_gpu = dist.get_backend() == "nccl"
    return torch.tensor(values, dtype=dtype, device=torch.device("cuda", torch.cuda.current_device()) if on_gpu
                        else "cpu")


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per key, the mean over ranks (same keys on every rank); the dict itself without a process group."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = _tensor([values[k] for k in keys], torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def all_true(flag: bool) -> bool:
    """True only if ``flag`` is True on every rank (a collective: every rank must call it)."""
    if not is_distributed():
        return bool(flag)
    t = _tensor([1 if flag else 0], torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
