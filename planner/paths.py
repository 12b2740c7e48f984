"""Environment variables and folder layout, in one place.

nnDetection users know these variables:

* ``det_data``: root of the raw and preprocessed tasks (``$det_data/Task000D3_Example/...``).
* ``det_models``: root of trained models and generated bundles.
* ``det_num_threads``: worker processes for data loading / preprocessing (default 6).
* ``det_torch_threads``: intra-op threads of the process that runs the network on the CPU (training,
  inference; default: every core). Worker processes keep one thread each (``OMP_NUM_THREADS=1``).
* ``det_verbose``: ``1`` for debug logging.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

REQUIRED_VARS = ("det_data", "det_models")
OPTIONAL_VARS = {"det_num_threads": "6", "det_torch_threads": "", "det_verbose": "0", "OMP_NUM_THREADS": "1"}


class EnvironmentError_(RuntimeError):
    """A required environment variable is missing (message names it and shows the export line)."""


def _require(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        raise EnvironmentError_(
            f"Environment variable '{name}' is not set. nnDetection-style tools need it, e.g.:\n"
            f"    export {name}=/path/to/{name}\n"
            "(`make demo` and `make test` set it to a folder inside the repo.)"
        )
    return Path(value).expanduser()


def det_data() -> Path:
    """Root folder of raw and preprocessed tasks (``$det_data``)."""
    return _require("det_data")


def det_models() -> Path:
    """Root folder of models and generated bundles (``$det_models``)."""
    return _require("det_models")


def num_threads() -> int:
    """Worker count from ``det_num_threads`` (default 6)."""
    raw = os.environ.get("det_num_threads", OPTIONAL_VARS["det_num_threads"])
    try:
        return max(0, int(raw))
    except ValueError as e:
        raise EnvironmentError_(f"det_num_threads must be an integer, got {raw!r}: export det_num_threads=4") from e


def local_processes() -> int:
    """Processes of this run on this machine: torchrun's ``LOCAL_WORLD_SIZE`` (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError:
        return 1


def torch_threads() -> int:
    """Intra-op threads for the network process on the CPU: ``det_torch_threads``, default every core (shared
    out between the processes of a torchrun run on this machine)."""
    raw = os.environ.get("det_torch_threads", "")
    if not raw:
        return max(1, (os.cpu_count() or 1) // local_processes())
    try:
        return max(1, int(raw))
    except ValueError as e:
        raise EnvironmentError_(f"det_torch_threads must be an integer, got {raw!r}: export det_torch_threads=2") from e


def use_cpu_threads(device) -> int:
    """On the CPU, let the network use ``torch_threads()`` intra-op threads; returns the count in use.

    ``OMP_NUM_THREADS=1`` (nnDetection's setting, right for loader and preprocessing workers) would
    otherwise leave all but one core idle while the network trains or predicts: a training step of the
    ``cpu`` preset takes 1.8x less time with 2 threads than with 1 on a 2-core VM. Loader workers set one
    thread each themselves. Nothing changes on a GPU device.
    """
    import torch

    if getattr(device, "type", str(device)) == "cpu":
        n = torch_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return torch.get_num_threads()


def verbose() -> bool:
    return os.environ.get("det_verbose", "0") not in ("0", "", "false", "False")


_TASK_RE = re.compile(r"^Task(\d{3})(.*)$")


def resolve_task(task: str | int, root: Path | None = None) -> str:
    """Turn ``000``, ``0``, ``Task000`` or ``Task000D3_Example`` into the full task folder name.

    Raises:
        FileNotFoundError: no or several matching task folders, listing what exists.
    """
    root = det_data() if root is None else Path(root)
    task = str(task)
    if root.is_dir() and (root / task).is_dir() and _TASK_RE.match(task):
        return task
    m = _TASK_RE.match(task)
    if m:
        number = m.group(1)
    elif task.isdigit():
        number = f"{int(task):03d}"
    else:
        raise FileNotFoundError(
            f"'{task}' is not a task id: use a number (000), Task000 or a folder name like Task000D3_Example"
        )
    found = sorted(p.name for p in root.glob(f"Task{number}*") if p.is_dir()) if root.is_dir() else []
    full_name = m is not None and task != f"Task{number}"  # "Task000D3_Wrong": a name, not just an id
    if full_name and task not in found:
        raise FileNotFoundError(f"No task folder {task} under det_data={root}; task id {number} is "
                                f"{found or 'not there either'}. Pass the exact folder name or just the id {number}.")
    if len(found) == 1:
        return found[0]
    existing = sorted(p.name for p in root.glob("Task*") if p.is_dir()) if root.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"No task folder for id {number} under det_data={root}. Existing tasks: {existing or 'none'}. "
            "Create one with `nndet_example` or put your data in det_data/TaskXXX_Name/raw_splitted."
        )
    raise FileNotFoundError(f"Task id {number} is ambiguous under {root}: {found}. Pass the full folder name.")


