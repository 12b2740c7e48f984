"""The DICOM node: receive studies from a PACS, run the detection app on each complete series, send SR + SEG
back. ``nndet_dicom_node --config node.yaml`` (also ``nndet dicom-node``); ``... status`` prints the queue.

Threads: pynetdicom's server threads receive (``network.Receiver`` -> ``spool.incoming``); a scheduler moves
a series to the queue once no instance came for ``series.idle_seconds`` (or at association release with
``series.complete_on_release``); the main thread is the one worker: it runs the Deploy app
(``apps.detect_dicom.app.run_app``, the consolidated bundle loaded once) on each queued series and puts the
SR and SEG into the outbox; a sender thread C-STOREs outbox items to the destination (the sending peer by
default) and retries failures with exponential backoff, also after a restart. A series is answered once per
model identity (``spool`` module). Every association, series and send is a line of the audit log.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apps.dicom_node.config import NodeConfig, NodeConfigError, Peer, load_config
from apps.dicom_node.spool import Spool, read_json, safe_name, write_json_atomic

logger = logging.getLogger("nndet.dicom_node")


class Audit:
    """JSON lines, one per event, appended and flushed (``time`` in UTC ISO 8601, ``event``, the rest)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __call__(self, record: Mapping[str, Any]) -> None:
        line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record},
                          sort_keys=False, default=str)
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()


def answer_key(series_uid: str, model_name: str, model_version: str) -> str:
    """The idempotency key of one series answered by one model identity."""
    return f"{safe_name(series_uid)}__{safe_name(model_name)}-{safe_name(model_version)}"


def backoff(tries: int, initial: float, maximum: float) -> float:
    """Seconds to wait before try ``tries + 1``: initial, 2x, 4x, ... capped at ``maximum``."""
    return min(maximum, initial * 2 ** max(0, tries - 1))


