"""Command line: `nndet_*` console scripts (argparse, nnDetection's flags) and the `nndet` umbrella (fire).

Each entry point only parses arguments and calls an API function that tests call directly.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path

from planner import paths

logger = logging.getLogger("planner")


def _setup_logging() -> None:
    level = logging.DEBUG if paths.verbose() else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`-o key=value` pairs (nnDetection's override habit) into a dict."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"override '{item}' must look like key=value (e.g. -o overwrite=True)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _as_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise SystemExit(f"expected a boolean, got {value!r}")


def _run(fn, *args, **kwargs):
    """Call an API function; turn expected user errors into a clean message and exit code 2."""
    from planner.dataset import DatasetError

    try:
        return fn(*args, **kwargs)
    except (DatasetError, paths.EnvironmentError_, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


# ----------------------------------------------------------------------------------------- env
def environment_report() -> str:
    """Versions, devices, paths and variables, as `nndet_env` prints them."""
    import importlib.metadata as md

    lines = [f"python               {platform.python_version()} ({sys.executable})", f"platform             {platform.platform()}"]
    for pkg in ("nndet-monai", "torch", "monai", "numpy", "scipy", "nibabel", "pydicom", "cupy-cuda13x",
                "monai-deploy-app-sdk", "highdicom", "pynetdicom", "torchvision"):
        try:
            lines.append(f"{pkg:<20} {md.version(pkg)}")
        except md.PackageNotFoundError:
            lines.append(f"{pkg:<20} not installed")
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                lines.append(f"device {i}             {p.name}, {p.total_memory / 2**30:.1f} GiB")
        else:
            lines.append("device               CPU only (no CUDA device visible)")
        lines.append(f"cpu threads          {torch.get_num_threads()} (os.cpu_count {os.cpu_count()})")
    except ImportError:
        lines.append("device               torch missing")
    for var in (*paths.REQUIRED_VARS, *paths.OPTIONAL_VARS):
        val = os.environ.get(var)
        lines.append(f"{var:<20} {val if val else '(not set)'}")
    return "\n".join(lines)


def env_main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="nndet_env", description="Print versions, devices, paths and variables.").parse_args(argv)
    print(environment_report())


# ------------------------------------------------------------------------------------- example
def example_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nndet_example", description="Write the toy task Task000D3_Example to $det_data.")
    p.add_argument("--full", action="store_true", help="1000 train + 1000 test cases (nnDetection's --full)")
    p.add_argument("--preset", default="nndet", choices=["nndet", "cpu"],
                   help="nndet: nnDetection's 256^3 cases; cpu: small cases a 2-core CPU trains on in minutes")
    p.add_argument("--size", type=int, default=None, help="volume edge in voxels (overrides the preset)")
    p.add_argument("--num_train", type=int, default=None)
    p.add_argument("--num_test", type=int, default=None)
    p.add_argument("--dim", type=int, default=3, choices=[2, 3])
    p.add_argument("--num_processes", "-np", type=int, default=0)
    p.add_argument("--spacing", type=float, nargs="+", default=None, help="voxel size per i j k axis (mm)")
    p.add_argument("--modality", default="MRI", choices=["MRI", "CT"], help="CT writes HU-like intensities")
    p.add_argument("--task_name", default=None, help="another task folder name (e.g. Task101D3_CTLike)")
    p.add_argument("--seed_offset", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing toy task folder")
    a = p.parse_args(argv)
    _setup_logging()
    from planner.toy import generate_example

    out = _run(generate_example, paths.det_data(), preset=a.preset, full=a.full, num_train=a.num_train,
               num_test=a.num_test, size=a.size, dim=a.dim, num_processes=a.num_processes, overwrite=a.overwrite,
               spacing=tuple(a.spacing) if a.spacing else None, modality=a.modality, task_name=a.task_name,
               seed_offset=a.seed_offset)
    print(f"toy task written to {out}")


# ---------------------------------------------------------------------------------------- prep
def prep(task: str, full_check: bool = False, no_check: bool = False, num_processes: int = 0,
         num_processes_preprocessing: int = 0, overwrite: bool = False, memory_budget_gb: float | None = None,
         no_preprocess: bool = False, preset: str = "default"):
    """Checks, fingerprint, plans, bundle generation and preprocessing of one task; prints the plans."""
    from planner.prep import DEFAULT_MEMORY_BUDGET_GB, run_prep

    result = _run(run_prep, task, full_check=full_check, no_check=no_check, num_processes=num_processes,
                  num_processes_preprocessing=num_processes_preprocessing, overwrite=overwrite,
                  memory_budget_gb=memory_budget_gb or DEFAULT_MEMORY_BUDGET_GB, preprocess=not no_preprocess,
                  preset=preset)
    print(f"\n== {result.task} ==")
    print(f"fingerprint   {result.fingerprint}")
    for plan, pf, b in zip(result.plans, result.plan_files, result.bundles, strict=True):
        print(plan.summary())
        print(f"  plan file        {pf}")
        print(f"  bundle           {b}")
    for png in result.plots:
        print(f"plot          {png}")
    return result


def prep_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nndet_prep", description="Check, fingerprint, plan and preprocess a task.")
    p.add_argument("task", help="task id or name: 000, Task000 or Task000D3_Example")
    p.add_argument("--full_check", action="store_true", help="load every case: geometry and instance/json checks")
    p.add_argument("--no_check", action="store_true", help="skip the dataset checks")
    p.add_argument("-np", "--num_processes", type=int, default=None, help="workers for checks/fingerprint")
    p.add_argument("-npp", "--num_processes_preprocessing", type=int, default=None, help="workers for resampling")
    p.add_argument("--overwrite", action="store_true", help="recompute stages whose outputs exist")
    p.add_argument("--memory_budget_gb", type=float, default=None, help="GPU memory budget (default 11 GB)")
    p.add_argument("--no_preprocess", action="store_true", help="stop after planning and bundle generation")
    p.add_argument("--preset", default=None, choices=["default", "cpu"],
                   help="default: nnDetection's network (plans D3V001_*); cpu: narrow network on small patches "
                        "that trains on a few CPU cores (plans D3V001CPU_*)")
    p.add_argument("-o", "--overrides", action="append", help="key=value, e.g. -o overwrite=True -o memory_budget_gb=24")
    a = p.parse_args(argv)
    _setup_logging()
    ov = _parse_overrides(a.overrides)
    unknown = set(ov) - {"overwrite", "memory_budget_gb", "full_check", "num_processes", "num_processes_preprocessing",
                         "preset"}
    if unknown:
        raise SystemExit(f"unknown override(s) {sorted(unknown)}")
    default_np = paths.num_threads()
    prep(
        a.task,
        full_check=a.full_check or _as_bool(ov.get("full_check", False)),
        no_check=a.no_check,
        num_processes=int(ov.get("num_processes", a.num_processes if a.num_processes is not None else default_np)),
        num_processes_preprocessing=int(ov.get("num_processes_preprocessing", a.num_processes_preprocessing
                                               if a.num_processes_preprocessing is not None else default_np)),
        overwrite=a.overwrite or _as_bool(ov.get("overwrite", False)),
        memory_budget_gb=float(ov["memory_budget_gb"]) if "memory_budget_gb" in ov else a.memory_budget_gb,
        no_preprocess=a.no_preprocess,
        preset=ov.get("preset", a.preset or "default"),
    )


# --------------------------------------------------------------------------------------- train
def train(task: str, overrides: dict[str, str] | None = None, fold: int | None = None, model: str | None = None,
          plan: str | None = None, resume: bool = True, tracking: str | None = None) -> Path:
    """Train one fold of a task's generated bundle (``python -m monai.bundle run training`` underneath)."""
    from planner.train import run_training

    fold_dir = _run(run_training, task, fold=0 if fold is None else fold, overrides=overrides, model=model,
                    plan=plan, resume=resume, tracking=tracking)
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
               "--tracking mlflow",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="task id or name: 000, Task000 or Task000D3_Example")
    p.add_argument("-o", "--overrides", action="append",
                   help="key=value of configs/train.json ids, nnDetection's exp.fold=X included "
                        "(epochs, iterations, warmup, swa_epochs, lr, batch_size, num_workers, amp, seed, ...)")
    p.add_argument("--fold", type=int, default=None, help="fold index (same as -o exp.fold=X)")
    p.add_argument("--plan", default=None, help="plan id, e.g. D3V001_3d, D3V001_3dlr1, D3V001CPU_3d (default: main plan)")
    p.add_argument("--model", default=None, help="model folder under $det_models/<task> (instead of --plan)")
    p.add_argument("--no_resume", action="store_true", help="start over even if fold<X>/model_last.pt exists")
    p.add_argument("--tracking", default=None, help="experiment tracking through monai.bundle, e.g. mlflow "
                   "(pip install 'nndet-monai[tracking]')")
    p.add_argument("--sweep", action="store_true", help="after training: predict the fold's validation cases, "
                   "sweep the postprocessing parameters and evaluate (nndet_sweep + nndet_eval)")
    a = p.parse_args(argv)
    _setup_logging()
    fold_dir = train(a.task, overrides=_parse_overrides(a.overrides), fold=a.fold, model=a.model, plan=a.plan,
                     resume=not a.no_resume, tracking=a.tracking)
    if a.sweep:
        from planner.infer import evaluate_fold, sweep_fold

        fold = int(fold_dir.name[4:])
        res = _run(sweep_fold, a.task, fold, model=fold_dir.parent.name)
        _print_sweep(res, fold)
        _print_metrics(_run(evaluate_fold, a.task, fold, model=fold_dir.parent.name), fold_dir / "val_results")


