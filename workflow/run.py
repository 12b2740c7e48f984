"""`nndet run TASK`: the whole chain for one task, stage after stage, resumable.

Stages (nnDetection's pipeline of commands, each equal to its own command), in this order:

``prep``         checks, fingerprint, plans, bundle generation, preprocessing (``nndet_prep``)
``train``        every requested fold (``nndet_train``; a finished fold is kept, an interrupted one resumes
                 from ``fold<X>/model_last.pt``; several folds run as jobs, one per free GPU)
``sweep``        raw validation predictions and the postprocessing sweep of each fold (``nndet_sweep``)
``eval``         validation metrics of each fold with its swept parameters (``nndet_eval``)
``consolidate``  one inference bundle over the folds (``nndet_consolidate``)
``predict``      the fold ensemble on ``imagesTs`` (``nndet_predict``), when the task has test images
``test``         test metrics against ``labelsTs`` (``nndet_eval --test``), when the task has test labels

``nndet run TASK --plans all`` (:func:`run_plans`) runs train, sweep and eval for every plan the planner made,
chooses between them and their ensemble by cross-validation (``nndet_find_best``), consolidates the winner and
predicts the test set with it.

Resuming: every stage looks at what is already on disk and only does what is missing, so a run that was
stopped (Ctrl-C, a killed job, a full disk) is continued by running the same command again. Outputs that
exist but were made from something else (a consolidated bundle or test predictions of another fold set)
are never replaced silently: the run stops and names them; ``overwrite=True`` (``--overwrite``) replaces
them. Each run appends its stages with status and time to ``<bundle>/run_log.json``.

Why our own driver: MONAI bundles run one config at a time (``monai.bundle run``); MONAI has no
multi-stage, multi-fold task runner, and nnDetection has none either (its README lists the commands).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from planner import paths
from planner.io import load_json, save_json

logger = logging.getLogger(__name__)

STAGES = ("prep", "train", "sweep", "eval", "consolidate", "predict", "test")
NUM_FOLDS = 5
RUN_LOG = "run_log.json"


@dataclass
class RunResult:
    """What :func:`run_task` did: the bundle, per-fold validation metrics, test metrics, stage log."""

    task: str
    bundle: Path | None = None
    folds: list[int] = field(default_factory=list)
    val_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    test_metrics: dict[str, float] | None = None
    sweeps: dict[int, Any] = field(default_factory=dict)
    prep: Any = None  # planner.prep.PrepResult of the prep stage
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def consolidated(self) -> Path | None:
        return self.bundle / "consolidated" if self.bundle is not None else None


def _check_stages(stages: Sequence[str]) -> list[str]:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)} (run in this order)")
    return [s for s in STAGES if s in stages]


def _preset_of(plan: str | None, preset: str | None) -> str:
    from planner.plan.planner import preset_planner_ids

    if plan is not None and plan.split("_")[0] in preset_planner_ids("cpu"):
        if preset not in (None, "cpu"):
            raise ValueError(f"plan {plan} belongs to the cpu preset, not to preset {preset!r}: drop --preset")
        return "cpu"
    return preset or "default"


def _preset_main_plan(task_name: str, preset: str) -> str:
    """The preset's full-resolution 3D (or 2D) plan of a planned task."""
    from planner.plan.planner import preset_planner_ids
    from workflow.models import task_plans

    ids = preset_planner_ids(preset)
    mine = sorted((p for p in task_plans(task_name) if p.planner_id in ids and p.mode in ("3d", "2d")),
                  key=lambda p: p.plan_id)
    if not mine:
        raise FileNotFoundError(f"task {task_name} has no plan of preset {preset!r}: run the prep stage "
                                f"(`nndet_prep {task_name} --preset {preset}`)")
    return mine[0].plan_id


def prediction_folds(pred_dir: Path) -> dict[str, list[int]]:
    """``case -> folds`` recorded in existing ``<case>_boxes.json`` files."""
    out = {}
    for f in sorted(pred_dir.glob("*_boxes.json")) if pred_dir.is_dir() else []:
        out[f.name[: -len("_boxes.json")]] = [int(x) for x in load_json(f).get("folds", [])]
    return out


def _newer(target: Path, *sources: Path) -> bool:
    """``target`` exists and is at least as new as every existing source."""
    if not target.is_file():
        return False
    t = target.stat().st_mtime
    return all(t >= s.stat().st_mtime for s in sources if s.is_file())


