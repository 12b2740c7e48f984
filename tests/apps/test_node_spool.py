"""The node's on-disk state (apps/dicom_node/spool.py) and its retry schedule, without network or model:
every move leaves each series in exactly one place, and a restart finishes or undoes half-done moves."""

from __future__ import annotations

import os

import pytest

from apps.dicom_node.node import answer_key, backoff
from apps.dicom_node.spool import Spool

PEER = {"calling_ae": "PACS", "host": "127.0.0.1"}


def _receive(spool: Spool, n: int = 3, series: str = "1.2.3.4") -> None:
    for i in range(n):
        spool.store_instance("1.2.3", series, f"{series}.{i}", b"DICM" + bytes([i]) * 100, PEER)


def test_instances_land_atomically_and_a_series_moves_to_the_queue_whole(tmp_path):
    spool = Spool(tmp_path)
    _receive(spool)
    folder = tmp_path / "incoming" / "1.2.3" / "1.2.3.4"
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".dcm") == [f"1.2.3.4.{i}.dcm" for i in range(3)]
    assert not list(tmp_path.rglob(".*.tmp*"))
    job = spool.enqueue(folder, "idle")
    assert job is not None and not folder.exists() and not (tmp_path / "incoming" / "1.2.3").exists()
    assert sorted(p.name for p in (job / "dicom").iterdir()) == [f"1.2.3.4.{i}.dcm" for i in range(3)]
    info = (job / "job.json").read_text()
    assert '"calling_ae": "PACS"' in info and '"num_instances": 3' in info
    assert spool.backlog() == 1
    taken = spool.take()
    assert taken.parent.name == "work" and spool.take() is None and spool.backlog() == 1


def test_recover_requeues_work_finishes_staged_moves_and_drops_partial_files(tmp_path):
    spool = Spool(tmp_path)
    _receive(spool, series="1.2.3.4")
    _receive(spool, series="1.2.3.5")
    spool.take() if spool.enqueue(tmp_path / "incoming" / "1.2.3" / "1.2.3.4", "idle") else None
    # a crash between the two renames of enqueue: the series sits in a staging folder
    staging = tmp_path / "queue" / ".00000000000000000001_1.2.3.5.tmp"
    staging.mkdir()
    os.replace(tmp_path / "incoming" / "1.2.3" / "1.2.3.5", staging / "dicom")
    # a crash in the middle of writing an instance
    partial = tmp_path / "incoming" / "1.2.3" / ".x.dcm.tmp-abcd1234"
    partial.write_bytes(b"half")
    done = spool.recover()
    assert done == {"requeued": 2, "partial_files": 1, "staging": 0}
    names = [p.name for p in spool.queued()]
    assert len(names) == 2 and names[0] == "00000000000000000001_1.2.3.5" and names[1].endswith("_1.2.3.4")
    assert len(list((spool.queued()[0] / "dicom").glob("*.dcm"))) == 3
    assert not any((tmp_path / "work").iterdir()) and not partial.exists()


def test_an_answer_is_recorded_from_the_outbox_on(tmp_path):
    spool = Spool(tmp_path)
    key = answer_key("1.2.3.4", "RetinaUNet D3", "0.1.0")
    assert key == "1.2.3.4__RetinaUNet_D3-0.1.0"
    assert not spool.is_answered(key)
    f = tmp_path / "sr.dcm"
    f.write_bytes(b"sr")
    item = spool.put_outbox(key, [f], {"destination": {"ae_title": "PACS", "host": "h", "port": 1}})
    assert spool.is_answered(key) and (item / "sr.dcm").read_bytes() == b"sr"
    spool.mark_sent(item, {"sent": 1})
    assert spool.is_answered(key) and not item.exists()
    assert spool.counts()["answered"] == 1 and spool.counts()["outbox"] == 0


def test_quarantine_keeps_the_instances_and_the_reason(tmp_path):
    spool = Spool(tmp_path)
    _receive(spool)
    job = spool.take() if spool.enqueue(tmp_path / "incoming" / "1.2.3" / "1.2.3.4", "idle") else None
    q = spool.quarantine(job, "rejected: missing slice between z=1 and z=3 mm")
    assert (q / "reason.txt").read_text().startswith("rejected: missing slice")
    assert len(list((q / "dicom").iterdir())) == 3


@pytest.mark.parametrize("tries, expected", [(1, 10), (2, 20), (3, 40), (10, 600)])
def test_backoff_doubles_up_to_the_cap(tries, expected):
    assert backoff(tries, 10, 600) == expected