class ForwardTimer:
    """Seconds spent inside the networks' forward passes (hooks on each fold's network), so the audit log can
    say how much of a series' time is the network and how much is everything else."""

    def __init__(self, predictor: Any) -> None:
        self.seconds = 0.0
        self._t0: dict[int, float] = {}
        for det in getattr(predictor, "detectors", []):
            net = getattr(det, "network", det)
            if hasattr(net, "register_forward_pre_hook"):
                net.register_forward_pre_hook(self._pre)
                net.register_forward_hook(self._post)

    def _pre(self, module, args) -> None:  # noqa: ARG002
        self._t0[id(module)] = time.perf_counter()

    def _post(self, module, args, output) -> None:  # noqa: ARG002
        self.seconds += time.perf_counter() - self._t0.pop(id(module), time.perf_counter())

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return round(s, 3)


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.audit = Audit(cfg.audit_path)
        self.stop_event = threading.Event()
        self.model = None
        self.rules = None
        self.receiver = None
        self._threads: list[threading.Thread] = []
        self.started_at = time.time()
        self.forward = ForwardTimer(None)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        from apps.detect_dicom import pipeline
        from apps.detect_dicom.app import resolve_bundle
        from apps.detect_dicom.selection import load_rules
        from apps.dicom_node.network import Receiver

        recovered = self.spool.recover()
        self.started_at = time.time()
        self.rules = load_rules(self.cfg.rules)
        self.model = pipeline.load_model(resolve_bundle(self.cfg.model), num_tta=self.cfg.num_tta,
                                         device=self.cfg.device, operating_point=self.cfg.operating_point,
                                         masks=self.cfg.masks)
        self.forward = ForwardTimer(self.model.predictor)
        self.receiver = Receiver(self.cfg, self.spool.store_instance, self._released, self.spool.backlog, self.audit)
        self.receiver.start()
        for name, target in (("scheduler", self._schedule_loop), ("sender", self._send_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.audit({"event": "node_started", "ae_title": self.cfg.ae_title, "port": self.cfg.port,
                    "tls": self.cfg.tls.enabled, "model": self.model.name, "model_version": self.model.version,
                    "operating_point": self.model.operating_point, "recovered": recovered,
                    "counts": self.spool.counts()})
        logger.info("node %s ready: model %s %s, spool %s (recovered %s)", self.cfg.ae_title, self.model.name,
                    self.model.version, self.cfg.spool, recovered)

    def stop(self) -> None:
        self.stop_event.set()
        if self.receiver is not None:
            self.receiver.stop()
        for t in self._threads:
            t.join(timeout=10)
        self.audit({"event": "node_stopped", "counts": self.spool.counts()})

    def run_forever(self) -> None:
        """The worker loop (main thread) until :meth:`stop` is asked for (SIGTERM / SIGINT)."""
        while not self.stop_event.is_set():
            if not self.work_once():
                self.stop_event.wait(0.2)

    # ------------------------------------------------------------------ receiving -> queue
    def _released(self, series: Sequence[tuple[str, str]], peer: Mapping[str, Any]) -> None:
        if not self.cfg.complete_on_release:
            return
        for study, uid in series:
            folder = self.spool.dir("incoming") / safe_name(study) / safe_name(uid)
            if self.spool.enqueue(folder, "association released"):
                logger.info("series %s complete (association released)", uid)

    def schedule_once(self) -> int:
        """Enqueue every series idle for ``idle_seconds``; returns how many."""
        n = 0
        # after a restart the clock of a half-received series starts again: its sender gets time to resend
        since_start = time.time() - self.started_at
        for folder, idle in list(self.spool.incoming_series()):
            idle = min(idle, since_start)
            if idle >= self.cfg.idle_seconds and self.spool.enqueue(folder, f"idle {self.cfg.idle_seconds:g} s"):
                n += 1
                logger.info("series %s complete (idle %.1f s)", folder.name, idle)
        return n

    def _schedule_loop(self) -> None:
        while not self.stop_event.wait(min(0.5, self.cfg.idle_seconds / 4)):
            try:
                self.schedule_once()
            except Exception:  # noqa: BLE001 -- the scheduler must survive a bad folder
                logger.exception("scheduler")

    # ------------------------------------------------------------------ the worker
    def destination_for(self, job: Mapping[str, Any]) -> Peer | None:
        if self.cfg.destination is not None:
            return self.cfg.destination
        return self.cfg.peer(str(job.get("calling_ae", "")), str(job.get("host", "")))

    def work_once(self) -> bool:
        """Process the oldest queued series; False when the queue was empty."""
        job = self.spool.take()
        if job is None:
            return False
        t0 = time.perf_counter()
        info = read_json(job / "job.json") if (job / "job.json").exists() else {}
        series, study = str(info.get("series", job.name)), str(info.get("study", ""))
        base = {"study": study, "series": series, "calling_ae": info.get("calling_ae"), "host": info.get("host"),
                "instances": info.get("num_instances")}
        try:
            self._process(job, info, base, t0)
        except Exception as e:  # noqa: BLE001 -- never crash the node on one series
            reason = f"node error: {type(e).__name__}: {e}\n{traceback.format_exc()}"
            logger.exception("series %s", series)
            if job.exists():
                self.spool.quarantine(job, reason)
            self.audit({"event": "series_quarantined", **base, "reason": reason.splitlines()[0],
                        "seconds": round(time.perf_counter() - t0, 3)})
        return True

    def _process(self, job: Path, info: Mapping[str, Any], base: dict[str, Any], t0: float) -> None:
        import shutil

        from apps.detect_dicom.app import run_app

        model = self.model
        answer = answer_key(base["series"], model.name, model.version)
        if self.spool.is_answered(answer):
            self.spool.finish(job)
            self.audit({"event": "series_duplicate", **base, "answer": answer,
                        "reason": "already answered by this model version (not answered again)"})
            return
        results_dir = self.spool.dir("results") / answer
        tmp = self.spool.dir("results") / f".{answer}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.forward.take()
        results = run_app(job / "dicom", tmp, model, self.rules, overwrite=True)
        forward_s = self.forward.take()
        done = [r for r in results if r.status == "done"]
        if not done:
            report = read_json(tmp / "report.json") if (tmp / "report.json").exists() else {}
            reasons = [f"{r.status}: {r.reason}" for r in results] or [
                f"not selected: {s.get('reason', '')}" for s in report.get("not_selected", [])] or ["no image series"]
            reason = "; ".join(reasons)
            shutil.rmtree(tmp, ignore_errors=True)
            self.spool.quarantine(job, reason)
            self.audit({"event": "series_quarantined", **base, "reason": reason,
                        "seconds": round(time.perf_counter() - t0, 3)})
            logger.warning("series %s quarantined: %s", base["series"], reason)
            return
        shutil.rmtree(results_dir, ignore_errors=True)
        tmp.rename(results_dir)
        r = done[0]
        files = [results_dir / r.series_instance_uid / Path(r.outputs[k]).name for k in ("sr", "seg") if k in r.outputs]
        dest = self.destination_for(info)
        if dest is None:
            raise RuntimeError(f"no destination for the results of {base['series']}: the sender "
                               f"{base['calling_ae']}@{base['host']} has no port in peers and no destination is set")
        self.spool.put_outbox(answer, files, {"destination": {"ae_title": dest.ae_title, "host": dest.host,
                                                               "port": dest.port}, **base,
                                              "received_last": info.get("enqueued"), "created": time.time()})
        self.spool.finish(job)
        self.audit({"event": "series_answered", **base, "answer": answer, "boxes": r.num_boxes,
                    "findings": r.num_findings, "files": [f.name for f in files],
                    "seconds": round(time.perf_counter() - t0, 3), "app_seconds": r.seconds,
                    "forward_seconds": forward_s})

    # ------------------------------------------------------------------ sending
    def send_once(self, now: float | None = None) -> int:
        """Try every outbox item that is due; returns how many were sent."""
        from apps.dicom_node.network import send_files

        sent = 0
        now = time.time() if now is None else now
        for item in self.spool.outbox():
            meta_file = item / "send.json"
            try:
                meta = read_json(meta_file)
            except (OSError, ValueError):
                continue
            if meta.get("next_try", 0) > now:
                continue
            dest = Peer(**meta["destination"])
            t0 = time.perf_counter()
            ok, msg = send_files(self.cfg, dest, [item / f for f in meta["files"]])
            base = {k: meta.get(k) for k in ("study", "series", "calling_ae", "host")}
            if ok:
                self.spool.mark_sent(item, {**meta, "sent": time.time(), "result": msg})
                self.audit({"event": "results_sent", **base, "destination": meta["destination"],
                            "files": meta["files"], "tries": meta["tries"] + 1,
                            "seconds": round(time.perf_counter() - t0, 3)})
                logger.info("results of %s sent: %s", meta.get("series"), msg)
                sent += 1
            else:
                meta["tries"] += 1
                meta["last_error"] = msg
                meta["next_try"] = time.time() + backoff(meta["tries"], self.cfg.retry_initial_seconds,
                                                         self.cfg.retry_max_seconds)
                write_json_atomic(meta_file, meta)
                self.audit({"event": "send_failed", **base, "destination": meta["destination"], "reason": msg,
                            "tries": meta["tries"], "next_try_in_s": round(meta["next_try"] - time.time(), 1)})
                logger.warning("results of %s not sent (try %d): %s", meta.get("series"), meta["tries"], msg)
        return sent

    def _send_loop(self) -> None:
        while not self.stop_event.wait(0.5):
            try:
                self.send_once()
            except Exception:  # noqa: BLE001 -- the sender must survive a bad item
                logger.exception("sender")


def status(cfg: NodeConfig) -> dict[str, Any]:
    """Counts per state, the outbox items (tries, next try, last error) and quarantined series with reasons."""
    spool = Spool(cfg.spool)
    out: dict[str, Any] = {"spool": str(cfg.spool), "counts": spool.counts(), "outbox": [], "quarantine": []}
    now = time.time()
    for item in spool.outbox():
        try:
            meta = read_json(item / "send.json")
        except (OSError, ValueError):
            continue
        out["outbox"].append({"answer": item.name, "tries": meta.get("tries", 0),
                              "next_try_in_s": max(0.0, round(meta.get("next_try", 0) - now, 1)),
                              "last_error": meta.get("last_error", "")})
    for q in sorted(p for p in spool.dir("quarantine").iterdir() if p.is_dir()):
        reason = (q / "reason.txt").read_text().splitlines()[0] if (q / "reason.txt").exists() else ""
        out["quarantine"].append({"job": q.name, "reason": reason})
    return out


def _print_status(s: Mapping[str, Any]) -> None:
    c = s["counts"]
    print(f"spool {s['spool']}")
    print("  " + "  ".join(f"{k}: {c[k]}" for k in ("incoming", "queue", "work", "outbox", "answered", "quarantine")))
    for o in s["outbox"]:
        print(f"  outbox {o['answer']}: {o['tries']} tries, next in {o['next_try_in_s']} s"
              + (f", last error: {o['last_error']}" if o["last_error"] else ""))
    for q in s["quarantine"]:
        print(f"  quarantine {q['job']}: {q['reason']}")


def main(argv: Sequence[str] | None = None, prog: str = "nndet_dicom_node") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("run", "status", "check") else "run"
    p = argparse.ArgumentParser(prog=f"{prog} {command}", description={
        "run": "Run the DICOM node: receive studies, detect, send SR + SEG back.",
        "status": "Print the node's queue, spool, outbox and quarantine counts.",
        "check": "Check node.yaml and the model, then exit."}[command])
    p.add_argument("--config", "-c", required=True, help="node.yaml (see apps/dicom_node/node.example.yaml)")
    p.add_argument("--json", action="store_true", help="status: print JSON")
    p.add_argument("-l", "--log-level", dest="log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(a.log_level)))
    try:
        cfg = load_config(a.config)
    except NodeConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if command == "status":
        s = status(cfg)
        if a.json:
            print(json.dumps(s, indent=1))
        else:
            _print_status(s)
        return 0
    node = Node(cfg)
    if command == "check":
        from apps.detect_dicom import pipeline
        from apps.detect_dicom.app import resolve_bundle

        try:
            m = pipeline.load_model(resolve_bundle(cfg.model), num_tta=cfg.num_tta, device=cfg.device,
                                    operating_point=cfg.operating_point, masks=cfg.masks)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{cfg.source}: ok; AE {cfg.ae_title} port {cfg.port}; model {m.name} {m.version}, operating point "
              f"{m.operating_point:.3f}; {len(cfg.peers)} peer(s)")
        return 0
    try:
        node.start()
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def _stop(signum, frame):  # noqa: ARG001
        logger.info("signal %d: stopping after the current series", signum)
        node.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        node.run_forever()
    finally:
        node.stop()
    return 0


def console_main() -> None:
    sys.exit(main())