# -------------------------------------------------------------------------------------- unpack
def unpack_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nndet_unpack", description="Kept for nnDetection habits: our preprocessed "
                                "arrays are already uncompressed .npy (memory-mapped), so there is nothing to unpack.")
    p.add_argument("path", nargs="?", help="preprocessed folder (checked only)")
    p.add_argument("num_processes", nargs="?", type=int, default=0)
    a = p.parse_args(argv)
    _setup_logging()
    from planner.preprocess.run import unpack

    _run(unpack, Path(a.path) if a.path else None)


# ------------------------------------------------------------------------- sweep, eval, predict
def _model_and_fold(model: str | None, fold: str | None) -> tuple[str | None, int]:
    """nnDetection's ``TASK MODEL FOLD`` with MODEL optional: ``nndet_sweep 000 0`` means fold 0."""
    if model is not None and fold is None and model.lstrip("-").isdigit():
        return None, int(model)
    return model, int(fold) if fold is not None else 0


def _print_sweep(res, fold: int) -> None:
    print(f"sweep fold {fold}: {res.metric} {res.default_score:.4f} (defaults) -> {res.score:.4f}\nparams {res.params}")


def _print_metrics(metrics: dict[str, float], out: Path) -> None:
    keys = ["AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "AP_IoU_0.50_MaxDet_100",
            "FROC_score_IoU_0.10", "AR_IoU_0.10_MaxDet_100"]
    print("\n| metric | value |\n|---|---|")
    for k in keys:
        if k in metrics:
            print(f"| {k} | {metrics[k]:.4f} |")
    per_class = {k: v for k, v in metrics.items() if k.endswith("_AP_IoU_0.10_MaxDet_100")}
    for k, v in per_class.items():
        print(f"| {k} | {v:.4f} |")
    absent = [k[: -len("_AP_IoU_0.10_MaxDet_100")] for k, v in per_class.items() if v == -1]
    if absent:
        print(f"\nno object of class {', '.join(absent)} in these cases: as in nnDetection it enters the class "
              "means (AP, mAP) as -1; read the per-class rows")
    print(f"\nall metrics: {out / 'results_boxes.json'}\nplots:       {out}/*.png, {out}/examples/")


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
    _setup_logging()
    from planner.infer import sweep_fold

    model, fold = _model_and_fold(a.model, a.fold)
    res = _run(sweep_fold, a.task, fold, model=model, plan=a.plan, num_tta=a.num_tta, overwrite=a.overwrite)
    _print_sweep(res, fold)


