"""`nndet_predict --gpus N` on the CPU (N CPU processes): the files 2 processes write equal those 1 process
writes, in test-set and ``--input_dir`` mode; a rerun predicts only the missing cases; a case that fails is
reported after the other shards wrote theirs.

The fold has random weights (``fake_train``): every case gets dozens of boxes to compare, none of them good.
One process at 1 torch thread is compared with 2 processes sharing ``det_torch_threads=2`` (1 thread each): the
same arithmetic, so the files must be equal to the last digit (with another thread count per process the CPU's
sums may differ in the last float digits)."""

from __future__ import annotations

import json
import shutil

import pytest

from planner.prep import run_prep
from planner.toy import generate_example
from tests.planner.helpers import det_env
from workflow import cli

PLAN = "D3V001CPU_3d"
TEST_CASES = ["case_6", "case_7", "case_8", "case_9"]  # toy ids continue after the 6 training cases
PREDICT = ["predict", "000", "--plan", PLAN, "--fold", "0", "--num_tta", "1"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from tests.workflow.test_consolidate import _drop_scripts, fake_train
    from workflow.bundle_code import load_scripts
    from workflow.models import bundle_for

    root = tmp_path_factory.mktemp("predict_shards")
    mp = pytest.MonkeyPatch()
    det_env(mp, root, num_threads=0)
    generate_example(root / "data", preset="cpu", num_train=6, num_test=4, size=32)
    run_prep("000", preset="cpu")
    b = bundle_for("000", plan=PLAN)
    load_scripts(b)  # fake_train builds the bundle's network_def
    fake_train(b, folds=[0])
    yield b
    mp.undo()
    _drop_scripts()


@pytest.fixture()
def shards_seen(monkeypatch):
    """The case ids of each shard workflow.predict started processes for (one list per run)."""
    import workflow.predict as predict

    seen, real = [], predict.run_shards

    def spy(target, shards, devices, *args, **kwargs):
        seen.append([[getattr(c, "case_id", c) for c in s] for s in shards])
        outcomes = real(target, shards, devices, *args, **kwargs)
        assert [o.error for o in outcomes] == [None] * len(shards)
        return outcomes

    monkeypatch.setattr(predict, "run_shards", spy)
    return seen


def _raw_ts(bundle):
    return bundle.parents[2] / "data" / bundle.parent.name / "raw_splitted" / "imagesTs"


def _written(folder) -> dict[str, dict]:
    return {f.name: json.loads(f.read_text()) for f in sorted(folder.glob("*_boxes.json"))}


def _predict(monkeypatch, gpus: int, *extra: str) -> None:
    monkeypatch.setenv("det_torch_threads", str(gpus))  # 1 torch thread per process either way
    cli.main([*PREDICT, "--gpus", str(gpus), *extra])


def test_two_processes_write_what_one_writes_on_the_test_set(bundle, monkeypatch, shards_seen):
    out = bundle / "test_predictions"
    shutil.rmtree(out, ignore_errors=True)
    _predict(monkeypatch, 1)
    one = _written(out)
    assert shards_seen == []  # --gpus 1: this process
    shutil.rmtree(out)
    _predict(monkeypatch, 2)
    two = _written(out)
    assert shards_seen == [[["case_6", "case_8"], ["case_7", "case_9"]]]
    assert sorted(one) == [f"{c}_boxes.json" for c in TEST_CASES]
    assert all(len(r["boxes"]) > 0 for r in one.values())
    assert two == one  # boxes, world boxes, scores, labels, params, provenance
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temporary file left


def test_a_rerun_predicts_only_the_missing_cases(bundle, monkeypatch, shards_seen):
    out = bundle / "test_predictions"
    _predict(monkeypatch, 2)  # makes them if an earlier test did not
    before = _written(out)
    shards_seen.clear()
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.glob("*_boxes.json")}
    _predict(monkeypatch, 2)  # nothing to do
    assert shards_seen == [] and {f.name: f.stat().st_mtime_ns for f in out.glob("*_boxes.json")} == mtimes

    (out / "case_7_boxes.json").unlink()  # one missing: one process (as the first run did), nothing else rewritten
    _predict(monkeypatch, 2)
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("*_boxes.json")}
    assert shards_seen == [[["case_7"]]] and sorted(after) == sorted(mtimes)
    assert [n for n in after if after[n] != mtimes[n]] == ["case_7_boxes.json"]

    for c in ("case_6", "case_9"):  # two missing: one process each
        (out / f"{c}_boxes.json").unlink()
    _predict(monkeypatch, 2)
    again = {f.name: f.stat().st_mtime_ns for f in out.glob("*_boxes.json")}
    assert shards_seen[1:] == [[["case_6"], ["case_9"]]]
    assert sorted(n for n in again if again[n] != after[n]) == ["case_6_boxes.json", "case_9_boxes.json"]
    assert _written(out) == before  # the same boxes as the run that did all four


def test_two_processes_write_what_one_writes_on_an_input_folder(bundle, monkeypatch, shards_seen, tmp_path):
    inp = _raw_ts(bundle)
    _predict(monkeypatch, 1, "--input_dir", str(inp), "--output_dir", str(tmp_path / "one"))
    _predict(monkeypatch, 2, "--input_dir", str(inp), "--output_dir", str(tmp_path / "two"))
    assert shards_seen == [[["case_6", "case_8"], ["case_7", "case_9"]]]
    one, two = _written(tmp_path / "one"), _written(tmp_path / "two")
    assert sorted(one) == [f"{c}_boxes.json" for c in TEST_CASES] and all(r["boxes"] for r in one.values())
    assert two == one


def test_a_failing_case_is_reported_after_the_other_shards_wrote_theirs(bundle, monkeypatch, tmp_path, capsys):
    inp = tmp_path / "in"
    shutil.copytree(_raw_ts(bundle), inp)
    (inp / "case_5_0000.nii.gz").write_bytes(b"not a nifti file")  # shard 0: case_5, case_7, case_9
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        _predict(monkeypatch, 2, "--input_dir", str(inp), "--output_dir", str(out))
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert "1 case(s) not predicted (4 other(s) written" in err and "case_5:" in err
    assert sorted(_written(out)) == [f"{c}_boxes.json" for c in TEST_CASES]  # its shard went on too

    (inp / "case_5_0000.nii.gz").unlink()
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.glob("*_boxes.json")}
    _predict(monkeypatch, 2, "--input_dir", str(inp), "--output_dir", str(out))  # fixed: nothing left to do
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*_boxes.json")} == mtimes


def test_more_processes_than_gpus_is_refused_before_anything_is_written(bundle, monkeypatch, capsys):
    import torch

    out = bundle / "test_predictions"
    shutil.rmtree(out, ignore_errors=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exc:
        cli.main([*PREDICT, "--gpus", "2"])
    assert exc.value.code == 2 and "2 CUDA devices, but 1 are visible" in capsys.readouterr().err
    assert not out.exists()