def task_dir(task: str | int) -> Path:
    return det_data() / resolve_task(task)


def raw_splitted_dir(task: str | int) -> Path:
    return task_dir(task) / "raw_splitted"


def preprocessed_dir(task: str | int) -> Path:
    return task_dir(task) / "preprocessed"


def model_dir(task: str | int, model: str) -> Path:
    """``$det_models/<task>/<model>`` (the generated bundle root)."""
    return det_models() / resolve_task(task) / model


def mp_context():
    """Multiprocessing context for worker pools (``det_mp_start``: fork | forkserver | spawn).

    ``fork`` (the default where it exists) lets workers reuse the parent's imports (MONAI/torch take
    seconds to import, which ``spawn`` pays again in every worker); pools only run numpy/scipy work and
    ``OMP_NUM_THREADS=1`` is expected, so forking is safe. Set ``det_mp_start=spawn`` to be conservative.
    """
    import multiprocessing

    default = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    method = os.environ.get("det_mp_start", default)
    if method not in multiprocessing.get_all_start_methods():
        raise EnvironmentError_(
            f"det_mp_start={method!r} is not available here; use one of {multiprocessing.get_all_start_methods()}"
        )
    return multiprocessing.get_context(method)


def die_with_parent(sig: int | None = None) -> None:
    """Make this (worker) process get SIGKILL (or ``sig``) when its parent dies (Linux ``PR_SET_PDEATHSIG``), so
    a ``kill -9`` of ``nndet_prep`` / training / prediction leaves no worker running and writing; a no-op
    elsewhere. Exits at once when the parent is already gone (the race between fork and prctl). torchrun takes
    SIGTERM, which it passes on to its workers (SIGKILL would leave them behind)."""
    import signal

    if _PRCTL is None:
        return
    parent = os.getppid()
    _PRCTL(1, int(signal.SIGKILL if sig is None else sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:
        os._exit(1)


def _resolve_prctl():
    """libc's ``prctl``, looked up in the parent at import: a forked child of a multi-threaded process must
    not ``dlopen`` (the loader's lock may be held by a thread that does not exist in the child: deadlock)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _resolve_prctl()


def _pool_init(initializer, initargs) -> None:
    import signal

    # a handler the parent installed (holoscan's, when the Deploy app ran in this process) would make the
    # worker survive Pool.terminate()'s SIGTERM and the pool's exit hang: workers take the default action
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()
    if initializer is not None:
        initializer(*initargs)


def worker_pool(processes: int, initializer=None, initargs: tuple = ()):
    """A ``multiprocessing.Pool`` of :func:`mp_context` whose workers die with their parent.

    The workers are forked with SIGTERM at its default action: :func:`_pool_init` resets it too, but a
    ``Pool.terminate()`` right after the pool starts (an error in the parent) can reach a worker before its
    initializer ran, and a handler inherited from the parent (holoscan's) would then swallow it and leave the
    pool's join waiting for ever (seen once in CI).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        return mp_context().Pool(processes, initializer=_pool_init, initargs=(initializer, initargs))
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return mp_context().Pool(processes, initializer=_pool_init, initargs=(initializer, initargs))
    finally:
        signal.signal(signal.SIGTERM, old)
