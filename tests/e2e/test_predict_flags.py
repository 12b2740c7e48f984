"""`nndet_predict`'s nnDetection flags on a tiny trained toy task: preprocessing of imagesTs (default) or
``--no_preprocess``, ``--check``, ``-npp``, ``--force_args`` and stale predictions of other folds.

One fold trained for 2 x 1 steps of one patch: the tests need a trained fold, not a good one."""

from __future__ import annotations

import json
import shutil

import pytest

from planner.checks import check_test_cases
from planner.dataset import DatasetError
from planner.prep import run_prep
from planner.toy import generate_example
from tests.planner.helpers import cube_case, det_env, write_task
from workflow import cli
from workflow.predict import predict_test
from workflow.train import run_training

SMOKE = {"epochs": 1, "iterations": 1, "warmup": 1, "swa_epochs": 1, "num_workers": 0, "batch_size": 1}
PLAN = "D3V001CPU_3d"
TEST_CASES = ["case_5", "case_6"]  # toy ids continue after the 5 training cases


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_flags")
    mp = pytest.MonkeyPatch()
    det_env(mp, root, num_threads=0)
    generate_example(root / "data", preset="cpu", num_train=5, num_test=2, size=32)
    run_prep("000", preset="cpu")
    fold_dir = run_training("000", fold=0, overrides=SMOKE, plan=PLAN)
    yield fold_dir.parent
    mp.undo()


@pytest.fixture()
def bundle(trained):
    """The trained bundle with no test prediction and no fold but fold 0."""
    shutil.rmtree(trained / "test_predictions", ignore_errors=True)
    yield trained
    shutil.rmtree(trained / "fold1", ignore_errors=True)


def _task_root(bundle):
    return bundle.parents[2] / "data" / bundle.parent.name


def _pre_ts(bundle):
    return _task_root(bundle) / "preprocessed" / PLAN / "imagesTs"


def _folds_written(bundle) -> dict[str, list[int]]:
    return {f.name[: -len("_boxes.json")]: json.loads(f.read_text())["folds"]
            for f in sorted((bundle / "test_predictions").glob("*_boxes.json"))}


def test_missing_preprocessed_test_cases_are_made_before_predicting(bundle, monkeypatch):
    import planner.preprocess.run as run

    pre_ts = _pre_ts(bundle)
    shutil.rmtree(pre_ts)
    tr_json = pre_ts.parent / "imagesTr" / "case_0.json"
    tr_mtime = tr_json.stat().st_mtime_ns
    calls = []
    real = run.preprocess_task

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "preprocess_task", spy)
    monkeypatch.setenv("det_num_threads", "1")  # -npp default: det_num_threads
    out = predict_test("000", plan=PLAN, folds=[0], num_tta=1)
    assert [c["splits"] for c in calls] == [("Ts",)] and calls[0]["num_processes"] == 1
    assert sorted(f.stem for f in pre_ts.glob("*.json")) == TEST_CASES
    assert all((pre_ts / f"{c}.npy").is_file() for c in TEST_CASES)
    assert tr_json.stat().st_mtime_ns == tr_mtime  # only the test split was visited
    assert out == bundle / "test_predictions" and _folds_written(bundle) == {c: [0] for c in TEST_CASES}


def test_no_preprocess_without_preprocessed_cases_is_a_clean_error(bundle, capsys):
    pre_ts = _pre_ts(bundle)
    predict_test("000", plan=PLAN, folds=[0], num_tta=1, overwrite=True)  # makes them
    (pre_ts / "case_6.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 test case\(s\).*case_6.*without --no_preprocess"):
        predict_test("000", plan=PLAN, folds=[0], preprocess=False, overwrite=True)
    shutil.rmtree(pre_ts)
    shutil.rmtree(bundle / "test_predictions")
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "000", "--plan", PLAN, "--fold", "0", "--no_preprocess"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and str(pre_ts) in err and "nndet_prep" in err
    assert not pre_ts.exists() and not (bundle / "test_predictions").exists()


