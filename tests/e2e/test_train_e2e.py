"""End to end on CPU: toy task -> nndet_prep -> run_training (a tiny schedule through the generated bundle's
configs/train.json and monai.engines), then a resumed rerun that only continues.

Floor for the patch-level validation AP@IoU0.1: the toy objects are one bright cube/sphere per 32^3 case,
the validation patches are the two validation cases' centre crops and a crop centred on each instance, and
a detector that has not learned anything scores AP near 0 here (the first epoch's value, asserted below to
be under the floor: after 15 steps its top boxes are still unrelated anchors; 0.08 measured). After ~100 SGD steps the segmentation head and the classifier have found the
bright objects on their training cases; we ask for AP@0.1 >= 0.5, i.e. at least one of the two validation
objects found among the top-ranked boxes, well below what longer runs reach and above chance.
"""

from __future__ import annotations

import json

import pytest
import torch

from planner.prep import run_prep
from planner.toy import generate_example
from tests.planner.helpers import det_env
from workflow.train import run_training

SCHEDULE = {"epochs": 6, "iterations": 15, "warmup": 10, "swa_epochs": 1}
AP10 = "AP_IoU_0.10_MaxDet_100"
AP_FLOOR = 0.5
PLAN = "D3V001CPU_3d"  # the cpu planner preset: a narrow network a 2-core CI machine trains in ~2 minutes


# Fold 0 validates on two cases whose object lies well inside the 32^3 volume. The default (nnDetection's
# KFold) fold 0 of these 8 cases validates on case_3 and case_7, whose object touches the volume's border: with
# only two validation cases and ~100 SGD steps the patch AP then measures that one hard case, not whether
# training works. The splits file is the user's documented way to choose folds; the trainer validates it.
VAL_FOLDS = [["case_3", "case_4"], ["case_0", "case_1"], ["case_2", "case_5"], ["case_6"], ["case_7"]]


def write_splits(data_root):
    (pre,) = data_root.glob("Task000*/preprocessed")
    ids = sorted(sum(VAL_FOLDS, []))
    folds = [{"train": [c for c in ids if c not in val], "val": val} for val in VAL_FOLDS]
    (pre / "splits_final.json").write_text(json.dumps(folds))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_e2e")
    mp = pytest.MonkeyPatch()
    det_env(mp, root, num_threads=1)
    generate_example(root / "data", preset="cpu", num_train=8, num_test=2, size=32)
    run_prep("000", preset="cpu")
    write_splits(root / "data")
    fold_dir = run_training("000", fold=0, overrides=SCHEDULE, plan=PLAN)
    yield fold_dir
    mp.undo()


def test_training_writes_checkpoints_logs_and_curves(trained):
    for name in ("model_last.pt", "model_best.pt", "train_log.json", "training_curves.png"):
        assert (trained / name).is_file(), name
    last = torch.load(trained / "model_last.pt", weights_only=True)
    assert last["finished"] and last["epoch"] == SCHEDULE["epochs"] + SCHEDULE["swa_epochs"]
    assert last["iteration"] == last["epoch"] * SCHEDULE["iterations"]
    assert {"network", "optimizer", "lr_scheduler", "scaler", "swa_model"} <= set(last)
    best = torch.load(trained / "model_best.pt", weights_only=True)
    assert best["key_metric"] == "mAP_IoU_0.10_0.50_0.05_MaxDet_100" and 1 <= best["epoch"] <= last["epoch"]
    splits_file = trained.parents[2].parent / "data" / trained.parents[1].name / "preprocessed" / "splits_final.json"
    splits = json.loads(splits_file.read_text())
    assert len(splits) == 5 and sorted(sum((f["val"] for f in splits), [])) == sorted(splits[0]["train"] + splits[0]["val"])


