"""`nndet run --plans all` and `nndet_find_best` on a task where the low-resolution plan exists (objects larger
than the cpu preset's patch): both plans trained (a few steps), swept and compared with their ensemble on the
same out-of-fold cases, the choice written and consolidated; the plans' ensemble as one consolidated bundle
(each member its own preprocessing) runs like a single plan's and gives its members' boxes clustered."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.planner.helpers import cube_case, det_env, write_task
from workflow import cli

SMOKE = ["-o", "epochs=1", "-o", "iterations=2", "-o", "warmup=1", "-o", "swa_epochs=1", "-o", "num_workers=0"]


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    root = tmp_path_factory.mktemp("find_best")
    mp = pytest.MonkeyPatch()
    det_env(mp, root, num_threads=0)
    cases = [cube_case(f"case_{i}", (48, 48, 48), [(4 + i, 5, 6, 40 + i, 41, 42)], seed=i) for i in range(5)]
    cases += [cube_case(f"test_{i}", (48, 48, 48), [(6, 4 + i, 5, 42, 40 + i, 41)], seed=10 + i, split="Ts")
              for i in range(2)]
    write_task(root / "data", "Task103D3_Big", cases=cases, labels={"0": "big"})
    cli.run_main(["103", "--preset", "cpu", "--plans", "all", "--folds", "0", "--num_tta", "1", "-np", "0", *SMOKE])
    yield root
    mp.undo()


def test_every_plan_and_the_ensemble_are_scored_and_the_winner_consolidated(chosen, capsys):
    best = json.loads((chosen / "models" / "Task103D3_Big" / "best_configuration.json").read_text())
    assert best["plans"] == ["D3V001CPU_3d", "D3V001CPU_3dlr1"]
    assert set(best["candidates"]) == {"D3V001CPU_3d", "D3V001CPU_3dlr1", "ensemble"}
    assert best["cases"] == 1 and best["folds"] == [0]
    objective = {k: v["objective"] for k, v in best["candidates"].items()}
    assert objective[best["best"]] == max(objective.values())
    winner = best["consolidated_plan"]
    assert winner in best["plans"] and (best["best"] == winner or best["best"] == "ensemble")
    assert (chosen / "models" / "Task103D3_Big" / f"RetinaUNetV001_{winner}" / "consolidated" / "configs" /
            "inference.json").is_file()
    for r in best["candidates"].values():
        assert {"AP_IoU_0.10_MaxDet_100", "FROC_score_IoU_0.10", "per_class"} <= set(r)


def test_a_plans_score_in_original_voxels_equals_its_own_validation_metrics(chosen, monkeypatch):
    """IoU does not change under per-axis scaling: a plan's predictions scored in original voxels against its own
    ground truth restored there equal nndet_eval's metrics of its fold (preprocessed voxels of that plan). The
    table scores every plan against the first plan's restored ground truth (one common truth for all rows and
    the ensemble), so the first plan's row is exactly its nndet_eval metrics; another plan's row may differ
    where its resampled instance maps give slightly other ground-truth boxes (the low-resolution plan of this
    task: mAP@0.1:0.5 of its fold 0 case 0.667 against the 3D plan's boxes, 0.778 against its own)."""
    from workflow.ensemble import oof_predictions
    from workflow.evaluate import evaluate_fold
    from workflow.find_best import _score
    from workflow.models import bundle_for, bundle_plan, class_names

    det_env(monkeypatch, chosen, num_threads=0)
    best = json.loads((chosen / "models" / "Task103D3_Big" / "best_configuration.json").read_text())
    ref = best["plans"][0]
    keys = ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100")
    for pid in best["plans"]:
        m = evaluate_fold("103", 0, plan=pid, plots=False)
        bundle = bundle_for("Task103D3_Big", plan=pid)
        oof = oof_predictions(bundle, [0])
        own = _score(bundle, [oof[c][0] for c in sorted(oof)], [oof[c][1] for c in sorted(oof)],
                     class_names(bundle_plan(bundle)))
        for k in keys:
            assert own[k] == pytest.approx(m[k], abs=1e-6), (pid, k)
            if pid == ref:
                assert best["candidates"][pid][k] == pytest.approx(m[k], abs=1e-6), (pid, k)


def test_find_best_command_prints_the_table_and_needs_trained_plans(chosen, monkeypatch, capsys):
    det_env(monkeypatch, chosen, num_threads=0)
    cli.main(["find_best", "103", "--folds", "0", "--no_consolidate"])
    out = capsys.readouterr().out
    assert "| candidate | objective |" in out and "**best**" in out and "ensemble" in out
    with pytest.raises(SystemExit):
        cli.main(["find_best", "103", "--folds", "3"])


PLANS = ["D3V001CPU_3d", "D3V001CPU_3dlr1"]


@pytest.fixture(scope="module")
def ensemble(chosen):
    from workflow.ensemble import consolidate_ensemble

    mp = pytest.MonkeyPatch()
    det_env(mp, chosen, num_threads=0)
    out = consolidate_ensemble("103", PLANS, [0], overwrite=True)
    yield out
    mp.undo()


def _member_boxes(bundle, image, affine):
    """Each member bundle built on its own (its own inference.json and preprocessing), boxes in original voxels."""
    from monai.bundle import ConfigParser

    from workflow.bundle_code import load_scripts

    load_scripts(bundle)
    out = []
    for m in json.loads((bundle / "configs" / "inference.json").read_text())["members"]:
        parser = ConfigParser()
        parser.read_config(str(bundle / m / "configs" / "inference.json"))
        parser.update({"bundle_root": str(bundle / m), "num_tta": 1, "device": "$torch.device('cpu')"})
        out.append(parser.get_parsed_content("predictor")(image, affine))
    return out


def test_the_ensemble_bundle_holds_both_plans_and_gives_their_boxes_clustered(chosen, ensemble, tmp_path):
    from planner.nifti import load_nifti
    from workflow.bundle_code import bundle_module

    assert ensemble == chosen / "models" / "Task103D3_Big" / "Ensemble_D3V001CPU_3d+D3V001CPU_3dlr1" / "consolidated"
    members = sorted(p.name for p in (ensemble / "members").iterdir())
    assert members == [f"RetinaUNetV001_{p}" for p in PLANS]
    pre = [json.loads((ensemble / "members" / m / "configs" / "preprocessing.json").read_text()) for m in members]
    assert pre[0] != pre[1]  # each member keeps its own preprocessing (the low-res plan resamples coarser)
    meta = json.loads((ensemble / "configs" / "metadata.json").read_text())
    assert meta["nndet"]["ensemble"]["members"] == members and meta["nndet"]["folds"] == [0]
    best = json.loads((chosen / "models" / "Task103D3_Big" / "best_configuration.json").read_text())
    assert meta["eval_metrics"]["AP_IoU_0.10_MaxDet_100"] == pytest.approx(
        best["candidates"]["ensemble"]["AP_IoU_0.10_MaxDet_100"])  # the numbers find_best scored it by

    images = chosen / "data" / "Task103D3_Big" / "raw_splitted" / "imagesTs"
    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--meta_file",
           "configs/metadata.json", "--bundle_root", ".", "--input_dir", str(images), "--output_dir", str(out),
           "--num_tta", "1", "--device", "$torch.device('cpu')"]
    r = subprocess.run(cmd, cwd=ensemble, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    inference = bundle_module(ensemble, "inference")
    for case in ("test_0", "test_1"):
        got = json.loads((out / f"{case}_boxes.json").read_text())
        assert set(got["params"]["members"]) == set(members) and len(got["boxes"]) > 0
        image, affine = load_nifti(images / f"{case}_0000.nii.gz", 3)
        recs = _member_boxes(ensemble, np.asarray(image, np.float32)[None], affine)
        want = inference.ensemble_members([inference.Detections(r["boxes"], r["scores"], r["labels"]) for r in recs],
                                          ensemble_iou=0.5)
        order = np.argsort(-want.scores, kind="stable")
        np.testing.assert_allclose(np.asarray(got["boxes"]).reshape(-1, 6), want.boxes[order], atol=1e-4)
        np.testing.assert_allclose(got["scores"], want.scores[order], atol=1e-6)
        assert len(got["boxes_world_mm"]) == len(got["boxes"])


def test_the_dicom_app_loads_the_ensemble_and_gives_masks(ensemble):
    from apps.detect_dicom.pipeline import load_model

    model = load_model(ensemble, num_tta=1, device="cpu", masks=True)
    assert model.name.startswith("Ensemble_") and model.folds == [0]
    assert model.operating_point_source.startswith("bundle metadata") or "default" in model.operating_point_source
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 48, 48, 48)).astype(np.float32)
    image[0, 6:42, 5:41, 5:41] += 3.0
    rec = model.predictor(image, np.diag([1.0, 1.0, 1.0, 1.0]), "x")
    assert len(rec["finding_masks"]) == len(rec["boxes"]) == len(rec["mask_voxels"]) > 0


