"""nndet_consolidate and the consolidated bundle's folder inference (configs/inference.json), on CPU.

A toy task is planned with the cpu preset and two folds are "trained" by writing randomly initialised
networks of the bundle's own ``network_def`` as finished checkpoints (the inference path does not care
whether the weights are good). The swept postprocessing of the two folds is given as the cache
``workflow.sweep.ensemble_params`` reads, so consolidation and ``predict_test`` use the same parameters.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run

from bundles.retinaunet_template.scripts.inference import check_params
from planner.bundle import verify_metadata_offline
from planner.io import save_json
from planner.prep import run_prep
from planner.toy import generate_example
from tests.planner.helpers import det_env
from workflow.bundle_code import load_scripts
from workflow.consolidate import consolidate
from workflow.models import bundle_for
from workflow.predict import predict_test

FOLDS = (0, 1)
SWEPT = {"model_iou": 0.2, "ensemble_iou": 0.4, "detections_per_image": 50}  # != defaults
VAL_AP = {0: 0.5, 1: 0.7}
AP10 = "AP_IoU_0.10_MaxDet_100"
SHIFTED_CASE = "case_7"  # given another affine (same spacing) in the inference input folder
SHIFTED_AFFINE = np.array([[-1.0, 0, 0, 12.5], [0, 0, 1.0, -3.0], [0, 1.0, 0, 40.0], [0, 0, 0, 1]])


def fake_train(bundle: Path, folds=FOLDS) -> None:
    """Finished fold checkpoints with random weights of the bundle's network_def (as load_detector builds it)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    for fold in folds:
        torch.manual_seed(fold)
        net = parser.get_parsed_content("network_def", lazy=False)
        (bundle / f"fold{fold}").mkdir(exist_ok=True)
        torch.save({"network": net.state_dict(), "finished": True, "epoch": 1, "iteration": 1},
                   bundle / f"fold{fold}" / "model_last.pt")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("consolidate")
    mp = pytest.MonkeyPatch()
    det_env(mp, root, num_threads=1)
    generate_example(root / "data", preset="cpu", num_train=6, num_test=2, size=32)
    run_prep("000", preset="cpu")
    bundle = bundle_for("000")
    load_scripts(bundle)  # the bundle's scripts, as monai.bundle run imports them
    fake_train(bundle)
    save_json({"params": SWEPT, "folds": list(FOLDS)}, bundle / "consolidated_sweep" / "params.json")
    for fold, ap in VAL_AP.items():
        save_json({AP10: ap, "mAP_IoU_0.10_0.50_0.05_MaxDet_100": ap / 2, "other": 1.0},
                  bundle / f"fold{fold}" / "val_results" / "results_boxes.json")
    cons = consolidate("000")
    yield {"root": root, "bundle": bundle, "cons": cons, "task_root": root / "data" / "Task000D3_Example"}
    mp.undo()
    _drop_scripts()


def _drop_scripts() -> None:
    """Forget the imported bundle ``scripts`` package (each bundle brings its own copy)."""
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        del sys.modules[name]


def run_consolidated(cons: Path, **overrides) -> None:
    """``python -m monai.bundle run --config_file configs/inference.json ...`` in this process."""
    load_scripts(cons)
    try:
        run(config_file=str(cons / "configs" / "inference.json"), meta_file=str(cons / "configs" / "metadata.json"),
            logging_file=False, bundle_root=str(cons), **overrides)
        assert cons in Path(sys.modules["scripts"].__file__).parents  # the consolidated copy ran
    finally:
        _drop_scripts()


@pytest.fixture(scope="module")
def folder_predictions(setup):
    """Consolidated inference on a copy of raw_splitted/imagesTs (one case with another affine)."""
    inp = setup["root"] / "input"
    shutil.copytree(setup["task_root"] / "raw_splitted" / "imagesTs", inp)
    f = inp / f"{SHIFTED_CASE}_0000.nii.gz"
    img = nib.load(str(f))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), SHIFTED_AFFINE), str(f))
    out = setup["root"] / "pred"
    run_consolidated(setup["cons"], input_dir=str(inp), output_dir=str(out), num_tta=1)
    return inp, out


