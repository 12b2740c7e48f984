"""`nndet_prep` as an API: checks -> fingerprint -> plans -> bundle per plan -> preprocessing.

Each stage writes a JSON artefact the next one reads and is skipped when its artefact exists,
unless ``overwrite`` is set (nnU-Net's habit): a rerun after a crash picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from planner import paths
from planner.dataset import DatasetInfo, load_dataset_info
from planner.io import exclusive_lock, save_json
from planner.plan.plan import PLANNER_VERSION, Plan

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET_GB = 11523260416 / 2**30  # nnDetection's RTX 2080 Ti target, in GiB


@dataclass
class PrepResult:
    """What `nndet_prep` produced (paths are absolute)."""

    task: str
    fingerprint: Path
    plans: list[Plan] = field(default_factory=list)
    plan_files: list[Path] = field(default_factory=list)
    bundles: list[Path] = field(default_factory=list)
    preprocessed: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


PLOTS_DONE = "plots.json"  # written once every planner plot is; its absence makes a rerun plot again


def plan_inputs_hash(fingerprint_file: Path, preset: str, memory_budget_gb: float) -> str:
    """What a plan depends on besides the rules: the fingerprint's bytes, the preset, the memory budget."""
    h = hashlib.sha256(Path(fingerprint_file).read_bytes())
    h.update(f"|{preset}|{float(memory_budget_gb):.6g}".encode())
    return h.hexdigest()[:16]


def stale_reason(plan: Plan, inputs_hash: str) -> str | None:
    """Why a stored plan is not what the planner would make now (None when it is)."""
    if plan.planner_version != PLANNER_VERSION:
        made = f"version {plan.planner_version}" if plan.planner_version else "a version before versions were recorded"
        return f"made by planner {made}, current rules are version {PLANNER_VERSION}"
    if plan.inputs_hash and plan.inputs_hash != inputs_hash:
        return "the fingerprint, preset or memory budget changed since it was made"
    return None


def fingerprint_path(task_root: Path) -> Path:
    return task_root / "preprocessed" / "fingerprint.json"


def plans_dir(task_root: Path) -> Path:
    return task_root / "preprocessed" / "plans"


def run_checks(task_root: Path, full_check: bool = False, num_processes: int = 0) -> DatasetInfo:
    """Validate the raw task (all problems at once); raises DatasetError before anything is written."""
    from planner.checks import assert_task_ok

    assert_task_ok(task_root, full=full_check, num_processes=num_processes)
    return load_dataset_info(task_root)


def run_prep(
    task: str | int,
    *,
    full_check: bool = False,
    no_check: bool = False,
    num_processes: int = 0,
    num_processes_preprocessing: int = 0,
    overwrite: bool = False,
    memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB,
    preprocess: bool = True,
    preset: str = "default",
    overwrite_trained: bool = False,
) -> PrepResult:
    """Run the whole preparation of a task (see module docstring).

    Args:
        task: task id or folder name under ``$det_data`` (``000``, ``Task000``, ``Task000D3_Example``).
        full_check: also load every case and check geometry and instance/json consistency.
        no_check: skip the checks (not recommended).
        num_processes: workers for checks and fingerprint (``-np``).
        num_processes_preprocessing: workers for resampling/normalisation (``-npp``).
        overwrite: recompute stages whose outputs exist (otherwise they are reused).
        memory_budget_gb: GPU memory budget the planner fits the patch size to.
        preprocess: run the preprocessing stage (``False`` stops after planning and bundle generation).
        preset: planner preset, ``default`` (nnDetection's network, plans ``D3V001_*``) or ``cpu`` (a narrow
            network on small patches that trains on a few CPU cores, plans ``D3V001CPU_*``).
    """
    from planner.plan.planner import preset_defaults

    preset_defaults(preset, 3)  # unknown preset: fail before any work
    paths.det_models()  # fail early (with the export line) before any work
    task_name = paths.resolve_task(task)
    task_root = paths.det_data() / task_name
    with exclusive_lock(task_root / ".nndet_prep.lock", f"nndet_prep of {task_name}"):
        return _run_prep(task_name, task_root, full_check=full_check, no_check=no_check, num_processes=num_processes,
                         num_processes_preprocessing=num_processes_preprocessing, overwrite=overwrite,
                         memory_budget_gb=memory_budget_gb, preprocess=preprocess, preset=preset,
                         overwrite_trained=overwrite_trained)