def eval_main(argv: list[str] | None = None) -> None:
    p = _infer_parser("nndet_eval", "Box metrics (nnDetection's results_boxes.json keys) of a fold's validation "
                      "cases, or with --test of the test predictions, plus FROC/PR/score/size plots")
    p.add_argument("--test", action="store_true", help="evaluate test_predictions against raw_splitted/labelsTs")
    p.add_argument("--boxes", action="store_true", help="evaluate box predictions (nnDetection's flag; boxes are "
                   "the only output of this detector, so this is the default)")
    p.add_argument("--analyze_boxes", action="store_true", help="also write analysis/objects.csv (what each object "
                   "got), analysis/false_positives.csv and analysis/summary.json, and print the misses")
    p.add_argument("--no_plots", action="store_true")
    a = p.parse_intermixed_args(argv)
    _setup_logging()
    from planner.infer import evaluate_fold, evaluate_test
    from planner.train import bundle_for

    model, fold = _model_and_fold(a.model, a.fold)
    if a.test:
        metrics = _run(evaluate_test, a.task, model=model, plan=a.plan, plots=not a.no_plots,
                       analyze_boxes=a.analyze_boxes)
        out = bundle_for(a.task, model, a.plan) / "test_results"
    else:
        metrics = _run(evaluate_fold, a.task, fold, model=model, plan=a.plan, plots=not a.no_plots,
                       analyze_boxes=a.analyze_boxes)
        out = bundle_for(a.task, model, a.plan) / f"fold{fold}" / "val_results"
    _print_metrics(metrics, out)
    if a.analyze_boxes:
        from planner.analysis import ANALYSIS_DIR, format_summary
        from planner.io import load_json

        print(format_summary(load_json(out / ANALYSIS_DIR / "summary.json")))


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
    a = p.parse_intermixed_args(argv)
    _setup_logging()
    from planner.infer import predict_dir, predict_test

    folds = None if a.fold == -1 else [a.fold]
    if a.input_dir:
        if not a.output_dir:
            raise SystemExit("--input_dir needs --output_dir")
        if a.no_preprocess or a.check:
            raise SystemExit("--no_preprocess and --check apply to raw_splitted/imagesTs, not to --input_dir "
                             "(whose cases are always preprocessed in memory)")
        out = _run(predict_dir, a.task, a.input_dir, a.output_dir, model=a.model, plan=a.plan, folds=folds,
                   num_tta=a.num_tta, overwrite=a.overwrite)
    else:
        out = _run(predict_test, a.task, model=a.model, plan=a.plan, folds=folds, num_tta=a.num_tta,
                   overwrite=a.overwrite, preprocess=not a.no_preprocess, check=a.check,
                   num_processes_preprocessing=a.num_processes_preprocessing, force_args=a.force_args)
    print(f"predictions: {out}")