def test_loss_falls_and_patch_ap_rises(trained):
    log = json.loads((trained / "train_log.json").read_text())
    assert [e["epoch"] for e in log] == list(range(1, SCHEDULE["epochs"] + SCHEDULE["swa_epochs"] + 1))
    first, last = log[0], log[-1]
    assert last["train_loss"] < 0.8 * first["train_loss"], [e["train_loss"] for e in log]
    assert last["val_loss"] < first["val_loss"], [e["val_loss"] for e in log]
    assert first.get(AP10, 0.0) < AP_FLOOR
    best_ap = max(e.get(AP10, 0.0) for e in log)
    assert best_ap >= AP_FLOOR, [e.get(AP10) for e in log]
    assert all(0.0 <= e["seg_dice"] <= 1.0 for e in log)


def test_rerun_of_a_finished_fold_does_not_train_again(trained):
    before = (trained / "model_last.pt").stat().st_mtime_ns
    again = run_training("000", fold=0, overrides=SCHEDULE, plan=PLAN)
    assert again == trained
    assert (trained / "model_last.pt").stat().st_mtime_ns == before


def test_cli_train_rejects_unknown_overrides_and_plans(trained, capsys):
    from workflow import cli

    with pytest.raises(SystemExit) as exc:
        cli.train_main(["000", "--plan", PLAN, "-o", "learning_rate=3"])
    assert exc.value.code == 2 and "learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.train_main(["000", "--plan", "D3V999_3d"])
    assert "D3V001CPU_3d" in capsys.readouterr().err  # lists the plans that exist


def test_cli_train_of_a_finished_fold_prints_its_outputs(trained, capsys):
    from workflow import cli

    cli.main(["train", "000", "--plan", PLAN, "-o", "exp.fold=0"])
    out = capsys.readouterr().out
    assert str(trained) in out and "model_best.pt" in out and "training_curves.png" in out


def test_sweep_eval_predict_and_test_eval_through_the_cli(trained, capsys):
    """The chain after training: nndet_sweep -> nndet_eval -> nndet_predict -> nndet_eval --test."""
    import numpy as np

    from workflow import cli

    cli.main(["sweep", "000", "0", "--plan", PLAN, "--num_tta", "4"])
    params = json.loads((trained / "sweep" / "params.json").read_text())
    assert set(params["params"]) == {"model_iou", "model_nms", "ensemble_iou", "model_score_thresh", "remove_small_boxes"}
    assert params["score"] >= params["default_score"] and (trained / "sweep" / "sweep.png").is_file()
    raws = sorted((trained / "sweep_predictions").glob("*_raw.npz"))
    assert len(raws) == 2  # the fold's validation cases

    cli.main(["eval", "000", "0", "--plan", PLAN])
    results = json.loads((trained / "val_results" / "results_boxes.json").read_text())
    for key in ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "FROC_score_IoU_0.10"):
        assert -1.0 <= results[key] <= 1.0, key
    assert (trained / "val_results" / "FROC.png").is_file() and list((trained / "val_results" / "examples").glob("*.png"))
    assert "| AP_IoU_0.10_MaxDet_100 |" in capsys.readouterr().out

    cli.main(["predict", "000", "--plan", PLAN, "--num_tta", "4"])
    preds = sorted((trained.parent / "test_predictions").glob("*_boxes.json"))
    assert [p.name for p in preds] == ["case_8_boxes.json", "case_9_boxes.json"]
    d = json.loads(preds[0].read_text())
    voxel, world = np.asarray(d["boxes"]).reshape(-1, 6), np.asarray(d["boxes_world_mm"]).reshape(-1, 6)
    assert len(voxel) == len(d["scores"]) == len(d["class_names"]) > 0
    # toy images have an identity affine: world = voxel edges (index - 0.5)
    np.testing.assert_allclose(world, voxel - 0.5, atol=1e-6)
    assert (voxel[:, :3] >= 0).all() and (voxel[:, 3:] <= 32).all()

    # any folder of raw NIfTI cases: the same preprocessing definition online gives the same boxes
    raw_dir = trained.parents[2].parent / "data" / trained.parents[1].name / "raw_splitted" / "imagesTs"
    out_dir = trained.parents[2].parent / "raw_predictions"
    cli.main(["predict", "000", "--plan", PLAN, "--num_tta", "4", "--input_dir", str(raw_dir), "--output_dir", str(out_dir)])
    online = json.loads((out_dir / "case_8_boxes.json").read_text())
    order = np.argsort(-np.asarray(d["scores"]), kind="stable")
    np.testing.assert_allclose(np.asarray(online["boxes"]).reshape(-1, 6), voxel[order], atol=1e-4)
    np.testing.assert_allclose(online["scores"], np.asarray(d["scores"])[order], atol=1e-6)

    cli.main(["eval", "000", "--plan", PLAN, "--test"])
    test_results = json.loads((trained.parent / "test_results" / "results_boxes.json").read_text())
    # two test cases: a class without objects there enters the class mean as -1 (nnDetection's convention);
    # the per-class values of the classes present are proper APs
    assert -1.0 <= test_results["AP_IoU_0.10_MaxDet_100"] <= 1.0
    per_class = [v for k, v in test_results.items() if k.endswith("_AP_IoU_0.10_MaxDet_100") and v >= 0]
    assert per_class and all(v <= 1.0 for v in per_class)
    assert 0.0 <= test_results["FROC_score_IoU_0.10"] <= 1.0


def test_bf16_autocast_gives_the_float32_outputs_within_tolerance(trained):
    """The ``amp`` switch on the CPU: bfloat16 autocast of the network pass (where the CPU has it natively)
    against float32 on the trained fold, on a 32^3 patch of two training cases.

    Tolerances: foreground probabilities of every anchor within 0.01 and box-regression deltas within 0.03
    (measured: 0.0026 and 0.007; bfloat16 keeps 8 mantissa bits), and not equal (autocast really ran); the
    channels-last layout used for bfloat16 inference on the CPU within the same bounds of the default layout. Boxes are not compared one by one:
    this briefly trained fold scores hundreds of anchors within 0.01 of each other (0.22-0.24), so such shifts
    reorder them through top-k and NMS (4-7 of its 10 best float32 boxes have a bfloat16 twin at IoU >= 0.9);
    the detection quality of both settings on a fully trained demo is in benchmarks/RESULTS.md.
    """
    import copy

    import numpy as np

    from workflow.bundle_code import bundle_module
    from workflow.sweep import load_detector

    precision = bundle_module(trained.parent, "precision")
    if precision.amp_dtype("cpu") is None:
        pytest.skip("this CPU has no native bfloat16: amp stays float32 here")
    det = load_detector(trained.parent, 0, "last", "cpu")
    images = trained.parents[2].parent / "data" / trained.parents[1].name / "preprocessed" / PLAN / "imagesTr"
    for case in sorted(p.name[:-4] for p in images.glob("*.npy") if not p.name.endswith("_seg.npy"))[:2]:
        x = torch.from_numpy(np.load(images / f"{case}.npy")[None, :, :32, :32, :32].copy())
        outs = []
        for amp in (False, True):
            with torch.no_grad(), precision.autocast("cpu", amp):
                outs.append(det.network(x))
        # channels-last (the CPU bfloat16 inference layout, precision.memory_format) against the default layout
        layout = precision.memory_format("cpu", True, 3)
        assert layout is torch.channels_last_3d
        cl_net = copy.deepcopy(det.network).to(memory_format=layout)
        with torch.no_grad(), precision.autocast("cpu", True):
            outs.append(cl_net(x.contiguous(memory_format=layout)))
        for key, tol, fn in (("cls_logits", 0.01, torch.sigmoid), ("box_regression", 0.03, lambda t: t)):
            for a, b, c in zip(outs[0][key], outs[1][key], outs[2][key], strict=True):
                err = float((fn(a.float()) - fn(b.float())).abs().max())
                assert 0 < err <= tol, (case, key, err)
                assert float((fn(b.float()) - fn(c.float())).abs().max()) <= tol, (case, key, "channels-last")