def test_consolidate_plans_refuses_without_folds_and_an_existing_bundle(chosen, ensemble, monkeypatch):
    det_env(monkeypatch, chosen, num_threads=0)
    with pytest.raises(SystemExit):
        cli.main(["consolidate", "103", "--plans", *PLANS])
    before = (ensemble / "configs" / "metadata.json").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        cli.main(["consolidate", "103", "--plans", *PLANS, "--folds", "0"])
    assert (ensemble / "configs" / "metadata.json").stat().st_mtime_ns == before


def test_run_consolidates_and_tests_the_ensemble_when_it_scores_best(chosen, ensemble, monkeypatch, capsys):
    """find_best's choice forced to the ensemble (its score raised): the run consolidates the two-plan bundle,
    predicts the test set with it and evaluates it."""
    from workflow import find_best as fb

    det_env(monkeypatch, chosen, num_threads=0)
    best_file = chosen / "models" / "Task103D3_Big" / "best_configuration.json"
    saved = best_file.read_text()
    score = fb._score
    calls = []

    def favour_ensemble(bundle, preds, gts, classes):
        r = score(bundle, preds, gts, classes)
        calls.append(r)
        return {**r, "objective": 2.0} if len(calls) == 3 else r  # plans first, the ensemble third

    monkeypatch.setattr(fb, "_score", favour_ensemble)
    try:
        cli.run_main(["103", "--preset", "cpu", "--plans", "all", "--folds", "0", "--num_tta", "1", "-np", "0",
                      *SMOKE])
        best = json.loads(best_file.read_text())
        assert best["best"] == "ensemble" and best["consolidated_ensemble"] == PLANS
        assert best["consolidated"] == str(ensemble)
        results = ensemble.parent / "test_results" / "results_boxes.json"
        assert results.is_file() and len(list((ensemble.parent / "test_predictions").glob("*_boxes.json"))) == 2
        assert "test set with the plan ensemble" in capsys.readouterr().out
    finally:
        best_file.write_text(saved)
