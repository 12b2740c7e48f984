"""What the DICOM node tests share: a toy consolidated bundle, toy CT studies, the node as a subprocess,
pynetdicom peers on loopback (a sender and a storage SCP that plays the PACS), certificates for TLS.

Everything listens on 127.0.0.1 (or on the loopback of a network namespace the Orthanc test makes) on ports
the OS hands out; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError naming ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_port(port: int, timeout: float = 60.0, host: str = "127.0.0.1") -> None:
    def up() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(up, timeout, f"port {port}")


def build_bundle(root: Path) -> Path:
    """A consolidated bundle of the toy task (cpu preset, one fold with random weights, no validation
    predictions), made under ``root`` with ``det_data``/``det_models`` pointed there for the duration."""
    from planner.prep import run_prep
    from planner.toy import generate_example
    from tests.workflow.test_consolidate import fake_train
    from workflow.bundle_code import load_scripts
    from workflow.consolidate import consolidate
    from workflow.models import bundle_for

    old = {k: os.environ.get(k) for k in ("det_data", "det_models")}
    os.environ["det_data"], os.environ["det_models"] = str(root / "data"), str(root / "models")
    (root / "data").mkdir(parents=True, exist_ok=True)
    try:
        generate_example(root / "data", preset="cpu", num_train=6, num_test=1, size=32)
        run_prep("000", preset="cpu")
        bundle = bundle_for("000")
        load_scripts(bundle)
        fake_train(bundle, folds=(0,))
        cons = consolidate("000", folds=[0])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]
    return cons


def write_toy_study(folder: Path, seed: int = 0, slices: int = 12, defect: str | None = None,
                    with_text_sr: bool = False, study_uid: str | None = None) -> dict[str, Any]:
    """A toy CT study (one 24x20xN series, ascending, 1.2 mm slices) as files; returns its UIDs and files."""
    from tests.apps import dicom_factory as factory

    rng = np.random.default_rng(seed)
    vol = np.round(rng.normal(0, 200, (24, 20, slices))).astype(np.float32)
    study_uid = study_uid or factory.uid("study", seed)
    series_uid = factory.uid("series", seed, defect or "")
    files = factory.write_series(folder / "ct", vol, factory.make_affine((0.9, 0.9, 1.2)), modality="CT",
                                 description=f"Toy CT {seed}", study_uid=study_uid, series_uid=series_uid,
                                 signed=True, seed=seed, defect=defect)
    if with_text_sr:
        files.append(factory.write_text_sr(folder / "sr", study_uid=study_uid, seed=seed))
    return {"study": study_uid, "series": series_uid, "files": [Path(f) for f in files]}


def node_config(path: Path, *, port: int, model: Path, spool: Path, peers: Sequence[dict], **extra: Any) -> Path:
    cfg = {"ae_title": "NNDET", "host": "127.0.0.1", "port": port, "model": str(model), "spool": str(spool),
           "peers": list(peers), "device": "cpu", "num_tta": 1, "operating_point": 0.0,
           "series": {"idle_seconds": 1.0}, "send": {"retry_initial_seconds": 0.5, "retry_max_seconds": 2.0,
                                                      "network_timeout_seconds": 10}}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


class NodeProcess:
    """``python -m apps.dicom_node run --config ...`` as a subprocess (its own process group)."""

    def __init__(self, config: Path, log: Path, port: int) -> None:
        self.config, self.log, self.port = config, log, port
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> NodeProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "apps.dicom_node", "run", "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > end:
                    raise AssertionError(f"node did not listen within {timeout:.0f} s:\n{self.tail()}") from None
                time.sleep(0.2)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL, no cleanup (what a power cut or the OOM killer does)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()
        return self.proc.returncode if self.proc else None


def audit(spool: Path) -> list[dict]:
    f = spool / "audit.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def send_study(files: Sequence[Path], port: int, *, calling: str = "PACS", called: str = "NNDET",
               host: str = "127.0.0.1", tls_args=None, stop_after: int | None = None) -> dict[str, Any]:
    """C-STORE ``files`` in one association; returns {established, rejected, result (A-ASSOCIATE-RJ fields),
    statuses}. ``stop_after``: abort the association after that many instances."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid)
    assoc = ae.associate(host, port, ae_title=called, tls_args=tls_args)
    out: dict[str, Any] = {"established": assoc.is_established, "rejected": assoc.is_rejected, "statuses": []}
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        p = assoc.acceptor.primitive
        out["result"] = (p.result, p.result_source, p.diagnostic)
    if not assoc.is_established:
        return out
    for i, ds in enumerate(datasets):
        if stop_after is not None and i >= stop_after:
            assoc.abort()
            return out
        status = assoc.send_c_store(ds)
        out["statuses"].append(getattr(status, "Status", None))
    assoc.release()
    return out


class StorageSCP:
    """A pynetdicom Storage SCP on loopback that plays the PACS receiving our results: keeps every dataset."""

    def __init__(self, ae_title: str = "PACS", port: int | None = None) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.presentation import StoragePresentationContexts

        self.ae_title, self.port = ae_title, port or free_port()
        self.received: list[Any] = []
        self._lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        self.ae.supported_contexts = StoragePresentationContexts
        self._handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = None

    def _store(self, event) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return 0x0000

    def start(self) -> StorageSCP:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=self._handlers)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def of_modality(self, modality: str) -> list[Any]:
        with self._lock:
            return [d for d in self.received if d.Modality == modality]


def make_certificates(folder: Path, names: Sequence[str] = ("node", "pacs")) -> dict[str, dict[str, Path]]:
    """A throw-away CA and one certificate + key per name (CN = name, SAN = 127.0.0.1 and localhost), with the
    ``openssl`` command line; returns {name: {"crt", "key"}, "ca": {"crt", "key"}}."""
    import shutil

    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl is not on PATH")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=nndet test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    out = {"ca": {"crt": folder / "ca.crt", "key": folder / "ca.key"}}
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in names:
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt")
        out[name] = {"crt": folder / f"{name}.crt", "key": folder / f"{name}.key"}
    return out