def test_check_names_a_broken_test_case_before_anything_is_written(bundle, capsys):
    pre_ts, raw_ts = _pre_ts(bundle), _task_root(bundle) / "raw_splitted" / "imagesTs"
    shutil.rmtree(pre_ts, ignore_errors=True)
    bad = raw_ts / "case_9_0000.nii.gz"
    bad.write_bytes(b"not a nifti file")
    try:
        with pytest.raises(DatasetError) as exc:
            predict_test("000", plan=PLAN, folds=[0], num_tta=1, check=True)
        assert [f for f, _ in exc.value.problems] == [str(bad)] and "cannot be read" in str(exc.value)
        with pytest.raises(SystemExit) as sys_exc:
            cli.main(["predict", "000", "--plan", PLAN, "--fold", "0", "--check", "-npp", "0"])
        assert sys_exc.value.code == 2 and str(bad) in capsys.readouterr().err
        assert not pre_ts.exists() and not (bundle / "test_predictions").exists()
    finally:
        bad.unlink()


def test_model_of_another_task_needs_force_args_and_the_same_modalities(bundle):
    other = generate_example(_task_root(bundle).parent, preset="cpu", num_train=1, num_test=1, size=32,
                             task_name="Task005D3_Other", seed_offset=7)
    copied = bundle.parents[1] / other.name / bundle.name
    shutil.copytree(bundle, copied, ignore=shutil.ignore_patterns("test_predictions"))
    with pytest.raises(ValueError, match=r"trained on task Task000D3_Example.*--force_args"):
        predict_test("005", model=bundle.name, folds=[0], num_tta=1)
    assert not (copied / "test_predictions").exists()

    out = predict_test("005", model=bundle.name, folds=[0], num_tta=1, force_args=True)
    (pred,) = [json.loads(f.read_text()) for f in out.glob("*_boxes.json")]
    assert out == copied / "test_predictions" and pred["case_id"] == "case_1" and pred["task"] == other.name
    assert (other / "preprocessed" / PLAN / "imagesTs" / "case_1.npy").is_file()

    extra = other / "raw_splitted" / "imagesTs" / "case_1_0001.nii.gz"
    shutil.copy(extra.with_name("case_1_0000.nii.gz"), extra)
    with pytest.raises(ValueError, match=r"case_1_0001\.nii\.gz: test case case_1 has 2 modality.*takes 1"):
        predict_test("005", model=bundle.name, folds=[0], num_tta=1, force_args=True, overwrite=True)


def test_predictions_of_other_folds_are_refused_until_overwrite(bundle):
    predict_test("000", plan=PLAN, folds=[0], num_tta=1)
    assert _folds_written(bundle) == {c: [0] for c in TEST_CASES}
    mtimes = [f.stat().st_mtime_ns for f in sorted((bundle / "test_predictions").glob("*.json"))]
    predict_test("000", plan=PLAN, folds=[0], num_tta=1)  # same folds: kept
    assert [f.stat().st_mtime_ns for f in sorted((bundle / "test_predictions").glob("*.json"))] == mtimes

    (bundle / "fold1").mkdir()  # a second "trained" fold: fold 0's finished weights
    shutil.copy(bundle / "fold0" / "model_last.pt", bundle / "fold1" / "model_last.pt")
    with pytest.raises(FileExistsError, match=r"2 of 2 test prediction\(s\).*\[\[0\]\].*requested \[1\].*--overwrite"):
        predict_test("000", plan=PLAN, folds=[1], num_tta=1)
    assert _folds_written(bundle) == {c: [0] for c in TEST_CASES}
    predict_test("000", plan=PLAN, folds=[1], num_tta=1, overwrite=True)
    assert _folds_written(bundle) == {c: [1] for c in TEST_CASES}


def test_cli_passes_the_predict_flags(monkeypatch):
    import workflow.predict as infer

    seen = []
    monkeypatch.setattr(infer, "predict_test", lambda *a, **k: seen.append((a, k)) or "out")
    cli.main(["predict", "000", "RetinaUNetV001_D3V001_3d", "--fold", "2", "--no_preprocess", "--check", "-npp", "3",
              "--force_args", "--num_tta", "1", "--overwrite", "--gpus", "4", "--masks"])
    cli.predict_main(["000"])
    (args, flags), (_, defaults) = seen
    assert args == ("000",)
    assert flags == {"model": "RetinaUNetV001_D3V001_3d", "plan": None, "folds": [2], "num_tta": 1, "overwrite": True,
                     "preprocess": False, "check": True, "num_processes_preprocessing": 3, "force_args": True,
                     "gpus": 4, "masks": True}
    assert defaults["folds"] is None and defaults["preprocess"] and not defaults["check"] and not defaults["masks"]
    assert defaults["num_processes_preprocessing"] is None and not defaults["force_args"] and defaults["gpus"] == 1
    monkeypatch.setattr(infer, "predict_dir", lambda *a, **k: seen.append((a, k)) or "out")
    cli.predict_main(["000", "--input_dir", "in", "--output_dir", "out", "--gpus", "2", "--masks"])
    assert seen[-1][0] == ("000", "in", "out") and seen[-1][1]["gpus"] == 2 and seen[-1][1]["masks"]
    with pytest.raises(SystemExit, match="--input_dir"):
        cli.predict_main(["000", "--input_dir", "in", "--output_dir", "out", "--no_preprocess"])


