"""``nndet run`` (the whole chain, resumable) and ``nndet demo`` (the README's main job on the toy data)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from planner import paths
from planner.presets import PRESET_NAMES
from workflow.cli.common import parse_overrides, print_metrics, run_api, setup_logging

logger = logging.getLogger("workflow")

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

    setup_logging()
    nproc = paths.num_threads() if num_processes is None else num_processes
    nproc = min(nproc, os.cpu_count() or 1)
    root = paths.det_data()
    try:
        task_name = paths.resolve_task("000", root)
        logger.info("toy task %s exists, reusing it", task_name)
    except FileNotFoundError:
        run_api(generate_example, root, preset=preset, num_train=DEMO_NUM_TRAIN, num_processes=nproc)
    plan_preset = "cpu" if preset == "cpu" else "default"
    run_chain("000", folds=[0], preset=plan_preset, overrides=dict(DEMO_SCHEDULE), num_processes=nproc,
              stages=None if train_fold else ("prep",))


# ----------------------------------------------------------------------------------------- run
def _print_stage(name: str, res) -> None:
    if name == "prep" and res.prep is not None:
        from workflow.cli.setup import print_prep

        print_prep(res.prep)
    elif name == "sweep":
        for f, sw in sorted(res.sweeps.items()):
            print(f"sweep fold {f}: {sw['metric']} {sw['default_score']:.4f} (defaults) -> {sw['score']:.4f}\n"
                  f"params {sw['params']}")
    elif name == "eval":
        for f, m in sorted(res.val_metrics.items()):
            print(f"\n== validation (fold {f}) ==")
            print_metrics(m, res.bundle / f"fold{f}" / "val_results")
    elif name == "consolidate":
        print(f"\nconsolidated inference bundle: {res.consolidated}")
    elif name == "test" and res.test_metrics is not None:
        print("\n== test set (imagesTs vs labelsTs) ==")
        print_metrics(res.test_metrics, res.bundle / "test_results")


def run_chain(task: str, **kwargs):
    """``nndet run``: :func:`workflow.run.run_task` with the tables printed after each stage and a stage summary."""
    from workflow.run import RUN_LOG, run_task

    if kwargs.get("stages") is None:
        kwargs.pop("stages", None)
    res = run_api(run_task, task, on_stage=_print_stage, **kwargs)
    if res.stages:
        print("\n| stage | status | time |\n|---|---|---|")
        for e in res.stages:
            print(f"| {e['stage']} | {e['status']} | {e['seconds']:.0f} s |")
        total = sum(e["seconds"] for e in res.stages)
        print(f"\ntotal {total / 60:.1f} min; stage log: {res.bundle / RUN_LOG}")
    return res


def find_best_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="nndet_find_best",
        description="Compare the trained plans of a task (and their WBC ensemble) on their out-of-fold validation "
                    "predictions, write $det_models/<task>/best_configuration.json, consolidate the winner",
        epilog="examples:\n  nndet_find_best 000 --folds 0 1 2 3 4\n"
               "  nndet_find_best 000 --plans D3V001_3d D3V001_3dlr1 --no_consolidate",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="task id or name: 000, Task000 or Task000D3_Example")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="folds to compare on (default 0..4; "
                   "each trained and swept in every plan)")
    p.add_argument("--plans", nargs="+", default=None, help="plan ids (default: every plan with these folds trained)")
    p.add_argument("--no_consolidate", action="store_true", help="only compare and write the file")
    p.add_argument("--overwrite", action="store_true", help="replace a consolidated bundle of other folds")
    a = p.parse_args(argv)
    setup_logging()
    from workflow.find_best import best_table, find_best

    print(best_table(run_api(find_best, a.task, folds=a.folds, plans=a.plans, consolidate=not a.no_consolidate,
                             overwrite=a.overwrite)))


def run_main(argv: list[str] | None = None) -> None:
    from workflow.run import NUM_FOLDS
    from workflow.run import STAGES as stages

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
    p.add_argument("--preset", default=None, choices=list(PRESET_NAMES), help="planner preset (default: default; "
                   "cpu = narrow network on small patches for a few CPU cores)")
    p.add_argument("-o", "--overrides", action="append", help="key=value of configs/train.json for training, "
                   "e.g. -o epochs=10 -o lr=0.005")
    p.add_argument("--stages", nargs="+", default=list(stages), choices=list(stages),
                   help="run only these stages (always in chain order)")
    p.add_argument("--num_tta", type=int, default=None, help="mirror TTA for sweep and prediction (default 8 in 3D, 4 in 2D)")
    p.add_argument("-np", "--num_processes", type=int, default=None, help="workers for checks, preprocessing and "
                   "data loading (default det_num_threads)")
    p.add_argument("--device", default=None, help="cpu or cuda for inference (default: cuda when available)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per fold (DDP when > 1); folds run in parallel, one "
                   "per free GPU (or group of --gpus), one after another without CUDA")
    p.add_argument("--overwrite", action="store_true", help="replace a consolidated bundle or test predictions "
                   "made from another fold set (otherwise the run stops and names them)")
    p.add_argument("--plans", default=None, choices=["all"], help="all: train every plan of the preset (full and, "
                   "where planned, low resolution) on the same folds, choose the best (or their ensemble) by "
                   "cross-validation (nndet_find_best), consolidate it and predict the test set with it")
    a = p.parse_args(argv)
    setup_logging()
    if a.plans == "all":
        if a.plan:
            raise SystemExit("--plans all and --plan exclude each other")
        from workflow.find_best import best_table
        from workflow.run import run_plans

        best = run_api(run_plans, a.task, folds=a.folds, preset=a.preset, stages=a.stages, overwrite=a.overwrite,
                       on_best=lambda b: print("\n" + best_table(b)), overrides=parse_overrides(a.overrides),
                       num_tta=a.num_tta, num_processes=a.num_processes, device=a.device, gpus=a.gpus,
                       on_stage=_print_stage)
        if best.get("test_metrics"):
            print(f"\n== test set with the plan ensemble {best['consolidated_model']} ==")
            print_metrics(best["test_metrics"], Path(best["consolidated"]).parent / "test_results")
        return
    run_chain(a.task, folds=a.folds, plan=a.plan, preset=a.preset, overrides=parse_overrides(a.overrides),
              stages=a.stages, num_tta=a.num_tta, num_processes=a.num_processes, device=a.device,
              overwrite=a.overwrite, gpus=a.gpus)


