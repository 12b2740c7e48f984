"""The node's state, all on disk under ``spool/`` so that a restart (or a SIGKILL) loses nothing:

    incoming/<study>/<series>/<SOPInstanceUID>.dcm   instances being received (+ .peer.json, .last)
    queue/<job>/                                      complete series waiting: job.json + dicom/
    work/<job>/                                       the series being processed (back to queue/ on restart)
    results/<answer>/                                 the app's outputs (SR, SEG, JSON, report.json)
    outbox/<answer>/                                  SR + SEG waiting to be sent, send.json (tries, next try)
    answered/<answer>.json                            sent: the series is never answered again by this model
    quarantine/<job>/                                 a bad series with reason.txt (and its instances)

``<answer>`` is ``<SeriesInstanceUID>__<model name>-<model version>``: the idempotency key. Every file is
written under a temporary name, fsynced and renamed; every move between folders is one ``os.replace`` of a
directory, so each item is in exactly one state. Series that arrive while their study's earlier series is
being processed are independent jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from planner.io import atomic_path

STATES = ("incoming", "queue", "work", "results", "outbox", "answered", "quarantine")
_SAFE = re.compile(r"[^0-9A-Za-z._-]+")


def safe_name(text: str) -> str:
    """A file-name-safe form of a UID or model identity."""
    return _SAFE.sub("_", str(text)).strip("._") or "unnamed"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path`` with :func:`planner.io.atomic_path` (temporary sibling, renamed), fsynced
    before the rename: a received instance is on disk before the node answers the C-STORE."""
    with atomic_path(path, suffix=".tmp") as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