# ---------------------------------------------------------------------------------------- demo
# The demo: 20 toy training cases (nnDetection's toy task has 10; fold 0 then trains on 16 and sweeps on 4)
# and 20 + 2 epochs of 50 iterations: short enough for a 2-core CPU (see README and benchmarks/RESULTS.md),
# long enough for test AP@0.1 and FROC >= 0.95. With 10 cases and 10 + 2 epochs, the fold never saw a large
# SquareHole and scored one at 0.22 (test FROC 0.943).
DEMO_NUM_TRAIN = 20
DEMO_SCHEDULE = {"epochs": 20, "iterations": 50, "warmup": 50, "swa_epochs": 2}


def demo(preset: str = "cpu", num_processes: int | None = None, train_fold: bool = True) -> None:
    """The README's main job on the built-in toy data: example, then ``nndet run 000`` on fold 0 with the
    short :data:`DEMO_SCHEDULE` (``cpu`` planner preset when the toy preset is ``cpu``): prep -> train ->
    sweep -> validation metrics -> consolidate -> test predictions -> test metrics, printed as tables with
    the paths of the plots. Rerunning it resumes (finished stages are reused)."""
    from planner.toy import generate_example

    _setup_logging()
    nproc = paths.num_threads() if num_processes is None else num_processes
    nproc = min(nproc, os.cpu_count() or 1)
    root = paths.det_data()
    try:
        task_name = paths.resolve_task("000", root)
        logger.info("toy task %s exists, reusing it", task_name)
    except FileNotFoundError:
        _run(generate_example, root, preset=preset, num_train=DEMO_NUM_TRAIN, num_processes=nproc)
    plan_preset = "cpu" if preset == "cpu" else "default"
    run_chain("000", folds=[0], preset=plan_preset, overrides=dict(DEMO_SCHEDULE), num_processes=nproc,
              stages=None if train_fold else ("prep",))