def _run_prep(task_name: str, task_root: Path, *, full_check: bool, no_check: bool, num_processes: int,
              num_processes_preprocessing: int, overwrite: bool, memory_budget_gb: float, preprocess: bool,
              preset: str, overwrite_trained: bool) -> PrepResult:
    from planner.plan.planner import preset_planner_ids

    if no_check:
        logger.warning("checks skipped (--no_check): broken cases will fail later with less helpful errors")
        dataset = load_dataset_info(task_root)
    else:
        dataset = run_checks(task_root, full_check=full_check, num_processes=num_processes)

    from planner.bundle import generate_bundle
    from planner.fingerprint import Fingerprint, compute_fingerprint
    from planner.plan.planner import plan_task
    from planner.plan.plots import write_planner_plots
    from planner.preprocess.run import preprocess_task

    fp_path = fingerprint_path(task_root)
    if fp_path.exists() and not overwrite:
        logger.info("fingerprint exists, reusing %s (overwrite to recompute)", fp_path)
        fingerprint = Fingerprint.from_json(fp_path)
    else:
        fingerprint = compute_fingerprint(task_root, num_processes=num_processes)
        fingerprint.to_json(fp_path)
        logger.info("fingerprint written to %s", fp_path)
    result = PrepResult(task=task_name, fingerprint=fp_path)

    pdir = plans_dir(task_root)
    inputs = plan_inputs_hash(fp_path, preset, memory_budget_gb)
    plot_pool = plot_job = None
    ids = preset_planner_ids(preset)
    existing = [p for p in sorted(pdir.glob("*.json")) if p.stem.split("_")[0] in ids] if pdir.is_dir() else []
    if existing and not overwrite:
        logger.info("plans exist, reusing %s (overwrite to re-plan)", [p.name for p in existing])
        plans = [Plan.from_json(p) for p in existing]
        plans.sort(key=lambda p: (p.mode != "3d" and p.mode != "2d", p.mode))
        for plan in plans:
            why = stale_reason(plan, inputs)
            if why:
                logger.warning("plan %s is stale: %s; re-plan with `nndet_prep %s --overwrite` (trained folds of its "
                               "bundle then need --overwrite_trained)", plan.plan_id, why, task_name)
        if not (pdir / "analysis" / PLOTS_DONE).is_file():  # an earlier run stopped before its plots were done
            logger.info("planner plots missing or incomplete: writing them to %s", pdir / "analysis")
            plot_pool = paths.worker_pool(1)
            plot_job = plot_pool.apply_async(write_planner_plots, (fingerprint, plans, pdir / "analysis"))
    else:
        plans = plan_task(fingerprint, dataset, memory_budget_bytes=int(memory_budget_gb * 2**30), preset=preset)
        plans = [dataclasses.replace(p, planner_version=PLANNER_VERSION, inputs_hash=inputs) for p in plans]
        for plan in plans:
            plan.to_json(pdir / f"{plan.plan_id}.json")
        # plots render in a side process while bundles are generated and cases preprocessed
        plot_pool = paths.worker_pool(1)
        plot_job = plot_pool.apply_async(write_planner_plots, (fingerprint, plans, pdir / "analysis"))
    result.plans = plans
    result.plan_files = [pdir / f"{p.plan_id}.json" for p in plans]

    try:
        for plan in plans:
            bundle_dir = paths.det_models() / task_name / plan.model_name
            if bundle_dir.exists() and not overwrite:
                logger.info("bundle exists, reusing %s (overwrite to regenerate)", bundle_dir)
            else:
                generate_bundle(plan, dataset, bundle_dir, overwrite=overwrite, overwrite_trained=overwrite_trained)
            result.bundles.append(bundle_dir)
            if preprocess:
                preprocess_task(
                    task_root, bundle_dir, plan, num_processes=num_processes_preprocessing, overwrite=overwrite
                )
                result.preprocessed.append(task_root / "preprocessed" / plan.plan_id)
        if plot_job is not None:
            result.plots = plot_job.get()
            save_json({"plots": [str(p) for p in result.plots]}, pdir / "analysis" / PLOTS_DONE)
    finally:
        if plot_pool is not None:
            plot_pool.terminate() if not plot_job.ready() else plot_pool.close()
            plot_pool.join()
    return result
