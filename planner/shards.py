"""Cases split over processes, one device each: ``nndet_predict --gpus N`` and the Deploy app's ``--processes N``.

* :func:`split_round_robin`: the sorted to-do list -> N shards, item i to shard i % N (deterministic);
* :func:`assign_devices`: shard k -> ``cuda:k`` when at least N CUDA devices are visible, N CPU processes with
  ``cores // N`` torch threads each when none is, an error naming the count when fewer than N are;
* :func:`run_shards`: one spawned process per shard (it dies with its parent, :func:`planner.paths.die_with_parent`),
  a progress bar over all items in the parent, every shard's outcome collected: a shard that fails or dies never
  stops the others;
* :class:`WrittenCounter`: the bar's count, outputs written since the start.

A GPU shard's process sees only its GPU (``CUDA_VISIBLE_DEVICES``), so inside it the device is ``cuda:0`` and
every library (torch, the CuPy box kernels) allocates there and nowhere else.
"""

from __future__ import annotations

import logging
import os
import queue as queue_lib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner import paths

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often the parent looks at its shards (progress, exits)
STOP_SECONDS = 10.0  # how long a stopped shard may take to exit before it is killed


@dataclass(frozen=True)
class ShardDevice:
    """Where shard ``index`` runs.

    Attributes:
        index: the shard (0..N-1).
        device: the device as the parent numbers it: ``cuda:k`` or ``cpu``.
        threads: torch intra-op threads of a CPU shard (None on a GPU).
    """

    index: int
    device: str
    threads: int | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def local_device(self) -> str:
        """The device inside the shard's process: ``cuda:0`` (its only visible GPU) or ``cpu``."""
        return "cuda:0" if self.is_cuda else "cpu"

    def environ(self) -> dict[str, str]:
        """Variables the shard's process starts with: its GPU as the only visible one (the k-th of the parent's
        ``CUDA_VISIBLE_DEVICES`` when that is set), or its share of the CPU threads (``det_torch_threads``)."""
        if not self.is_cuda:
            return {"det_torch_threads": str(self.threads or 1), "CUDA_VISIBLE_DEVICES": ""}
        k = int(self.device.partition(":")[2] or 0)
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        return {"CUDA_VISIBLE_DEVICES": visible[k] if k < len(visible) else str(k)}


@dataclass
class ShardOutcome:
    """What one shard's process returned (``result``), or why it returned nothing (``error``)."""

    index: int
    items: list[Any]
    result: Any = None
    error: str | None = None


def split_round_robin(items: Sequence[Any], n: int, key: Callable[[Any], Any] | None = None) -> list[list[Any]]:
    """``min(n, len(items))`` non-empty shards of the sorted ``items`` (by ``key``): item i goes to shard i % n.

    Sorting first makes the split depend only on what is to do, not on the order it was listed in.
    """
    if n < 1:
        raise ValueError(f"{n} shard(s): ask for at least 1 process")
    ordered = sorted(items, key=key)
    n = min(n, len(ordered))
    return [ordered[k::n] for k in range(n)]


