"""The Deploy app with ``--processes 2`` (CPU processes): the study of ``test_app`` (two good series, a refused
one, a scout that is not selected, a non-image SR) split over two processes gives the statuses, reasons and
boxes one process gives, one ``report.json``, and a rerun predicts only the series without outputs.

One process at 1 torch thread against two at 1 thread each (``det_torch_threads=2`` shared out): the same
arithmetic, so every ``findings.json`` must be equal to the last digit."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("monai.deploy")
pytest.importorskip("highdicom")

from tests.apps import test_app  # noqa: E402

OPERATING_POINT = test_app.OPERATING_POINT
study = test_app.study  # its module fixture (made once for this module)

FLAGS = ["--num_tta", "1", "--operating_point", str(OPERATING_POINT)]


@pytest.fixture()
def shards_seen(monkeypatch):
    """The Series Instance UIDs of each shard the app started processes for (one list per run)."""
    from apps.detect_dicom import batch

    seen, real = [], batch.run_shards

    def spy(target, shards, devices, *args, **kwargs):
        seen.append([[s.series_instance_uid for s in shard] for shard in shards])
        outcomes = real(target, shards, devices, *args, **kwargs)
        assert [o.error for o in outcomes] == [None] * len(shards)
        return outcomes

    monkeypatch.setattr(batch, "run_shards", spy)
    return seen


def _run(study, out, monkeypatch, processes: int, *extra: str) -> tuple[int, dict]:
    from apps.detect_dicom.app import main

    monkeypatch.setenv("det_torch_threads", str(processes))  # 1 torch thread per process either way
    rc = main(["-i", str(study["study"]), "-o", str(out), "-m", str(study["cons"]), "--device", "cpu", *FLAGS,
               "--processes", str(processes), *extra])
    return rc, json.loads((out / "report.json").read_text())


def _by_uid(report: dict) -> dict[str, tuple[str, str, int, int]]:
    return {s["series_instance_uid"]: (s["status"], s["reason"], s["num_boxes"], s["num_findings"])
            for s in report["series"]}


def _findings(out, uid: str) -> dict:
    return json.loads((out / uid / "findings.json").read_text())


def test_two_processes_give_what_one_gives(study, tmp_path, monkeypatch, shards_seen):
    uids = study["uids"]
    rc1, one = _run(study, tmp_path / "one", monkeypatch, 1)
    assert shards_seen == []
    rc2, two = _run(study, tmp_path / "two", monkeypatch, 2)
    (seen,) = shards_seen
    assert len(seen) == 2 and sorted(u for shard in seen for u in shard) == sorted(  # every series once
        [uids[n] for n in ("axial", "oblique", "missing", "scout")] + [u for u in _other_series(one, uids)])
    assert rc1 == rc2 == 1  # the refused series
    assert _by_uid(two) == _by_uid(one)
    assert _by_uid(one)[uids["axial"]][0] == "done" and _by_uid(one)[uids["missing"]][0] == "rejected"
    assert sorted(map(json.dumps, two["not_selected"])) == sorted(map(json.dumps, one["not_selected"]))
    assert {k: v for k, v in two.items() if k not in ("series", "not_selected")} == \
        {k: v for k, v in one.items() if k not in ("series", "not_selected")}
    for name in ("axial", "oblique"):
        assert _findings(tmp_path / "two", uids[name]) == _findings(tmp_path / "one", uids[name])
        assert _findings(tmp_path / "one", uids[name])["findings"]
        assert sorted(p.name for p in (tmp_path / "two" / uids[name]).iterdir()) == \
            sorted(p.name for p in (tmp_path / "one" / uids[name]).iterdir())
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]  # no temporary folder left


def _other_series(report: dict, uids: dict) -> list[str]:
    """Series of the study that are not among the named ones (the non-image SR object's series)."""
    listed = {s["series_instance_uid"] for s in report["series"]} | {s["series_instance_uid"]
                                                                     for s in report["not_selected"]}
    return sorted(listed - set(uids.values()))


def test_a_rerun_predicts_only_the_series_without_outputs(study, tmp_path, monkeypatch, shards_seen):
    uids = study["uids"]
    out = tmp_path / "out"
    _run(study, out, monkeypatch, 2)
    before = {n: _findings(out, uids[n]) for n in ("axial", "oblique")}
    kept = (out / uids["oblique"] / "findings.json").stat().st_mtime_ns
    shutil.rmtree(out / uids["axial"])
    shards_seen.clear()
    rc, report = _run(study, out, monkeypatch, 2)
    todo = sorted(u for shard in shards_seen[0] for u in shard)
    assert uids["axial"] in todo and uids["oblique"] not in todo  # never predicted again
    status = _by_uid(report)
    assert status[uids["axial"]][0] == "done" and status[uids["oblique"]][0] == "exists"
    assert (out / uids["oblique"] / "findings.json").stat().st_mtime_ns == kept
    assert {n: _findings(out, uids[n]) for n in ("axial", "oblique")} == before
    assert rc == 1  # still the refused series


def test_more_processes_than_gpus_is_a_usage_error(study, tmp_path, monkeypatch, capsys):
    import torch

    from apps.detect_dicom.app import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "out"
    assert main(["-i", str(study["study"]), "-o", str(out), "-m", str(study["cons"]), "--gpus", "2"]) == 2
    assert "2 CUDA devices, but 1 are visible" in capsys.readouterr().err
    assert not out.exists()