def run_task(
    task: str | int,
    *,
    folds: Sequence[int] | None = None,
    plan: str | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    stages: Sequence[str] = STAGES,
    num_tta: int | None = None,
    num_processes: int | None = None,
    overwrite: bool = False,
    device: str | None = None,
    gpus: int = 1,
    on_stage: Callable[[str, RunResult], None] | None = None,
) -> RunResult:
    """Run the chain of :data:`STAGES` for ``task`` (see the module docstring).

    Args:
        task: task id or folder name under ``$det_data``.
        folds: folds to train and ensemble (default all five, nnDetection's cross-validation).
        plan: plan id to train (default the main plan of the preset: full-resolution 3D, or 2D).
        preset: planner preset, ``default`` or ``cpu`` (derived from ``plan`` when that is a cpu plan).
        overrides: ``configs/train.json`` ids for training (``epochs``, ``iterations``, ``lr``, ...).
        stages: the subset of :data:`STAGES` to run (always in chain order).
        num_tta: mirror TTA for the sweep and the test predictions (default 8 in 3D, 4 in 2D).
        num_processes: workers for checks, preprocessing and data loading (default ``det_num_threads``).
        overwrite: replace outputs that exist but do not match this run (consolidated bundle and test
            predictions of another fold set); matching outputs are reused either way.
        device: ``cpu`` or ``cuda`` for inference (default CUDA when available).
        gpus: GPUs per fold (DDP when > 1). Several folds train as separate jobs, one per free GPU (or group of
            ``gpus``), one after another without CUDA (:func:`workflow.train.train_folds`); a failed fold does
            not stop the others, but the run stops before the sweep and names it.
        on_stage: called after each stage with its name and the result so far (the CLI prints from it).

    Raises:
        FileExistsError: a stale output is in the way and ``overwrite`` is False (the message names it).
    """
    from planner.prep import run_prep
    from workflow.evaluate import evaluate_fold, evaluate_test
    from workflow.models import bundle_for, consolidated_folds, main_plan, trained_folds
    from workflow.predict import predict_test
    from workflow.sweep import sweep_fold
    from workflow.train import run_training, train_folds

    todo = _check_stages(stages)
    preset = _preset_of(plan, preset)
    task_name = paths.resolve_task(task)
    task_root = paths.det_data() / task_name
    folds = sorted({int(f) for f in (range(NUM_FOLDS) if folds is None else folds)})
    if not folds or min(folds) < 0:
        raise ValueError(f"folds must be >= 0, got {folds}")
    nproc = paths.num_threads() if num_processes is None else int(num_processes)
    result = RunResult(task=task_name, folds=folds)
    log_entries: list[dict[str, Any]] = []

    def stage(name: str, fn: Callable[[], str]) -> None:
        if name not in todo:
            return
        logger.info("== %s: stage %s ==", task_name, name)
        t0 = time.perf_counter()
        status = fn()
        entry = {"stage": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
                 "finished_at": datetime.now().isoformat(timespec="seconds")}
        log_entries.append(entry)
        result.stages.append(entry)
        if result.bundle is not None:
            _append_log(result.bundle, entry, folds)
        if on_stage is not None:
            on_stage(name, result)

    def do_prep() -> str:
        result.prep = run_prep(task_name, num_processes=nproc, num_processes_preprocessing=nproc, preset=preset)
        return "done"

    stage("prep", do_prep)
    plan_id = plan or _preset_main_plan(task_name, preset)
    main_plan(task_name, plan_id)  # unknown plan id: a clear error before any training
    result.bundle = bundle = bundle_for(task_name, plan=plan_id)
    for entry in log_entries:  # prep ran before the bundle was known
        _append_log(bundle, entry, folds)

    def do_train() -> str:
        before = set(trained_folds(bundle))
        ov = {"num_workers": nproc, **(overrides or {})}
        if len(folds) == 1:
            run_training(task_name, fold=folds[0], overrides=ov, plan=plan_id, gpus=gpus)
        else:  # one job per fold and free GPU (one after another on the CPU); consolidation waits for all
            train_folds(task_name, folds, overrides=ov, plan=plan_id, gpus=gpus)
        return "done" if set(folds) - before else "reused"

    def do_sweep() -> str:
        ran = False
        for f in folds:
            params = bundle / f"fold{f}" / "sweep" / "params.json"
            last = bundle / f"fold{f}" / "model_last.pt"
            if _newer(params, last):
                result.sweeps[f] = load_json(params)
                continue
            result.sweeps[f] = sweep_fold(task_name, f, plan=plan_id, num_tta=num_tta, device=device,
                                          overwrite=params.is_file()).to_dict()
            ran = True
        return "done" if ran else "reused"

    def do_eval() -> str:
        for f in folds:
            result.val_metrics[f] = evaluate_fold(task_name, f, plan=plan_id)
        return "done"

    def do_consolidate() -> str:
        from workflow.consolidate import consolidate

        have = consolidated_folds(bundle)
        if have == folds:
            return "reused"
        if have is not None and not overwrite:
            raise FileExistsError(f"{bundle / 'consolidated'} holds folds {have}, this run has folds {folds}: "
                                  "pass --overwrite to replace it (or move it away)")
        consolidate(task_name, plan=plan_id, folds=folds, overwrite=have is not None)
        return "done"

    test_images = task_root / "preprocessed" / plan_id / "imagesTs"
    has_test = (task_root / "raw_splitted" / "imagesTs").is_dir() or test_images.is_dir()

    def do_predict() -> str:
        if not has_test:
            return "skipped (no imagesTs)"
        pred_dir = bundle / "test_predictions"
        stale = sorted(c for c, fs in prediction_folds(pred_dir).items() if fs != folds)
        if stale and not overwrite:
            raise FileExistsError(f"{pred_dir}: {len(stale)} prediction(s) (e.g. {stale[0]}) were made with other "
                                  f"folds than {folds}: pass --overwrite to replace them (or move them away)")
        n_before = len(prediction_folds(pred_dir)) - len(stale)
        predict_test(task_name, plan=plan_id, folds=folds, num_tta=num_tta, overwrite=bool(stale), device=device)
        return "done" if len(prediction_folds(pred_dir)) > n_before or stale else "reused"

    def do_test() -> str:
        if not (task_root / "raw_splitted" / "labelsTs").is_dir() or not (bundle / "test_predictions").is_dir():
            return "skipped (no labelsTs or no test predictions)"
        result.test_metrics = evaluate_test(task_name, plan=plan_id)
        return "done"

    stage("train", do_train)
    stage("sweep", do_sweep)
    stage("eval", do_eval)
    stage("consolidate", do_consolidate)
    stage("predict", do_predict)
    stage("test", do_test)
    return result