# ----------------------------------------------------------------------------------------- run
def _print_stage(name: str, res) -> None:
    if name == "sweep":
        for f, sw in sorted(res.sweeps.items()):
            print(f"sweep fold {f}: {sw['metric']} {sw['default_score']:.4f} (defaults) -> {sw['score']:.4f}\n"
                  f"params {sw['params']}")
    elif name == "eval":
        for f, m in sorted(res.val_metrics.items()):
            print(f"\n== validation (fold {f}) ==")
            _print_metrics(m, res.bundle / f"fold{f}" / "val_results")
    elif name == "consolidate":
        print(f"\nconsolidated inference bundle: {res.consolidated}")
    elif name == "test" and res.test_metrics is not None:
        print("\n== test set (imagesTs vs labelsTs) ==")
        _print_metrics(res.test_metrics, res.bundle / "test_results")


def run_chain(task: str, **kwargs):
    """``nndet run``: :func:`planner.run.run_task` with the tables printed after each stage and a stage summary."""
    from planner.run import RUN_LOG, run_task

    if kwargs.get("stages") is None:
        kwargs.pop("stages", None)
    res = _run(run_task, task, on_stage=_print_stage, **kwargs)
    if res.stages:
        print("\n| stage | status | time |\n|---|---|---|")
        for e in res.stages:
            print(f"| {e['stage']} | {e['status']} | {e['seconds']:.0f} s |")
        total = sum(e["seconds"] for e in res.stages)
        print(f"\ntotal {total / 60:.1f} min; stage log: {res.bundle / RUN_LOG}")
    return res


def run_main(argv: list[str] | None = None) -> None:
    from planner.run import NUM_FOLDS
    from planner.run import STAGES as stages

    p = argparse.ArgumentParser(
        prog="nndet run",
        description="The whole chain for one task, resumable: " + " -> ".join(stages) + ". Every stage reuses what "
                    "is already on disk, so rerunning the same command continues a stopped run.",
        epilog="examples:\n  nndet run 000                       # 5 folds, default plan\n"
               "  nndet run 000 --preset cpu --folds 0 -o epochs=10 -o iterations=50 -o warmup=50 -o swa_epochs=2\n"
               "  nndet run 000 --stages predict test  # only predict and evaluate the test set\n"
               "  nndet run 000 --folds 0 1 2 3 4 --overwrite  # after more folds: re-consolidate, re-predict",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="task id or name: 000, Task000 or Task000D3_Example")
    p.add_argument("--folds", type=int, nargs="+", default=None, help=f"folds to train and ensemble "
                   f"(default 0..{NUM_FOLDS - 1})")
    p.add_argument("--plan", default=None, help="plan id, e.g. D3V001_3d or D3V001CPU_3d (default: the preset's main plan)")
    p.add_argument("--preset", default=None, choices=["default", "cpu"], help="planner preset (default: default; "
                   "cpu = narrow network on small patches for a few CPU cores)")
    p.add_argument("-o", "--overrides", action="append", help="key=value of configs/train.json for training, "
                   "e.g. -o epochs=10 -o lr=0.005")
    p.add_argument("--stages", nargs="+", default=list(stages), choices=list(stages),
                   help="run only these stages (always in chain order)")
    p.add_argument("--num_tta", type=int, default=None, help="mirror TTA for sweep and prediction (default 8 in 3D, 4 in 2D)")
    p.add_argument("-np", "--num_processes", type=int, default=None, help="workers for checks, preprocessing and "
                   "data loading (default det_num_threads)")
    p.add_argument("--device", default=None, help="cpu or cuda for inference (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace a consolidated bundle or test predictions "
                   "made from another fold set (otherwise the run stops and names them)")
    a = p.parse_args(argv)
    _setup_logging()
    run_chain(a.task, folds=a.folds, plan=a.plan, preset=a.preset, overrides=_parse_overrides(a.overrides),
              stages=a.stages, num_tta=a.num_tta, num_processes=a.num_processes, device=a.device,
              overwrite=a.overwrite)