class Spool:
    """The folders above, with the few moves the node makes between them (thread-safe)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for s in STATES:
            (self.root / s).mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    def dir(self, state: str) -> Path:
        return self.root / state

    # ---------------------------------------------------------------- receiving
    def store_instance(self, study: str, series: str, sop: str, data: bytes, peer: Mapping[str, Any]) -> Path:
        """One received instance into ``incoming/<study>/<series>/``; returns its path."""
        folder = self.dir("incoming") / safe_name(study) / safe_name(series)
        with self.lock:
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / ".peer.json").exists():
                write_json_atomic(folder / ".peer.json", {**peer, "study": study, "series": series,
                                                           "first_received": time.time()})
            target = folder / f"{safe_name(sop)}.dcm"
            write_bytes_atomic(target, data)
            (folder / ".last").touch()
        return target

    def incoming_series(self) -> Iterator[tuple[Path, float]]:
        """(series folder, seconds since its last instance) of every series being received."""
        now = time.time()
        for study in sorted(p for p in self.dir("incoming").iterdir() if p.is_dir()):
            for series in sorted(p for p in study.iterdir() if p.is_dir()):
                last = series / ".last"
                mtime = last.stat().st_mtime if last.exists() else series.stat().st_mtime
                yield series, now - mtime

    def enqueue(self, series_dir: Path, reason: str) -> Path | None:
        """Move a received series to ``queue/`` as a job (job.json + dicom/); None when it is empty."""
        with self.lock:
            if not series_dir.is_dir():
                return None
            instances = [p for p in series_dir.iterdir() if p.suffix == ".dcm" and not p.name.startswith(".")]
            peer = read_json(series_dir / ".peer.json") if (series_dir / ".peer.json").exists() else {}
            job = self.dir("queue") / f"{time.time_ns():020d}_{safe_name(series_dir.name)}"
            if not instances:
                shutil.rmtree(series_dir, ignore_errors=True)
                return None
            for marker in (".peer.json", ".last"):  # their content is in job.json; the app reads dicom/ only
                (series_dir / marker).unlink(missing_ok=True)
            staging = self.dir("queue") / f".{job.name}.tmp"
            staging.mkdir()
            write_json_atomic(staging / "job.json", {**peer, "num_instances": len(instances), "complete_by": reason,
                                                     "enqueued": time.time()})
            os.replace(series_dir, staging / "dicom")
            os.replace(staging, job)
            fsync_dir(self.dir("queue"))
            study = series_dir.parent
            if study.is_dir() and not any(study.iterdir()):
                study.rmdir()
            return job

    # ---------------------------------------------------------------- the work queue
    def queued(self) -> list[Path]:
        return sorted(p for p in self.dir("queue").iterdir() if p.is_dir() and not p.name.startswith("."))

    def backlog(self) -> int:
        """Series waiting or being processed (what the queue limit counts)."""
        return len(self.queued()) + len([p for p in self.dir("work").iterdir() if p.is_dir()])

    def take(self) -> Path | None:
        """The oldest queued job, moved to ``work/``; None when the queue is empty."""
        with self.lock:
            for job in self.queued():
                target = self.dir("work") / job.name
                os.replace(job, target)
                return target
        return None

    def finish(self, job: Path) -> None:
        shutil.rmtree(job, ignore_errors=True)

    def quarantine(self, job: Path, reason: str) -> Path:
        """Move a job (or a received series folder) to ``quarantine/`` with ``reason.txt``."""
        with self.lock:
            target = self.dir("quarantine") / job.name
            if target.exists():
                target = target.with_name(f"{target.name}-{uuid.uuid4().hex[:6]}")
            os.replace(job, target)
            write_bytes_atomic(target / "reason.txt", (reason.rstrip() + "\n").encode())
            return target

    # ---------------------------------------------------------------- answers
    def is_answered(self, answer: str) -> bool:
        """True when this series was answered by this model (sent, or waiting in the outbox)."""
        return (self.dir("answered") / f"{answer}.json").exists() or (self.dir("outbox") / answer).is_dir()

    def put_outbox(self, answer: str, files: list[Path], send: Mapping[str, Any]) -> Path:
        """The files to send (copied) and ``send.json`` as ``outbox/<answer>/``, in one rename."""
        with self.lock:
            staging = self.dir("outbox") / f".{answer}.tmp-{uuid.uuid4().hex[:6]}"
            staging.mkdir()
            for f in files:
                shutil.copy2(f, staging / f.name)
            write_json_atomic(staging / "send.json", {"tries": 0, "next_try": 0.0, **send,
                                                      "files": [f.name for f in files]})
            target = self.dir("outbox") / answer
            os.replace(staging, target)
            fsync_dir(self.dir("outbox"))
            return target

    def outbox(self) -> list[Path]:
        return sorted(p for p in self.dir("outbox").iterdir() if p.is_dir() and not p.name.startswith("."))

    def mark_sent(self, item: Path, record: Mapping[str, Any]) -> None:
        """Record the answer in ``answered/`` and drop the outbox item."""
        with self.lock:
            write_json_atomic(self.dir("answered") / f"{item.name}.json", dict(record))
            shutil.rmtree(item, ignore_errors=True)

    # ---------------------------------------------------------------- restart
    def recover(self) -> dict[str, int]:
        """After a restart: jobs in ``work/`` go back to the queue, half-written files and staging folders
        are removed. Returns what was done."""
        done = {"requeued": 0, "partial_files": 0, "staging": 0}
        with self.lock:
            for job in sorted(p for p in self.dir("work").iterdir() if p.is_dir()):
                os.replace(job, self.dir("queue") / job.name)
                done["requeued"] += 1
            # a series moved into a queue staging folder whose final rename did not happen: finish the move
            for staging in sorted(self.dir("queue").glob(".*.tmp")):
                if (staging / "dicom").is_dir():
                    os.replace(staging, self.dir("queue") / staging.name[1:-len(".tmp")])
                    done["requeued"] += 1
            for state in STATES:
                for p in self.dir(state).rglob(".*.tmp*"):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                        done["staging"] += 1
                    else:
                        p.unlink(missing_ok=True)
                        done["partial_files"] += 1
        return done

    def counts(self) -> dict[str, int]:
        """Items per state (incoming: series being received)."""
        out = {"incoming": sum(1 for _ in self.incoming_series())}
        for s in ("queue", "work", "outbox", "quarantine", "results"):
            out[s] = len([p for p in self.dir(s).iterdir() if p.is_dir() and not p.name.startswith(".")])
        out["answered"] = len(list(self.dir("answered").glob("*.json")))
        return out