def test_layout_weights_and_inference_config(setup):
    cons = setup["cons"]
    for rel in ("configs/inference.json", "configs/metadata.json", "configs/train.json", "configs/preprocessing.json",
                "configs/plan.json", "configs/logging.conf", "scripts/predict.py", "scripts/inference.py",
                "docs/README.md"):
        assert (cons / rel).is_file(), rel
    assert not list(cons.rglob("__pycache__"))
    assert sorted(p.name for p in (cons / "models").iterdir()) == [f"model_fold{f}.pt" for f in FOLDS]
    for fold in FOLDS:
        state = torch.load(cons / "models" / f"model_fold{fold}.pt", weights_only=True)
        ref = torch.load(setup["bundle"] / f"fold{fold}" / "model_last.pt", weights_only=True)["network"]
        assert list(state) == list(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
    cfg = json.loads((cons / "configs" / "inference.json").read_text())
    assert cfg["folds"] == list(FOLDS) and cfg["model_files"] == [f"models/model_fold{f}.pt" for f in FOLDS]
    assert cfg["postprocessing"] == check_params(SWEPT) and "sweep" in cfg["postprocessing_source"]
    assert cfg["num_tta"] is None and cfg["num_modalities"] == 1
    assert cfg["run"]["_target_"] == "scripts.predict.predict_folder"
    # one network definition: train.json's, not a copy in inference.json
    assert "network_def" not in cfg and cfg["network_id"] == "network_def"
    assert (cons / "configs" / "preprocessing.json").read_text() == (
        setup["bundle"] / "configs" / "preprocessing.json").read_text()
    readme = (cons / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run --config_file configs/inference.json" in readme


def test_metadata_is_valid_and_describes_the_io(setup):
    meta_file = setup["cons"] / "configs" / "metadata.json"
    verify_metadata_offline(meta_file)
    meta = json.loads(meta_file.read_text())
    assert meta["nndet"]["labels"] == {"0": "Square", "1": "SquareHole"}
    assert meta["nndet"]["folds"] == list(FOLDS) and meta["nndet"]["num_tta_default"] == 8
    inputs = meta["network_data_format"]["inputs"]["image"]
    assert inputs["num_channels"] == 1 and inputs["channel_def"] == {"0": "MRI"}
    assert set(meta["network_data_format"]["outputs"]) == {"boxes", "scores", "labels"}
    assert {"boxes", "boxes_world_mm", "scores", "labels"} <= set(meta["network_data_format"]["post_processed_outputs"])
    assert meta["eval_metrics"][AP10] == pytest.approx(np.mean(list(VAL_AP.values())))
    assert "other" not in meta["eval_metrics"]
    assert meta["nndet"]["validation"]["per_fold"]["1"][AP10] == VAL_AP[1]


def test_refuses_to_overwrite(setup):
    before = (setup["cons"] / "configs" / "inference.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite"):
        consolidate("000")
    assert (setup["cons"] / "configs" / "inference.json").stat().st_mtime_ns == before
    with pytest.raises(FileNotFoundError, match=r"fold\(s\) \[2\]"):
        consolidate("000", num_folds=3, overwrite=True)
    assert not [p for p in setup["bundle"].iterdir() if p.name.startswith(".consolidated")]


def test_folder_inference_writes_boxes_in_original_and_world_space(setup, folder_predictions):
    inp, out = folder_predictions
    files = sorted(out.glob("*_boxes.json"))
    assert [f.name for f in files] == ["case_6_boxes.json", "case_7_boxes.json"]
    assert not list(out.glob(".*"))  # no temp files left
    for f in files:
        d = json.loads(f.read_text())
        img = nib.load(str(inp / f"{d['case_id']}_0000.nii.gz"))
        boxes, scores = np.asarray(d["boxes"]), np.asarray(d["scores"])
        assert len(boxes) > 0 and boxes.shape[1] == 6 and len(scores) == len(boxes) == len(d["labels"])
        assert np.all(np.diff(scores) <= 0)
        shape = np.asarray(img.shape, dtype=np.float64)
        assert np.all(boxes[:, :3] >= -1e-4) and np.all(boxes[:, 3:] <= shape + 1e-4)
        assert np.all(boxes[:, 3:] >= boxes[:, :3])
        corners = np.stack([np.where(np.asarray(c, bool), boxes[:, 3:], boxes[:, :3]) - 0.5
                            for c in np.ndindex(2, 2, 2)], axis=1)  # [N, 8, 3] voxel edges
        world = nib.affines.apply_affine(img.affine, corners)
        expected = np.concatenate([world.min(axis=1), world.max(axis=1)], axis=1)
        np.testing.assert_allclose(np.asarray(d["boxes_world_mm"]), expected, atol=1e-6)
        assert d["class_names"] == [["Square", "SquareHole"][c] for c in d["labels"]]
        assert d["folds"] == list(FOLDS) and d["params"] == check_params(SWEPT)
    assert np.allclose(nib.load(str(inp / f"{SHIFTED_CASE}_0000.nii.gz")).affine, SHIFTED_AFFINE)


def test_folder_inference_equals_predict_test(setup, folder_predictions):
    _, out = folder_predictions
    ref_dir = predict_test("000", folds=list(FOLDS), num_tta=1)
    for case in ("case_6", "case_7"):
        got = json.loads((out / f"{case}_boxes.json").read_text())
        ref = json.loads((ref_dir / f"{case}_boxes.json").read_text())
        assert set(got) == set(ref)
        assert {k: got[k] for k in ("task", "model", "folds", "box_mode", "world_frame")} == {
            k: ref[k] for k in ("task", "model", "folds", "box_mode", "world_frame")}
        order = np.argsort(-np.asarray(ref["scores"]), kind="stable")  # folder output is sorted by score
        np.testing.assert_allclose(got["boxes"], np.asarray(ref["boxes"])[order], atol=1e-4)
        np.testing.assert_allclose(got["scores"], np.asarray(ref["scores"])[order], atol=1e-6)
        assert got["labels"] == np.asarray(ref["labels"])[order].tolist()
        if case != SHIFTED_CASE:
            np.testing.assert_allclose(got["boxes_world_mm"], np.asarray(ref["boxes_world_mm"])[order], atol=1e-4)


def test_predictor_on_an_image_in_memory_equals_the_folder_path(setup, folder_predictions):
    """The consolidated config's ``predictor`` (what the Deploy app builds with ConfigParser) on an array + affine
    gives the folder prediction's boxes, world boxes, scores and labels."""
    from monai.bundle import ConfigParser

    inp, out = folder_predictions
    cons = setup["cons"]
    load_scripts(cons)
    parser = ConfigParser()
    parser.read_config(str(cons / "configs" / "inference.json"))
    parser.update({"bundle_root": str(cons), "num_tta": 1, "device": "cpu"})
    predictor = parser.get_parsed_content("predictor")
    img = nib.load(str(inp / f"{SHIFTED_CASE}_0000.nii.gz"))
    got = predictor(np.asarray(img.dataobj, np.float32)[None], img.affine, SHIFTED_CASE)
    ref = json.loads((out / f"{SHIFTED_CASE}_boxes.json").read_text())
    for key in ("boxes", "boxes_world_mm", "scores"):
        np.testing.assert_allclose(got[key], ref[key], atol=1e-5)
    assert got["labels"] == ref["labels"] and got["params"] == ref["params"]
    with pytest.raises(ValueError, match=r"expected \[channels, 3 spatial axes\]"):
        predictor(np.zeros((4, 4, 4), np.float32), img.affine)


def test_rerun_skips_predicted_cases(setup, folder_predictions):
    inp, out = folder_predictions
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("*_boxes.json")}
    run_consolidated(setup["cons"], input_dir=str(inp), output_dir=str(out), num_tta=1)
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*_boxes.json")} == before


def _cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def test_missing_modality_file_and_empty_folder_are_named(setup, tmp_path):
    src = setup["task_root"] / "raw_splitted" / "imagesTs" / "case_6_0000.nii.gz"
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(src, inp / "good_0000.nii.gz")
    shutil.copy(src, inp / "bad_0001.nii.gz")  # case "bad" lacks its _0000 file
    out = tmp_path / "out"
    with pytest.raises(Exception) as exc:
        run_consolidated(setup["cons"], input_dir=str(inp), output_dir=str(out))
    err = _cause(exc.value)
    assert isinstance(err, FileNotFoundError) and str(inp / "bad_0000.nii.gz") in str(err)
    assert "good_0000" not in str(err) and not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception) as exc:
        run_consolidated(setup["cons"], input_dir=str(empty), output_dir=str(out))
    err = _cause(exc.value)
    assert isinstance(err, FileNotFoundError) and str(empty) in str(err) and "_XXXX.nii.gz" in str(err)