# nndet <command> [args]: commands with nnDetection's flags (-np, -o key=value) go to their argparse
# entry point; everything else (demo, API-style calls) goes through fire.
ARGPARSE_COMMANDS = {"run": lambda argv: run_main(argv), "env": env_main, "example": example_main, "prep": prep_main, "unpack": unpack_main,
                     "train": train_main, "sweep": sweep_main, "eval": eval_main, "predict": predict_main,
                     "consolidate": lambda argv: consolidate_main(argv), "boxes2nii": lambda argv: boxes2nii_main(argv)}


class _Umbrella:
    """nndet <command>: run, env, example, prep, unpack, train, ... (same flags as nndet_<command>) and demo."""

    def demo(self, preset: str = "cpu", num_processes: int | None = None, train: bool = True):
        """Run the main job on the toy data (what `make demo` runs); --notrain stops after prep."""
        demo(preset=preset, num_processes=num_processes, train_fold=train)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ARGPARSE_COMMANDS:
        ARGPARSE_COMMANDS[argv[0]](argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: nndet <command> [args]\n\ncommands:\n  " + "\n  ".join([*ARGPARSE_COMMANDS, "demo"])
              + "\n\n`nndet <command> -h` shows the flags of each (same as nndet_<command>).")
        return
    import fire

    fire.Fire(_Umbrella, command=argv, name="nndet")


# ---------------------------------------------------------------------------------- consolidate
def consolidate_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="nndet_consolidate",
        description="Consolidate the trained folds of a task into one self-contained inference bundle "
                    "<bundle>/consolidated/ (configs/inference.json, metadata.json, models/model_fold<X>.pt, docs/)",
        epilog="example:\n  nndet_consolidate 000 --num_folds 5\n  cd $det_models/Task000D3_Example/"
               "RetinaUNetV001_D3V001_3d/consolidated && python -m monai.bundle run --config_file "
               "configs/inference.json --meta_file configs/metadata.json --bundle_root . --input_dir IN --output_dir OUT",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="task id or name: 000, Task000 or Task000D3_Example")
    p.add_argument("model", nargs="?", default=None, help="model folder, e.g. RetinaUNetV001_D3V001_3d (default: main plan)")
    p.add_argument("--plan", default=None, help="plan id instead of MODEL, e.g. D3V001CPU_3d")
    p.add_argument("--num_folds", type=int, default=None, help="consolidate folds 0..N-1 (all must be trained); "
                   "default: every trained fold")
    p.add_argument("--no_sweep_boxes", action="store_true", help="nnDetection's default postprocessing parameters "
                   "instead of the folds' sweep")
    p.add_argument("--no_model", action="store_true", help="configs, scripts and docs only (no weights in models/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing consolidated/ folder")
    a = p.parse_args(argv)
    _setup_logging()
    from planner.consolidate import consolidate

    out = _run(consolidate, a.task, model=a.model, plan=a.plan, num_folds=a.num_folds,
               sweep_boxes=not a.no_sweep_boxes, no_model=a.no_model, overwrite=a.overwrite)
    print(f"consolidated bundle: {out}\nrun it:  cd {out} && python -m monai.bundle run --config_file "
          "configs/inference.json --meta_file configs/metadata.json --bundle_root . --input_dir IN --output_dir OUT")


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
    a = p.parse_args(argv)
    _setup_logging()
    from planner.boxes2nii import convert_folder
    from planner.train import bundle_for

    bundle = _run(bundle_for, a.task, a.model, a.plan)
    task_root = paths.det_data() / paths.resolve_task(a.task)
    written = _run(convert_folder, a.pred_dir or bundle / "test_predictions",
                   a.images_dir or task_root / "raw_splitted" / "imagesTs", a.out_dir or bundle / "test_predictions_nii",
                   a.threshold, a.overwrite)
    print(f"{len(written)} instance NIfTI file(s) in {written[0].parent if written else a.out_dir}")