def assign_devices(n: int, device: str | None = None, device_count: int | None = None,
                   cores: int | None = None) -> list[ShardDevice]:
    """The device of each of ``n`` shard processes.

    Args:
        n: processes (``--gpus N``).
        device: ``cpu`` forces CPU processes; anything else (or None) uses the GPUs when there are any.
        device_count: visible CUDA devices (default ``torch.cuda.device_count()``).
        cores: CPU threads to share out (default :func:`planner.paths.torch_threads`: ``det_torch_threads`` or
            every core).

    Returns:
        ``cuda:0`` .. ``cuda:n-1`` when at least ``n`` CUDA devices are visible; else, with no CUDA device (or
        ``device='cpu'``), ``n`` CPU shards with ``max(1, cores // n)`` torch threads each.

    Raises:
        ValueError: ``n < 1``, or some CUDA devices are visible but fewer than ``n``.
    """
    if n < 1:
        raise ValueError(f"--gpus {n}: ask for at least 1 process")
    cpu = device is not None and str(device).startswith("cpu")
    if not cpu and device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    count = 0 if cpu else int(device_count or 0)
    if count >= n:
        return [ShardDevice(k, f"cuda:{k}") for k in range(n)]
    if count > 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ValueError(f"--gpus {n}: one process per GPU needs {n} CUDA devices, but {count} are visible{shown}; "
                         f"ask for at most {count}")
    threads = max(1, (cores if cores is not None else paths.torch_threads()) // n)
    logger.info("%s: %d CPU process(es) with %d torch thread(s) each", "device cpu" if cpu else "no CUDA device",
                n, threads)
    return [ShardDevice(k, "cpu", threads) for k in range(n)]


@contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (a spawned process copies them when it starts), then restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _shard_main(results, device: ShardDevice, target: Callable[..., Any], items: list[Any], args: tuple,
                log_level: int) -> None:
    """A shard's process: die with the parent, log with the shard's name, run ``target`` and send its result."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops its shards
    paths.die_with_parent()
    logging.basicConfig(level=log_level, format=f"%(levelname)s shard{device.index} %(name)s: %(message)s")
    where = f"GPU {device.device} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})" \
        if device.is_cuda else f"CPU, {device.threads} torch thread(s)"
    logger.info("shard %d: %d item(s) on %s", device.index, len(items), where)
    try:
        result = target(items, device.local_device, *args)
    except Exception as e:  # noqa: BLE001 -- the parent reports it with the shard's items
        logger.exception("shard %d failed", device.index)
        results.put((device.index, None, f"{type(e).__name__}: {e}"))
        return
    results.put((device.index, result, None))


def run_shards(target: Callable[..., Any], shards: Sequence[list[Any]], devices: Sequence[ShardDevice],
               args: tuple = (), *, progress: Callable[[], int] | None = None, total: int | None = None,
               desc: str = "shards", unit: str = "case") -> list[ShardOutcome]:
    """Run ``target(shards[k], devices[k].local_device, *args)`` in one spawned process per shard.

    Args:
        target: a module-level function (the processes import it); its return value must pickle.
        shards: the items of each process (:func:`split_round_robin`).
        devices: one per shard (:func:`assign_devices`); a process starts with its :meth:`ShardDevice.environ`.
        args: further arguments of ``target`` (pickled).
        progress: items finished so far, over all shards (e.g. outputs written since the start), for the parent's
            progress bar; None: no bar.
        total: the bar's total (default: every item).

    Returns:
        One :class:`ShardOutcome` per shard, in shard order: ``result`` what ``target`` returned, or ``error`` (the
        exception it raised, or the exit code of a process that died without an answer).

    The processes get SIGKILL when the parent dies (``kill -9`` included) and are stopped when it is interrupted.
    """
    import multiprocessing

    from tqdm import tqdm

    if len(shards) != len(devices):
        raise ValueError(f"{len(shards)} shard(s) but {len(devices)} device(s)")
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked; a fresh process also sees only its GPU
    results = ctx.Queue()
    procs, outcomes = [], {}
    level = logging.getLogger().getEffectiveLevel()
    bar = tqdm(total=total if total is not None else sum(len(s) for s in shards), desc=desc, unit=unit,
               disable=progress is None)
    try:
        for items, dev in zip(shards, devices, strict=True):
            with _environ({**dev.environ(), "TQDM_DISABLE": "1"}):  # one bar: the parent's
                p = ctx.Process(target=_shard_main, args=(results, dev, target, list(items), tuple(args), level),
                                name=f"shard{dev.index}")
                p.start()
            procs.append(p)
        while len(outcomes) < len(procs):
            try:
                k, result, error = results.get(timeout=POLL_SECONDS)
                outcomes[k] = ShardOutcome(k, list(shards[k]), result, error)
            except queue_lib.Empty:
                for k, p in enumerate(procs):  # an answer is flushed before its process exits: none will come
                    if k not in outcomes and p.exitcode is not None and not _drain(results, shards, outcomes, k):
                        outcomes[k] = ShardOutcome(k, list(shards[k]), error=_died(k, p.exitcode))
            if progress is not None:
                bar.n = min(progress(), bar.total)
                bar.refresh()
    finally:
        bar.close()
        _stop(procs)
        results.close()
    for o in sorted(outcomes.values(), key=lambda o: o.index):
        if o.error:
            logger.error("shard %d (%d item(s)): %s", o.index, len(o.items), o.error)
    return [outcomes[k] for k in range(len(procs))]


def _died(k: int, exitcode: int) -> str:
    import signal

    if exitcode == -signal.SIGKILL:
        why = "killed by SIGKILL (out of memory?)"
    elif exitcode < 0:
        why = f"killed by signal {-exitcode}"
    else:
        why = f"exit code {exitcode}; its log is above"
    return f"shard {k}'s process ended without an answer ({why})"


def _drain(results, shards: Sequence[list[Any]], outcomes: dict[int, ShardOutcome], k: int) -> bool:
    """Read answers still in the queue; True when shard ``k``'s is among them."""
    while True:
        try:
            i, result, error = results.get(timeout=0.1)
        except queue_lib.Empty:
            return k in outcomes
        outcomes[i] = ShardOutcome(i, list(shards[i]), result, error)


def _stop(procs: Sequence[Any]) -> None:
    """Terminate shards still running (interrupted parent), kill those that ignore it, reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():  # a handler caught SIGTERM (holoscan installs one)
            p.kill()
            p.join()


def written_since(path: Path, since_ns: int) -> bool:
    """Whether ``path`` was written at or after ``since_ns`` (``time.time_ns()``)."""
    try:
        return path.stat().st_mtime_ns >= since_ns
    except FileNotFoundError:
        return False


class WrittenCounter:
    """How many of ``files`` were written since ``since_ns``: a progress count for :func:`run_shards` that
    looks again only at the files not seen yet."""

    def __init__(self, files: Sequence[Path], since_ns: int) -> None:
        self.pending, self.since_ns, self.done = list(files), since_ns, 0

    def __call__(self) -> int:
        left = [f for f in self.pending if not written_since(f, self.since_ns)]
        self.done += len(self.pending) - len(left)
        self.pending = left
        return self.done