def test_no_model_cli_then_overwrite(setup, tmp_path, monkeypatch, capsys):
    """On a copy of the bundle: --no_model leaves models/ empty (inference names the missing weights),
    a second run is refused, --overwrite replaces it with the weights."""
    from workflow.cli import consolidate_main

    models = tmp_path / "models"
    shutil.copytree(setup["bundle"], models / "Task000D3_Example" / setup["bundle"].name,
                    ignore=shutil.ignore_patterns(setup["cons"].name))
    monkeypatch.setenv("det_models", str(models))
    consolidate_main(["000", "--no_model", "--no_sweep_boxes"])
    cons = models / "Task000D3_Example" / setup["bundle"].name / "consolidated"
    assert str(cons) in capsys.readouterr().out
    assert (cons / "models").is_dir() and not list((cons / "models").iterdir())
    assert "--no_model" in (cons / "docs" / "README.md").read_text()
    cfg = json.loads((cons / "configs" / "inference.json").read_text())
    assert cfg["postprocessing"] == check_params(None) and "default" in cfg["postprocessing_source"]
    with pytest.raises(Exception) as exc:
        run_consolidated(cons, input_dir=str(setup["task_root"] / "raw_splitted" / "imagesTs"),
                         output_dir=str(tmp_path / "out"))
    err = _cause(exc.value)
    assert isinstance(err, FileNotFoundError) and "model_fold0.pt" in str(err) and "--no_model" in str(err)
    with pytest.raises(SystemExit):
        consolidate_main(["000"])
    assert "exists" in capsys.readouterr().err
    consolidate_main(["000", "--overwrite"])
    assert sorted(p.name for p in (cons / "models").iterdir()) == [f"model_fold{f}.pt" for f in FOLDS]
    assert not [p for p in cons.parent.iterdir() if p.name.startswith(".consolidated")]


