"""Atomic writes and JSON helpers: a crash never leaves a half-written artefact."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it; ``os`` has no getter)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file (0o666) or folder (0o777) made by ``tempfile`` the mode the user's umask allows:
    ``mkstemp`` / ``mkdtemp`` make them 0600 / 0700 whatever the umask, so a shared ``det_data`` would
    become unreadable to colleagues."""
    p = Path(path)
    base = 0o777 if p.is_dir() else 0o666
    os.chmod(p, base & ~current_umask())


def make_temp_dir(prefix: str, suffix: str = "", dir: str | os.PathLike | None = None) -> Path:
    """``tempfile.mkdtemp`` with the umask's mode (see :func:`apply_umask`)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=dir))
    apply_umask(tmp)
    return tmp


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            apply_umask(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    """Write JSON atomically (numpy scalars/arrays converted)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, default=_to_jsonable) + "\n")
    return Path(path)


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}). Fix or regenerate the file.") from e


def save_npy(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Save a .npy atomically (readable later with mmap_mode='r')."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)
    return Path(path)


class TaskLocked(FileExistsError):
    """Another run holds the lock of this task and stage; the message names it and what to do."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``path`` as the lock of ``what`` (e.g. "nndet_prep of Task000") while the block runs, so a second
    run of the same task and stage refuses instead of redoing and racing the first.

    The lock file holds the holder's pid, host and start time. A lock left by a dead process of this host
    (``kill -9``, power cut) is stale: it is taken over with a warning. A lock of another host cannot be
    checked: it is refused, and the message says which file to delete once that run is gone.

    Raises:
        TaskLocked: a live run (or one on another host) holds the lock.
    """
    import logging
    import socket
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": what}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~current_umask())
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                logging.getLogger(__name__).warning("%s: stale lock of pid %s (no longer running), taken over",
                                                    path, pid)
                path.unlink(missing_ok=True)
                continue
            if not holder:  # being written right now, or empty: look again
                time.sleep(0.2)
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise TaskLocked(f"{what} is already running (pid {pid} on host {host}, since {since}); wait for it to "
                             f"finish, or, if it is not running any more, delete {path}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise TaskLocked(f"{what}: could not take the lock {path}; delete it if no other run is going on")
    try:
        yield path
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass
