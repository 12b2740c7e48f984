"""Commands over trained folds: ``nndet_train``, ``nndet_sweep``, ``nndet_eval``, ``nndet_predict``,
``nndet_consolidate``, ``nndet_boxes2nii`` (argparse, nnDetection's positional ``TASK [MODEL] [FOLD]``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from planner import paths
from workflow.cli.common import parse_overrides, print_metrics, print_sweep, run_api, setup_logging


# --------------------------------------------------------------------------------------- train
def train(task: str, overrides: dict[str, str] | None = None, fold: int | None = None, model: str | None = None,
          plan: str | None = None, resume: bool = True, tracking: str | None = None, **ddp) -> Path:
    """Train one fold of a task's generated bundle (``python -m monai.bundle run training`` underneath; with
    ``gpus``/``nnodes`` in ``ddp``, torchrun over configs/multi_gpu_train.json)."""
    from workflow.train import run_training

    fold_dir = run_api(run_training, task, fold=0 if fold is None else fold, overrides=overrides, model=model,
                    plan=plan, resume=resume, tracking=tracking, **ddp)
    print(f"fold trained: {fold_dir}")
    for name in ("model_last.pt", "model_best.pt", "train_log.json", "training_curves.png"):
        if (fold_dir / name).is_file():
            print(f"  {name:<20} {fold_dir / name}")
    return fold_dir


def train_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="nndet_train",
        description="Train one fold of a planned task with its generated MONAI bundle (configs/train.json). "
                    "A rerun resumes from fold<X>/model_last.pt.",
        epilog="examples:\n  nndet_train 000 -o exp.fold=0\n  nndet_train 000 --plan D3V001CPU_3d -o epochs=10 "
               "-o iterations=50 -o warmup=50 -o swa_epochs=2\n  nndet_train 101 -o exp.fold=3 -o lr=0.005 "
               "--tracking mlflow\n  nndet_train 000 --fold 0 --gpus 4            # DDP on 4 GPUs (torchrun)\n"
               "  nndet_train 000 --folds 0 1 2 3 4          # one fold per free GPU (one after another on a CPU)\n"
               "  nndet_train 000 --fold 0 --gpus 8 --nnodes 2 --node_rank 0 --rdzv_endpoint node0:29500\n"
               "multi-node and SLURM: docs/distributed.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="task id or name: 000, Task000 or Task000D3_Example")
    p.add_argument("-o", "--overrides", action="append",
                   help="key=value of configs/train.json ids, nnDetection's exp.fold=X included "
                        "(epochs, iterations, warmup, swa_epochs, lr, batch_size, num_workers, amp, seed, ...)")
    p.add_argument("--fold", type=int, default=None, help="fold index (same as -o exp.fold=X)")
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="several folds, each its own process: one per free GPU (or group of --gpus GPUs), one after "
                        "another without CUDA; a summary table at the end, a failed fold does not stop the others")
    p.add_argument("--gpus", type=int, default=1, help="DDP processes per node (torchrun; one per GPU, CPU "
                   "processes with gloo on a machine without CUDA); the plan's batch is the global batch")
    p.add_argument("--nnodes", type=int, default=1, help="machines of a multi-node DDP run (docs/distributed.md)")
    p.add_argument("--node_rank", type=int, default=0, help="this machine's rank, 0..nnodes-1")
    p.add_argument("--rdzv_endpoint", default=None, help="HOST:PORT of node 0 for a multi-node run")
    p.add_argument("--plan", default=None, help="plan id, e.g. D3V001_3d, D3V001_3dlr1, D3V001CPU_3d (default: main plan)")
    p.add_argument("--model", default=None, help="model folder under $det_models/<task> (instead of --plan)")
    p.add_argument("--no_resume", action="store_true", help="start over even if fold<X>/model_last.pt exists")
    p.add_argument("--tracking", default=None, help="experiment tracking through monai.bundle, e.g. mlflow "
                   "(pip install 'nndet-monai[tracking]')")
    p.add_argument("--sweep", action="store_true", help="after training: predict the fold's validation cases, "
                   "sweep the postprocessing parameters and evaluate (nndet_sweep + nndet_eval)")
    a = p.parse_args(argv)
    setup_logging()
    overrides = parse_overrides(a.overrides)
    if a.folds is not None and len(set(a.folds)) > 1:
        from workflow.models import bundle_for
        from workflow.train import train_folds

        if a.fold is not None or a.nnodes > 1 or a.tracking:
            p.error("--folds runs each fold as its own job: drop --fold, --nnodes and --tracking")
        run_api(train_folds, a.task, a.folds, overrides=overrides, model=a.model, plan=a.plan,
                resume=not a.no_resume, gpus=a.gpus)
        fold_dirs = [run_api(bundle_for, a.task, a.model, a.plan) / f"fold{f}" for f in a.folds]
    else:
        fold = a.folds[0] if a.folds else a.fold
        fold_dirs = [train(a.task, overrides=overrides, fold=fold, model=a.model, plan=a.plan,
                           resume=not a.no_resume, tracking=a.tracking, gpus=a.gpus, nnodes=a.nnodes,
                           node_rank=a.node_rank, rdzv_endpoint=a.rdzv_endpoint)]
    if a.sweep and a.node_rank == 0:
        from workflow.evaluate import evaluate_fold
        from workflow.sweep import sweep_fold

        for fold_dir in fold_dirs:
            fold = int(fold_dir.name[4:])
            res = run_api(sweep_fold, a.task, fold, model=fold_dir.parent.name)
            print_sweep(res, fold)
            print_metrics(run_api(evaluate_fold, a.task, fold, model=fold_dir.parent.name), fold_dir / "val_results")


# ------------------------------------------------------------------------- sweep, eval, predict
def _model_and_fold(model: str | None, fold: str | None) -> tuple[str | None, int]:
    """nnDetection's ``TASK MODEL FOLD`` with MODEL optional: ``nndet_sweep 000 0`` means fold 0."""
    if model is not None and fold is None and model.lstrip("-").isdigit():
        return None, int(model)
    return model, int(fold) if fold is not None else 0


def _infer_parser(prog: str, description: str, fold: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("task", help="task id or name: 000, Task000 or Task000D3_Example")
    p.add_argument("model", nargs="?", default=None, help="model folder, e.g. RetinaUNetV001_D3V001_3d (default: main plan)")
    if fold:
        p.add_argument("fold", nargs="?", default=None, help="fold (default 0)")
    p.add_argument("--plan", default=None, help="plan id instead of MODEL, e.g. D3V001CPU_3d")
    p.add_argument("--num_tta", type=int, default=None, help="mirror TTA transforms: 1 (none), 4 or 8 (3D only); default 8 in 3D, 4 in 2D")
    p.add_argument("--overwrite", action="store_true", help="recompute existing predictions")
    return p


def sweep_main(argv: list[str] | None = None) -> None:
    p = _infer_parser("nndet_sweep", "Predict a fold's validation cases (raw, once) and sweep the postprocessing "
                      "parameters (nnDetection's coordinate search) -> fold<X>/sweep/params.json + sweep.png")
    a = p.parse_intermixed_args(argv)
    setup_logging()
    from workflow.sweep import sweep_fold

    model, fold = _model_and_fold(a.model, a.fold)
    res = run_api(sweep_fold, a.task, fold, model=model, plan=a.plan, num_tta=a.num_tta, overwrite=a.overwrite)
    print_sweep(res, fold)


def eval_main(argv: list[str] | None = None) -> None:
    p = _infer_parser("nndet_eval", "Box metrics (nnDetection's results_boxes.json keys) of a fold's validation "
                      "cases, or with --test of the test predictions, plus FROC/PR/score/size plots")
    p.add_argument("--test", action="store_true", help="evaluate test_predictions against raw_splitted/labelsTs")
    p.add_argument("--boxes", action="store_true", help="evaluate box predictions (nnDetection's flag; boxes are "
                   "the only output of this detector, so this is the default)")
    p.add_argument("--analyze_boxes", action="store_true", help="also write analysis/objects.csv (what each object "
                   "got), analysis/false_positives.csv and analysis/summary.json, and print the misses")
    p.add_argument("--no_plots", action="store_true")
    p.add_argument("--box_convention", default="ours", choices=["ours", "nndetection"],
                   help="nndetection: predictions and ground truth in nnDetection's box extent (min - 1, max + 1), "
                        "the one to use when comparing with published nnDetection numbers; written to "
                        "val_results_nndetection/ (test_results_nndetection/)")
    p.add_argument("--masks", action="store_true", help="with --test: Dice of each detected object's mask "
                   "(nndet_predict --masks) with its instance in labelsTs -> test_results/mask_dice.json + .csv")
    a = p.parse_intermixed_args(argv)
    setup_logging()
    from workflow.evaluate import evaluate_fold, evaluate_test, operating_points_text
    from workflow.models import bundle_for

    model, fold = _model_and_fold(a.model, a.fold)
    if a.masks and not a.test:
        raise SystemExit("--masks scores the test predictions' masks: run nndet_predict --masks, then "
                         "nndet_eval --test --masks (validation predictions keep boxes only)")
    if a.test:
        metrics = run_api(evaluate_test, a.task, model=model, plan=a.plan, plots=not a.no_plots,
                       analyze_boxes=a.analyze_boxes, box_convention=a.box_convention)
        out = bundle_for(a.task, model, a.plan) / "test_results"
    else:
        metrics = run_api(evaluate_fold, a.task, fold, model=model, plan=a.plan, plots=not a.no_plots,
                       analyze_boxes=a.analyze_boxes, box_convention=a.box_convention)
        out = bundle_for(a.task, model, a.plan) / f"fold{fold}" / "val_results"
    if a.box_convention != "ours":
        out = out.with_name(f"{out.name}_{a.box_convention}")
    print_metrics(metrics, out)
    text = operating_points_text(bundle_for(a.task, model, a.plan), out)
    if text:
        print(f"\n{text}")
    if a.analyze_boxes:
        from planner.io import load_json
        from workflow.analysis import ANALYSIS_DIR, format_summary

        print(format_summary(load_json(out / ANALYSIS_DIR / "summary.json")))
    if a.masks:
        from workflow.mask_eval import evaluate_test_masks, mask_dice_table

        print("\n" + mask_dice_table(run_api(evaluate_test_masks, a.task, model=model, plan=a.plan)))


def predict_main(argv: list[str] | None = None) -> None:
    p = _infer_parser("nndet_predict", "Preprocess the test cases (raw_splitted/imagesTs) with the bundle's "
                      "preprocessing definition and predict them with the ensemble of trained folds -> "
                      "<bundle>/test_predictions/<case>_boxes.json (original voxels + world mm)", fold=False)
    p.add_argument("--fold", type=int, default=-1, help="-1: every trained fold (ensemble); else that fold only")
    p.add_argument("--no_preprocess", action="store_true", help="use preprocessed/<plan>/imagesTs as it is "
                   "(every test case must be there)")
    p.add_argument("--check", action="store_true", help="check the test images (names, modalities, readable, one "
                   "grid, no NaN/constant) before preprocessing")
    p.add_argument("-npp", "--num_processes_preprocessing", type=int, default=None,
                   help="workers for --check and preprocessing (default: det_num_threads)")
    p.add_argument("--force_args", action="store_true", help="predict TASK with a model trained on another task")
    p.add_argument("--input_dir", default=None, help="any folder of raw NIfTI cases (<case>_0000.nii.gz per "
                   "modality) instead of the preprocessed imagesTs")
    p.add_argument("--output_dir", default=None, help="with --input_dir: where <case>_boxes.json go")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="split the cases over N processes, one per GPU "
                   "(cuda:0..N-1), or N CPU processes (cores // N threads each) when there is no GPU; each case is "
                   "written once, a rerun does the missing ones (default 1: this process)")
    p.add_argument("--masks", action="store_true", help="also a mask per finding from the segmentation head: "
                   "<case>_masks.npz beside <case>_boxes.json (nndet_boxes2nii --masks, nndet_eval --test --masks)")
    a = p.parse_intermixed_args(argv)
    setup_logging()
    from workflow.predict import predict_dir, predict_test

    folds = None if a.fold == -1 else [a.fold]
    if a.input_dir:
        if not a.output_dir:
            raise SystemExit("--input_dir needs --output_dir")
        if a.no_preprocess:
            raise SystemExit("--no_preprocess applies to raw_splitted/imagesTs, not to --input_dir (whose cases "
                             "are always preprocessed in memory)")
        out = run_api(predict_dir, a.task, a.input_dir, a.output_dir, model=a.model, plan=a.plan, folds=folds,
                   num_tta=a.num_tta, overwrite=a.overwrite, check=a.check,
                   num_processes=a.num_processes_preprocessing, gpus=a.gpus, masks=a.masks)
    else:
        out = run_api(predict_test, a.task, model=a.model, plan=a.plan, folds=folds, num_tta=a.num_tta,
                   overwrite=a.overwrite, preprocess=not a.no_preprocess, check=a.check,
                   num_processes_preprocessing=a.num_processes_preprocessing, force_args=a.force_args, gpus=a.gpus,
                   masks=a.masks)
    print(f"predictions: {out}")


# ---------------------------------------------------------------------------------- consolidate
def consolidate_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="nndet_consolidate",
        description="Consolidate the trained folds of a task into one self-contained inference bundle "
                    "<bundle>/consolidated/ (configs/inference.json, metadata.json, models/model_fold<X>.pt, docs/)",
        epilog="examples:\n  nndet_consolidate 000 --num_folds 5\n  nndet_consolidate 101 --plans D3V001_3d D3V001_3dlr1 "
               "--folds 0 1 2 3 4   # the plans' ensemble as one bundle\n  nndet_consolidate 000 --fppi 0.5 --overwrite   "
               "# operating point: lowest threshold with <= 0.5 false positives per case\n"
               "  nndet_consolidate 000 --min_sensitivity 0.9 --overwrite\n  cd $det_models/Task000D3_Example/"
               "RetinaUNetV001_D3V001_3d/consolidated && python -m monai.bundle run --config_file "
               "configs/inference.json --meta_file configs/metadata.json --bundle_root . --input_dir IN --output_dir OUT",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="task id or name: 000, Task000 or Task000D3_Example")
    p.add_argument("model", nargs="?", default=None, help="model folder, e.g. RetinaUNetV001_D3V001_3d (default: main plan)")
    p.add_argument("--plan", default=None, help="plan id instead of MODEL, e.g. D3V001CPU_3d")
    p.add_argument("--plans", nargs="+", default=None, metavar="PLAN",
                   help="two or more plan ids: one bundle holding every plan's folds, each with its own "
                   "preprocessing, their boxes merged by weighted box clustering "
                   "($det_models/<task>/Ensemble_<plans>/consolidated; needs --folds, each trained and swept)")
    p.add_argument("--folds", type=int, nargs="+", default=None, help="exactly these folds (all must be trained)")
    p.add_argument("--num_folds", type=int, default=None, help="consolidate folds 0..N-1 (all must be trained); "
                   "default: every trained fold")
    p.add_argument("--no_sweep_boxes", action="store_true", help="nnDetection's default postprocessing parameters "
                   "instead of the folds' sweep")
    p.add_argument("--no_model", action="store_true", help="configs, scripts and docs only (no weights in models/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing consolidated/ folder")
    rule = p.add_argument_group("operating point (metadata.json nndet.operating_point, chosen on the folds' "
                                "validation predictions; default: the lowest threshold with FPPI <= 1)")
    rule = rule.add_mutually_exclusive_group()
    rule.add_argument("--fppi", type=float, default=None, metavar="X",
                      help="the lowest score threshold with at most X false positives per case")
    rule.add_argument("--min_sensitivity", type=float, default=None, metavar="S",
                      help="the highest score threshold with sensitivity >= S (0..1)")
    rule.add_argument("--threshold", type=float, default=None, metavar="T", help="this score threshold")
    a = p.parse_args(argv)
    setup_logging()
    from planner.io import load_json
    from workflow.consolidate import consolidate
    from workflow.ensemble import consolidate_ensemble

    if a.plans:
        if a.model or a.plan or a.num_folds is not None or a.no_model or a.no_sweep_boxes:
            raise SystemExit("--plans takes --folds, --overwrite and an operating-point rule only")
        if a.folds is None:
            raise SystemExit("--plans needs --folds (the folds every plan has trained and swept), e.g. --folds 0 1 2 3 4")
        out = run_api(consolidate_ensemble, a.task, a.plans, a.folds, overwrite=a.overwrite, fppi=a.fppi,
                      min_sensitivity=a.min_sensitivity, threshold=a.threshold)
    else:
        out = run_api(consolidate, a.task, model=a.model, plan=a.plan, num_folds=a.num_folds, folds=a.folds,
                      sweep_boxes=not a.no_sweep_boxes, no_model=a.no_model, overwrite=a.overwrite, fppi=a.fppi,
                      min_sensitivity=a.min_sensitivity, threshold=a.threshold)
    print(f"consolidated bundle: {out}\nrun it:  cd {out} && python -m monai.bundle run --config_file "
          "configs/inference.json --meta_file configs/metadata.json --bundle_root . --input_dir IN --output_dir OUT")
    op = load_json(out / "configs" / "metadata.json").get("nndet", {}).get("operating_point")
    if op:
        print(f"operating point ({op['rule']}, {op['num_cases']} validation case(s)): score >= {op['threshold']:.4f}"
              f"  sensitivity {op['sensitivity']:.3f}  FPPI {op['fppi']:.3f}  precision {op['precision']:.3f}")
        for name, r in op.get("per_class", {}).items():
            print(f"  class {name}: sensitivity {r['sensitivity']:.3f}  FPPI {r['fppi']:.3f}  "
                  f"precision {r['precision']:.3f}")
    else:
        print("operating point: none recorded (no validation predictions; run nndet_sweep per fold)")


# ------------------------------------------------------------------------------------ boxes2nii
def boxes2nii_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nndet_boxes2nii", description="Write test predictions as instance NIfTI files "
                                "(original image geometry, one id per box, 1 = highest score) + JSON for viewers")
    p.add_argument("task", help="task id or name: 000, Task000 or Task000D3_Example")
    p.add_argument("model", nargs="?", default=None, help="model folder (default: main plan)")
    p.add_argument("--plan", default=None, help="plan id instead of MODEL, e.g. D3V001CPU_3d")
    p.add_argument("--threshold", type=float, default=0.5, help="keep boxes with score >= threshold (default 0.5)")
    p.add_argument("--pred_dir", default=None, help="folder of *_boxes.json (default <bundle>/test_predictions)")
    p.add_argument("--images_dir", default=None, help="reference images (default raw_splitted/imagesTs)")
    p.add_argument("--out_dir", default=None, help="default <bundle>/test_predictions_nii")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--masks", action="store_true", help="fill each finding's mask (nndet_predict --masks) instead of "
                   "its box")
    a = p.parse_args(argv)
    setup_logging()
    from workflow.boxes2nii import convert_folder
    from workflow.bundle_code import bundle_module
    from workflow.models import bundle_for

    bundle = run_api(bundle_for, a.task, a.model, a.plan)
    task_root = paths.det_data() / paths.resolve_task(a.task)
    written = run_api(convert_folder, a.pred_dir or bundle / "test_predictions",
                   a.images_dir or task_root / "raw_splitted" / "imagesTs", a.out_dir or bundle / "test_predictions_nii",
                   a.threshold, a.overwrite, masks_module=bundle_module(bundle, "masks") if a.masks else None)
    print(f"{len(written)} instance NIfTI file(s) in {written[0].parent if written else a.out_dir}")