def test_check_test_cases_lists_every_problem_and_needs_no_labels(tmp_path):
    cases = [cube_case(f"case_{i}", (12, 12, 12), num_modalities=2, seed=i, split=s)
             for i, s in enumerate(["Tr", "Ts", "Ts", "Ts"])]
    for c in cases[1:]:
        c.seg = None  # no labelsTs
    task = write_task(tmp_path, "Task100D3_Test", cases=cases, modalities={"0": "T1", "1": "T2"}, test_labels=True)
    ts = task / "raw_splitted" / "imagesTs"
    check_test_cases(task)
    (ts / "case_2_0001.nii.gz").unlink()
    (ts / "case_3_0000.nii.gz").write_bytes(b"broken")
    with pytest.raises(DatasetError) as exc:
        check_test_cases(task, num_processes=2)
    assert sorted(f for f, _ in exc.value.problems) == [str(ts / "case_2_0001.nii.gz"), str(ts / "case_3_0000.nii.gz")]


def test_masks_per_finding_through_predict_boxes2nii_and_eval(bundle):
    """--masks: predictions made without masks are redone with them; each mask lies inside its box;
    nndet_boxes2nii --masks fills the masks (same ids as the boxes); nndet_eval --test --masks scores them."""
    import nibabel as nib
    import numpy as np

    from bundles.retinaunet_template.scripts.masks import load_masks

    cli.predict_main(["000", "--plan", PLAN, "--fold", "0", "--num_tta", "1", "--no_preprocess"])
    pred_dir = bundle / "test_predictions"
    assert not list(pred_dir.glob("*_masks.npz"))
    cli.predict_main(["000", "--plan", PLAN, "--fold", "0", "--num_tta", "1", "--no_preprocess", "--masks"])
    for case in TEST_CASES:
        d = json.loads((pred_dir / f"{case}_boxes.json").read_text())
        assert d["masks_file"] == f"{case}_masks.npz" and len(d["mask_voxels"]) == len(d["boxes"]) > 0
        masks, shape = load_masks(pred_dir / d["masks_file"])
        assert shape == tuple(d["original_shape"]) and len(masks) == len(d["boxes"])
        for m, box, n in zip(masks, d["boxes"], d["mask_voxels"], strict=True):
            assert m.voxels == n
            assert all(np.floor(box[a]) <= m.offset[a] and m.offset[a] + m.mask.shape[a] <= np.ceil(box[a + 3])
                       for a in range(3))
    cli.main(["boxes2nii", "000", "--plan", PLAN, "--masks", "--threshold", "0", "--overwrite"])
    d = json.loads((pred_dir / f"{TEST_CASES[0]}_boxes.json").read_text())
    masks, _ = load_masks(pred_dir / d["masks_file"])
    seg = np.asarray(nib.load(str(bundle / "test_predictions_nii" / f"{TEST_CASES[0]}_boxes.nii.gz")).dataobj)
    meta = json.loads((bundle / "test_predictions_nii" / f"{TEST_CASES[0]}_boxes.json").read_text())
    assert meta["fill"] == "masks"
    top = masks[int(np.argmax(d["scores"]))]  # instance 1 is the highest-scoring finding: all its mask voxels
    full = np.zeros(seg.shape, bool)
    full[top.region()] = top.mask
    assert (seg[full] == 1).all() and ((seg == 1) <= full).all()
    cli.eval_main(["000", "--plan", PLAN, "--test", "--masks", "--no_plots"])
    res = json.loads((bundle / "test_results" / "mask_dice.json").read_text())
    assert res["pooled"]["objects"] == len(TEST_CASES)
    assert (bundle / "test_results" / "mask_dice.csv").is_file()
    with pytest.raises(SystemExit, match="--masks scores the test predictions"):
        cli.eval_main(["000", "--plan", PLAN, "--masks"])