def test_task_bundle_inference_config_runs_its_folds_with_their_sweep(setup, folder_predictions):
    """The task bundle's own configs/inference.json (before consolidation): fold<X>/model_last.pt and the
    sweep made for exactly those folds; same boxes as the consolidated bundle."""
    inp, cons_out = folder_predictions
    bundle = setup["bundle"]
    out = setup["root"] / "pred_task_bundle"
    run_consolidated(bundle, input_dir=str(inp), output_dir=str(out), num_tta=1, folds=list(FOLDS))
    for case in ("case_6", "case_7"):
        got = json.loads((out / f"{case}_boxes.json").read_text())
        ref = json.loads((cons_out / f"{case}_boxes.json").read_text())
        assert got["folds"] == ref["folds"] == list(FOLDS) and got["params"] == ref["params"]
        assert got["params"]["model_iou"] == SWEPT["model_iou"]
        np.testing.assert_allclose(got["boxes"], ref["boxes"], atol=1e-5)
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-6)
        assert got["labels"] == ref["labels"]
    # one fold without a sweep of its own: nnDetection's defaults
    out1 = setup["root"] / "pred_task_bundle_fold1"
    run_consolidated(bundle, input_dir=str(inp), output_dir=str(out1), num_tta=1, folds=[1])
    got = json.loads((out1 / "case_6_boxes.json").read_text())
    assert got["folds"] == [1] and got["params"]["model_iou"] != SWEPT["model_iou"]


def test_without_validation_predictions_no_operating_point_and_explicit_rules_refuse(setup):
    meta = json.loads((setup["cons"] / "configs" / "metadata.json").read_text())
    assert "operating_point" not in meta["nndet"]
    assert "No operating point was recorded" in (setup["cons"] / "docs" / "README.md").read_text()
    before = (setup["cons"] / "configs" / "metadata.json").read_bytes()
    with pytest.raises(FileNotFoundError, match="--fppi.*nndet_sweep"):
        consolidate("000", overwrite=True, no_model=True, fppi=1.0)
    assert (setup["cons"] / "configs" / "metadata.json").read_bytes() == before  # nothing replaced


