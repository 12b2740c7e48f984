"""The Orthanc round trip, run by ``test_orthanc.py`` inside a network namespace of its own (``unshare --net``):
Orthanc 1.10 listens on every interface and has no bind-address option, so it and the node live on that
namespace's loopback only.

    python tests/apps/orthanc_scenario.py --bundle CONSOLIDATED --work DIR [--tls]

Orthanc is started with its own config and storage folder; a toy CT study is uploaded over its REST API;
Orthanc C-STOREs it to the node (``/modalities/nndet/store``); the node's SR and SEG must arrive back in
Orthanc and be found there by C-FIND. An unknown AE is refused by the node. Prints one JSON object (the
test's assertions read it); exits non-zero only when the scenario itself could not run. Every wait is
bounded; Orthanc and the node are stopped at the end whatever happened.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.apps import node_tools as nt  # noqa: E402


def rest(port: int, path: str, data: bytes | None = None, method: str | None = None, timeout: float = 120):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None and not data.startswith(b"{"):
        req.add_header("Content-Type", "application/dicom")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else None


def orthanc_config(work: Path, http_port: int, dicom_port: int, node_port: int, certs: dict | None) -> Path:
    modality: object = ["NNDET", "127.0.0.1", node_port]
    cfg = {"Name": "nndet-test-orthanc", "StorageDirectory": str(work / "orthanc-db"),
           "IndexDirectory": str(work / "orthanc-db"), "HttpPort": http_port, "DicomPort": dicom_port,
           "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
           "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
           "DicomScuTimeout": 30, "HttpTimeout": 120}
    if certs:
        cfg.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(certs["pacs"]["crt"]),
                    "DicomTlsPrivateKey": str(certs["pacs"]["key"]),
                    "DicomTlsTrustedCertificates": str(certs["ca"]["crt"]),
                    "DicomTlsRemoteCertificateRequired": True})
        modality = {"AET": "NNDET", "Host": "127.0.0.1", "Port": node_port, "UseDicomTls": True}
    cfg["DicomModalities"] = {"nndet": modality}
    path = work / "orthanc.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def start_orthanc(work: Path, http_port: int, dicom_port: int, node_port: int, certs: dict | None):
    """Orthanc with its own config and storage under ``work``, as a process of its own session; returns
    (process, its log file) once its HTTP and DICOM ports answer."""
    log = open(work / "orthanc.log", "wb")
    proc = subprocess.Popen(["Orthanc", str(orthanc_config(work, http_port, dicom_port, node_port, certs))],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    nt.wait_port(http_port, 60)
    nt.wait_port(dicom_port, 60)
    return proc, log


def stop_orthanc(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def c_find(port: int, study_uid: str, tls_args=None) -> list[dict]:
    """Series of ``study_uid`` in Orthanc by C-FIND (Study Root, SERIES level)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE(ae_title="NNDET")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC", tls_args=tls_args)
    if not assoc.is_established:
        return [{"error": "C-FIND association not established"}]
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.Modality = ""
    q.SeriesDescription = ""
    found = []
    try:
        for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in (0xFF00, 0xFF01) and ident is not None:
                found.append({"modality": str(ident.get("Modality", "")), "series": str(ident.SeriesInstanceUID),
                              "description": str(ident.get("SeriesDescription", ""))})
    finally:
        assoc.release()
    return found


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--timeout", type=float, default=240)
    a = p.parse_args()
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    out: dict = {"tls": a.tls}
    certs = nt.make_certificates(work / "certs") if a.tls else None
    http_port, dicom_port, node_port = nt.free_port(), nt.free_port(), nt.free_port()
    orthanc, orthanc_log = start_orthanc(work, http_port, dicom_port, node_port, certs)
    node = None
    try:
        out["orthanc"] = rest(http_port, "/system").get("Version")
        tls_cfg = ({"enabled": True, "certificate": str(certs["node"]["crt"]), "private_key": str(certs["node"]["key"]),
                    "ca_certificates": str(certs["ca"]["crt"]), "require_client_certificate": True}
                   if certs else {"enabled": False})
        cfg = nt.node_config(work / "node.yaml", port=node_port, model=a.bundle, spool=work / "spool",
                             peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}], tls=tls_cfg)
        node = nt.NodeProcess(cfg, work / "node.log", node_port).start()
        study = nt.write_toy_study(work / "study", seed=11)
        t0 = time.time()
        ids = [rest(http_port, "/instances", f.read_bytes(), "POST") for f in study["files"]]
        orthanc_study = ids[0]["ParentStudy"]
        out["uploaded"] = len(ids)
        t_store = time.time()
        store = rest(http_port, "/modalities/nndet/store",
                     json.dumps({"Resources": [orthanc_study], "Synchronous": True}).encode(), "POST")
        out["store"] = {k: store.get(k) for k in ("InstancesCount", "FailedInstancesCount")} if store else None

        def results():
            series = rest(http_port, f"/studies/{orthanc_study}/series")
            mods = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
            return mods if "SR" in mods and "SEG" in mods else None

        try:
            out["orthanc_series_modalities"] = nt.wait_for(results, a.timeout, "SR and SEG in Orthanc", interval=0.5)
        except AssertionError as e:
            out["error"] = str(e)
        out["seconds_store_to_results"] = round(time.time() - t_store, 2)
        out["seconds_total"] = round(time.time() - t0, 2)
        import ssl

        tls_args = None
        if certs:
            ctx = ssl.create_default_context(cafile=str(certs["ca"]["crt"]))
            ctx.check_hostname = False
            ctx.load_cert_chain(str(certs["node"]["crt"]), str(certs["node"]["key"]))
            tls_args = (ctx, "127.0.0.1")
        out["cfind"] = c_find(dicom_port, study["study"], tls_args)
        out["study"] = study["study"]
        ctx = None
        if certs:
            ctx = ssl.create_default_context(cafile=str(certs["ca"]["crt"]))
            ctx.check_hostname = False
            ctx.load_cert_chain(str(certs["pacs"]["crt"]), str(certs["pacs"]["key"]))
        refused = nt.send_study(study["files"][:1], node_port, calling="INTRUDER",
                                tls_args=(ctx, "127.0.0.1") if ctx else None)
        out["intruder"] = {"rejected": refused["rejected"], "result": refused.get("result")}
        if certs:  # a sender without a client certificate does not get past TLS
            bare = ssl.create_default_context(cafile=str(certs["ca"]["crt"]))
            bare.check_hostname = False
            try:
                anon = nt.send_study(study["files"][:1], node_port, calling="ORTHANC", tls_args=(bare, "127.0.0.1"))
                out["no_client_cert"] = {"established": anon["established"]}
            except Exception as e:  # noqa: BLE001 -- the handshake failing is the expected outcome
                out["no_client_cert"] = {"established": False, "error": type(e).__name__}
        out["audit"] = [r["event"] for r in nt.audit(work / "spool")]
    finally:
        if node is not None:
            node.stop()
        stop_orthanc(orthanc, orthanc_log)
    out["node_log_tail"] = (work / "node.log").read_text(errors="replace")[-1500:] if (work / "node.log").exists() else ""
    out["orthanc_log_tail"] = (work / "orthanc.log").read_text(errors="replace")[-1500:]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
