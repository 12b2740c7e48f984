"""The DICOM node on loopback: pynetdicom peers play the modality/PACS (the Orthanc round trip is in
test_orthanc.py). The node runs as a subprocess with the toy consolidated bundle, as an administrator starts
it; faults are made for real (SIGKILL, garbage bytes, a broken series, a PACS that is down)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pydicom
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("monai.deploy")

from apps.dicom_node.config import NodeConfigError, load_config, parse_config  # noqa: E402
from tests.apps import node_tools as nt  # noqa: E402

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return nt.build_bundle(tmp_path_factory.mktemp("node_bundle"))


@pytest.fixture(scope="module")
def pacs():
    scp = nt.StorageSCP("PACS").start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory, bundle, pacs):
    root = tmp_path_factory.mktemp("node")
    port = nt.free_port()
    cfg = nt.node_config(root / "node.yaml", port=port, model=bundle, spool=root / "spool",
                         peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}])
    proc = nt.NodeProcess(cfg, root / "node.log", port).start()
    yield {"root": root, "port": port, "config": cfg, "spool": root / "spool", "proc": proc}
    proc.stop()


def _sr_for(pacs, series_uid):
    return [d for d in pacs.of_modality("SR")
            if any(str(r.SeriesInstanceUID) == series_uid for s in d.CurrentRequestedProcedureEvidenceSequence
                   for r in s.ReferencedSeriesSequence)]


def test_config_errors_name_the_file_and_the_key(tmp_path, bundle):
    good = {"ae_title": "NNDET", "port": 11112, "model": str(bundle), "spool": str(tmp_path / "spool"),
            "peers": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}]}
    assert parse_config(good).peers[0].port == 4242
    cases = [({"prot": 1}, "unknown key"), ({"port": 70000}, "port: a TCP port"),
             ({"ae_title": "A" * 17}, "ae_title"), ({"model": str(tmp_path / "none")}, "does not exist"),
             ({"peers": [{"ae_title": "PACS", "host": "127.0.0.1"}]}, "have no port"),
             ({"series": {"idle": 3}}, "series: unknown key"), ({"tls": {"enabled": True}}, "certificate and private_key"),
             ({"num_tta": 3}, "num_tta")]
    for change, words in cases:
        f = tmp_path / "node.yaml"
        import yaml

        f.write_text(yaml.safe_dump({**good, **change}))
        with pytest.raises(NodeConfigError, match=words) as e:
            load_config(f)
        assert str(f) in str(e.value)


def test_round_trip_sr_and_seg_come_back_to_the_sender(node, pacs, tmp_path):
    study = nt.write_toy_study(tmp_path / "study", seed=1)
    sent = nt.send_study(study["files"], node["port"])
    assert sent["established"] and set(sent["statuses"]) == {0}
    srs = nt.wait_for(lambda: _sr_for(pacs, study["series"]), 180, "the SR at the PACS")
    assert len(srs) == 1
    sr = srs[0]
    assert sr.SOPClassUID == SR_CLASS and sr.StudyInstanceUID == study["study"]
    nt.wait_for(lambda: [d for d in pacs.of_modality("SEG") if d.StudyInstanceUID == study["study"]], 60, "the SEG")
    # the node logs results_sent after its C-STORE returns, which can be a moment after the PACS has the SEG
    events = nt.wait_for(lambda: (ev := [a["event"] for a in nt.audit(node["spool"])
                                         if a.get("series") == study["series"]]) and "results_sent" in ev and ev,
                         30, "the node's results_sent audit entry")
    assert "series_answered" in events and "results_sent" in events


def test_unknown_peer_and_wrong_called_ae_are_refused_and_logged(node, tmp_path):
    study = nt.write_toy_study(tmp_path / "study", seed=2, slices=6)
    out = nt.send_study(study["files"], node["port"], calling="INTRUDER")
    assert out["rejected"] and out["result"] == (1, 1, 3)  # permanent, service user, calling AE not recognised
    out = nt.send_study(study["files"], node["port"], called="OTHER")
    assert out["rejected"] and out["result"][2] == 7  # called AE not recognised
    refused = [a for a in nt.audit(node["spool"]) if a["event"] == "association_refused"]
    assert {a["calling_ae"] for a in refused} >= {"INTRUDER", "PACS"}
    assert not any((node["spool"] / "incoming").iterdir()) or all(
        study["study"] not in p.name for p in (node["spool"] / "incoming").iterdir())


def test_echo_and_garbage_on_the_port_leave_the_node_serving(node):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    with socket.create_connection(("127.0.0.1", node["port"]), timeout=5) as s:
        s.sendall(b"\x07garbage, not a PDU\x00" * 50)
        time.sleep(0.5)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node["port"], ae_title="NNDET")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert node["proc"].proc.poll() is None


def test_a_broken_series_is_quarantined_with_its_reason_and_others_go_on(node, pacs, tmp_path):
    bad = nt.write_toy_study(tmp_path / "bad", seed=3, defect="missing_slice")
    good = nt.write_toy_study(tmp_path / "good", seed=4, with_text_sr=True)
    assert nt.send_study(bad["files"], node["port"])["established"]
    assert nt.send_study(good["files"], node["port"])["established"]
    nt.wait_for(lambda: _sr_for(pacs, good["series"]), 180, "the good series' SR")
    quarantine = node["spool"] / "quarantine"
    reasons = nt.wait_for(lambda: [(q / "reason.txt").read_text() for q in quarantine.iterdir()
                                   if (q / "reason.txt").exists() and bad["series"] in (q / "reason.txt").read_text()
                                   or (q / "reason.txt").exists() and "missing slice" in (q / "reason.txt").read_text()],
                          60, "the broken series in quarantine")
    assert any("missing slice" in r for r in reasons)
    assert _sr_for(pacs, bad["series"]) == []
    # the study's non-image object (a Basic Text SR) is its own series: quarantined as not selected
    texts = [(q / "reason.txt").read_text() for q in quarantine.iterdir() if (q / "reason.txt").exists()]
    assert any("not selected" in t or "no image" in t for t in texts)


def test_status_subcommand_prints_the_counts(node):
    p = subprocess.run([sys.executable, "-m", "apps.dicom_node", "status", "--config", str(node["config"]), "--json"],
                       capture_output=True, text=True, timeout=60, cwd=nt.ROOT, env={"PYTHONPATH": str(nt.ROOT),
                                                                                   "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    import json

    s = json.loads(p.stdout)
    assert s["counts"]["answered"] >= 1 and s["counts"]["quarantine"] >= 1
    assert all(q["reason"] for q in s["quarantine"])


def test_queue_full_refuses_new_associations(tmp_path, bundle):
    """The receiver alone (in this process): a full backlog is a transient A-ASSOCIATE-RJ, logged."""
    from apps.dicom_node.network import Receiver

    port = nt.free_port()
    cfg = parse_config({"ae_title": "NNDET", "host": "127.0.0.1", "port": port, "model": str(bundle),
                        "spool": str(tmp_path / "spool"), "peers": [{"ae_title": "PACS", "host": "127.0.0.1",
                                                                     "port": 1}], "queue": {"max_series": 2}})
    records, stored = [], []
    r = Receiver(cfg, lambda *a: stored.append(a), lambda *a: None, backlog=lambda: 2, audit=records.append)
    r.start()
    try:
        study = nt.write_toy_study(tmp_path / "study", seed=5, slices=6)
        out = nt.send_study(study["files"], port)
        assert out["rejected"] and out["result"] == (2, 3, 2)  # transient, presentation, local limit exceeded
        assert stored == []
        assert records and "work queue full" in records[0]["reason"]
    finally:
        r.stop()


def test_results_wait_in_the_outbox_while_the_pacs_is_down(tmp_path, bundle):
    down_port = nt.free_port()
    port = nt.free_port()
    cfg = nt.node_config(tmp_path / "node.yaml", port=port, model=bundle, spool=tmp_path / "spool",
                         peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": down_port}])
    proc = nt.NodeProcess(cfg, tmp_path / "node.log", port).start()
    try:
        study = nt.write_toy_study(tmp_path / "study", seed=6, slices=6)
        assert nt.send_study(study["files"], port)["established"]
        nt.wait_for(lambda: [a for a in nt.audit(tmp_path / "spool") if a["event"] == "send_failed"], 180,
                    "a failed send")
        assert len(list((tmp_path / "spool" / "outbox").iterdir())) == 1
        pacs = nt.StorageSCP("PACS", port=down_port).start()
        try:
            nt.wait_for(lambda: _sr_for(pacs, study["series"]), 60, "the SR once the PACS is back")
            nt.wait_for(lambda: not any((tmp_path / "spool" / "outbox").iterdir()), 30, "an empty outbox")
            assert len(list((tmp_path / "spool" / "answered").glob("*.json"))) == 1
        finally:
            pacs.stop()
    finally:
        proc.stop()
    failed = [a for a in nt.audit(tmp_path / "spool") if a["event"] == "send_failed"]
    assert all("cannot connect" in a["reason"] or "association" in a["reason"] for a in failed)


def test_sigkill_while_receiving_and_while_inferring_answers_once(tmp_path, bundle, pacs):
    port = nt.free_port()
    spool = tmp_path / "spool"
    cfg = nt.node_config(tmp_path / "node.yaml", port=port, model=bundle, spool=spool,
                         peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
                         series={"idle_seconds": 2.0})
    study = nt.write_toy_study(tmp_path / "study", seed=7, slices=16)
    proc = nt.NodeProcess(cfg, tmp_path / "node.log", port).start()
    # 1. killed in the middle of receiving: half the instances are in, the association is cut
    nt.send_study(study["files"], port, stop_after=8)
    proc.kill()
    assert 0 < len(list((spool / "incoming").rglob("*.dcm"))) <= 8
    # 2. restarted, the PACS sends the whole study again; killed while the series is being processed
    proc = nt.NodeProcess(cfg, tmp_path / "node.log", port).start()
    assert nt.send_study(study["files"], port)["established"]
    nt.wait_for(lambda: any((spool / "work").iterdir()) or _sr_for(pacs, study["series"]), 60, "the series in work/")
    proc.kill()
    # 3. restarted: the interrupted series is processed from the spool and answered exactly once
    proc = nt.NodeProcess(cfg, tmp_path / "node.log", port).start()
    try:
        nt.wait_for(lambda: _sr_for(pacs, study["series"]), 180, "the SR after the restarts")
        time.sleep(3)  # a second answer, if any, would come now
        assert len(_sr_for(pacs, study["series"])) == 1
    finally:
        proc.stop()
    # 4. the same series again, after it was answered: not answered twice
    proc = nt.NodeProcess(cfg, tmp_path / "node.log", port).start()
    try:
        assert nt.send_study(study["files"], port)["established"]
        nt.wait_for(lambda: [a for a in nt.audit(spool) if a["event"] == "series_duplicate"], 60, "the duplicate")
    finally:
        proc.stop()
    assert len(_sr_for(pacs, study["series"])) == 1
    instances = {pydicom.dcmread(f).SOPInstanceUID for f in study["files"]}
    assert len(instances) == 16


def test_nndet_umbrella_runs_the_node_command(tmp_path, capsys):
    from workflow.cli import main

    with pytest.raises(SystemExit) as e:
        main(["dicom-node", "status", "--config", str(tmp_path / "missing.yaml")])
    assert e.value.code == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err