@pytest.fixture(scope="module")
def validated(setup):
    """A copy of the task bundle whose folds have nndet_eval validation predictions: every ground-truth box
    at score 0.9, one false positive at 0.6 and one at 0.3 per case."""
    from workflow.models import bundle_plan
    from workflow.sweep import gt_preprocessed, val_cases

    copy = setup["bundle"].parent / "RetinaUNetV001_validated"
    shutil.copytree(setup["bundle"], copy, ignore=shutil.ignore_patterns("consolidated"))
    p = bundle_plan(copy)
    num_gt = num_cases = 0
    for fold in FOLDS:
        images, cases = val_cases(copy, p.task, p, fold)
        for case in cases:
            gt = gt_preprocessed(images, case, p.dim)
            far = [[0, 0, 0, 1, 1, 1]]  # one-voxel boxes in a corner: no IoU with any object of the toy cases
            boxes = [*gt["boxes"].tolist(), *far, [1, 1, 1, 2, 2, 2]]
            scores = [0.9] * len(gt["labels"]) + [0.6, 0.3]
            save_json({"boxes": boxes, "scores": scores, "labels": [*gt["labels"].tolist(), 0, 0]},
                      copy / f"fold{fold}" / "val_predictions" / f"{case}_boxes.json")
            num_gt, num_cases = num_gt + len(gt["labels"]), num_cases + 1
    return {"bundle": copy, "num_gt": num_gt, "num_cases": num_cases}


@pytest.mark.parametrize("rule, threshold, fppi", [({}, 0.6, 1.0), ({"fppi": 0.5}, 0.9, 0.0),
                                                    ({"min_sensitivity": 1.0}, 0.9, 0.0),
                                                    ({"threshold": 0.3}, 0.3, 2.0)])
def test_consolidate_records_the_operating_point_chosen_on_validation(validated, rule, threshold, fppi):
    cons = consolidate("000", model=validated["bundle"].name, overwrite=True, no_model=True, **rule)
    op = json.loads((cons / "configs" / "metadata.json").read_text())["nndet"]["operating_point"]
    assert op["threshold"] == pytest.approx(threshold)
    assert op["fppi"] == pytest.approx(fppi)
    assert op["sensitivity"] == pytest.approx(1.0)
    assert op["num_gt"] == validated["num_gt"] and op["num_cases"] == validated["num_cases"]
    assert op["folds"] == list(FOLDS) and "val_predictions" in op["predictions"]
    assert f"score >= {threshold:.4f}" in (cons / "docs" / "README.md").read_text()


def test_one_bad_case_does_not_stop_the_others_and_check_reports_the_folder(setup, tmp_path, monkeypatch):
    from planner.dataset import DatasetError
    from workflow.predict import predict_dir

    inp = tmp_path / "input"
    shutil.copytree(setup["task_root"] / "raw_splitted" / "imagesTs", inp)
    good = sorted(p.name[: -len("_0000.nii.gz")] for p in inp.glob("*_0000.nii.gz"))
    (inp / "aaa_broken_0000.nii.gz").write_bytes(b"not a nifti at all")  # sorts first: used to stop everything
    (inp / "notes.txt").write_text("stray")
    with pytest.raises(DatasetError) as e:
        predict_dir("000", inp, tmp_path / "checked", check=True, num_tta=1, num_processes=0)
    named = {Path(f).name for f, _ in e.value.problems}
    assert {"aaa_broken_0000.nii.gz", "notes.txt"} <= named
    assert not (tmp_path / "checked").exists() or not any((tmp_path / "checked").iterdir())
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="1 case\\(s\\) not predicted") as e:
        predict_dir("000", inp, out, num_tta=1)
    assert [c for c, _ in e.value.failures] == ["aaa_broken"]
    assert sorted(p.name for p in out.glob("*_boxes.json")) == [f"{c}_boxes.json" for c in good]
    _drop_scripts()