def preset_plans(task_name: str, preset: str) -> list[str]:
    """Every plan of the preset the planner made for the task (full resolution first, then low resolution)."""
    from planner.plan.planner import preset_planner_ids
    from workflow.models import task_plans

    ids = preset_planner_ids(preset)
    return sorted((p.plan_id for p in task_plans(task_name) if p.planner_id in ids),
                  key=lambda pid: (pid != _preset_main_plan(task_name, preset), pid))


def run_plans(task: str | int, *, folds: Sequence[int] | None = None, preset: str | None = None,
              stages: Sequence[str] = STAGES, overwrite: bool = False,
              on_best: Callable[[dict[str, Any]], None] | None = None, **kwargs: Any) -> dict[str, Any]:
    """``nndet run TASK --plans all``: every plan of the preset through train, sweep and eval on the same folds,
    then ``workflow.find_best.find_best`` (each plan and their ensemble by out-of-fold validation, the winner
    consolidated), then the test set with the winner. ``kwargs`` go to :func:`run_task` (overrides, num_tta,
    num_processes, device, gpus, on_stage). Returns the ``best_configuration.json`` content."""
    from workflow.find_best import find_best

    todo = _check_stages(stages)
    preset = preset or "default"
    task_name = paths.resolve_task(task)
    folds = sorted({int(f) for f in (range(NUM_FOLDS) if folds is None else folds)})
    if "prep" in todo:
        run_task(task_name, folds=folds, preset=preset, stages=("prep",), overwrite=overwrite, **kwargs)
    plans = preset_plans(task_name, preset)
    logger.info("%s: plans of preset %s: %s", task_name, preset, plans)
    cv = [s for s in ("train", "sweep", "eval") if s in todo]
    for pid in plans:
        if cv:
            run_task(task_name, folds=folds, plan=pid, stages=cv, overwrite=overwrite, **kwargs)
    best = find_best(task_name, folds=folds, plans=plans, consolidate="consolidate" in todo, overwrite=overwrite)
    if on_best is not None:
        on_best(best)
    rest = [s for s in ("predict", "test") if s in todo]
    if rest and best.get("consolidated_plan"):
        run_task(task_name, folds=folds, plan=best["consolidated_plan"], stages=rest, overwrite=overwrite, **kwargs)
    elif rest and best.get("consolidated_ensemble"):
        best["test_metrics"] = _ensemble_test(task_name, best["consolidated_ensemble"], rest, overwrite, kwargs)
    return best


def _ensemble_test(task_name: str, plans: Sequence[str], todo: Sequence[str], overwrite: bool,
                   kwargs: dict[str, Any]) -> dict[str, float] | None:
    """The predict and test stages with the consolidated plan ensemble (``workflow.ensemble``)."""
    from workflow.ensemble import evaluate_ensemble_test, predict_ensemble_test

    task_root = paths.det_data() / task_name / "raw_splitted"
    if not any((task_root / "imagesTs").glob("*.nii.gz")):
        logger.info("%s: no imagesTs, the ensemble predicts nothing", task_name)
        return None
    if "predict" in todo:
        predict_ensemble_test(task_name, plans, num_tta=kwargs.get("num_tta"), device=kwargs.get("device"),
                              overwrite=overwrite)
    if "test" in todo and (task_root / "labelsTs").is_dir():
        return evaluate_ensemble_test(task_name, plans)
    return None


def _append_log(bundle: Path, entry: dict[str, Any], folds: Sequence[int]) -> None:
    f = bundle / RUN_LOG
    log = load_json(f) if f.is_file() else {"runs": []}
    log["runs"].append({**entry, "folds": list(folds)})
    save_json(log, f)
