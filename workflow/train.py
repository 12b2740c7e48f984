"""`nndet_train` as an API: run a generated bundle's ``configs/train.json`` for one fold.

``run_training("000", fold=0, overrides={"epochs": 3})`` is the same as, inside the bundle folder::

    python -m monai.bundle run training --config_file configs/train.json --meta_file configs/metadata.json \
        --bundle_root . --fold 0 --epochs 3

Override keys are the config ids of ``train.json`` (``epochs``, ``swa_epochs``, ``iterations``, ``warmup``,
``lr``, ``batch_size``, ``num_workers``, ``amp``, ``seed``, ...); nnDetection's ``exp.fold`` is accepted
as ``fold``. A rerun resumes from ``fold<X>/model_last.pt``; a finished fold is not trained again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner import paths
from planner.io import exclusive_lock
from workflow.bundle_code import bundle_module
from workflow.models import META_FILE, TRAIN_CONFIG, bundle_for, bundle_plan, fold_finished

logger = logging.getLogger(__name__)

RUN_ID = "training"
ALIASES = {"exp.fold": "fold", "exp_fold": "fold", "train.fold": "fold"}


def coerce(value: Any) -> Any:
    """CLI strings to JSON values (``"3"`` -> 3, ``"true"`` -> True, ``"[1,2]"`` -> list); others unchanged."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def normalise_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Map nnDetection-style keys (``exp.fold``) to config ids and coerce CLI strings."""
    out = {}
    for key, value in (overrides or {}).items():
        out[ALIASES.get(key, key).replace(".", "#")] = coerce(value)
    return out


def check_override_ids(config_file: Path, overrides: dict[str, Any]) -> None:
    """Refuse override keys that are not config ids of ``train.json`` (``monai.bundle run`` would silently add
    them and train with the default instead)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_file))
    unknown = sorted(k for k in overrides if k not in parser)
    if unknown:
        top = sorted(k for k, v in parser.get().items() if not isinstance(v, (dict, list)) and not k.startswith("_"))
        raise ValueError(f"unknown override(s) {unknown} for {config_file}; settable ids: {', '.join(top)} "
                         "(nested ids with '#', e.g. train#trainer#max_epochs)")


MULTI_GPU_CONFIG = "configs/multi_gpu_train.json"


class TorchrunFailed(RuntimeError):
    """The torchrun of a DDP fold exited with an error (its processes printed why)."""


def cli_value(value: Any) -> str:
    """A config value as ``monai.bundle run``'s command line (python-fire) reads it back: strings as they are,
    everything else as a Python literal (fire reads ``true`` as a string, ``True`` as the bool)."""
    return value if isinstance(value, str) else repr(value)


def torchrun_command(
    bundle: Path,
    overrides: dict[str, Any],
    gpus: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    python: str | None = None,
) -> list[str]:
    """The ``torchrun`` line that trains one fold of ``bundle`` with DDP over ``gpus`` processes per node.

    ``train.json`` layered with ``multi_gpu_train.json`` (the model-zoo convention). One node: ``--standalone``
    (a free local port). Several: torchrun's static rendezvous at ``rdzv_endpoint`` (``HOST:PORT`` of node 0),
    the same line on every node but for ``--node_rank``.

    Args:
        bundle: the model folder (the command runs with it as the working directory).
        overrides: config id -> value, passed as ``--id value``.
        gpus: processes per node (one per GPU; CPU processes with gloo on a machine without CUDA).
        nnodes, node_rank, rdzv_endpoint: torchrun's multi-node settings.
        python: interpreter (default this one); ``python -m torch.distributed.run`` is ``torchrun``.
    """
    if gpus < 1 or nnodes < 1:
        raise ValueError(f"--gpus and --nnodes must be >= 1, got {gpus} and {nnodes}")
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError("--nnodes > 1 needs --rdzv_endpoint HOST:PORT (node 0's address and a free port)")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node_rank {node_rank} is not in [0, --nnodes={nnodes})")
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus)]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv_endpoint", str(rdzv_endpoint)]
    configs = [str(bundle / TRAIN_CONFIG), str(bundle / MULTI_GPU_CONFIG)]
    cmd += ["-m", "monai.bundle", "run", RUN_ID, "--config_file", repr(configs), "--meta_file",
            str(bundle / META_FILE), "--bundle_root", str(bundle)]
    for key, value in overrides.items():
        cmd += [f"--{key}", cli_value(value)]
    return cmd


def check_gpus(gpus: int) -> str:
    """What ``--gpus N`` runs on here: ``"cuda"``, or ``"cpu"`` (N gloo processes) on a machine without CUDA.

    Raises:
        ValueError: CUDA is there but shows fewer than ``gpus`` devices.
    """
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        logger.warning("--gpus %d: no CUDA device here; training with %d CPU processes (gloo)", gpus, gpus)
        return "cpu"
    if count < gpus:
        raise ValueError(f"--gpus {gpus}: only {count} CUDA device(s) visible (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); ask for at most {count}")
    return "cuda"


def run_training(
    task: str | int,
    fold: int = 0,
    overrides: dict[str, Any] | None = None,
    model: str | None = None,
    resume: bool = True,
    plan: str | None = None,
    tracking: str | None = None,
    gpus: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> Path:
    """Train one fold of a task's generated bundle with ``monai.bundle.run`` and return the fold folder.

    Args:
        task: task id or folder name under ``$det_data``.
        fold: fold index (overridden by ``fold`` / ``exp.fold`` in ``overrides``).
        overrides: config id -> value (strings from the CLI are parsed as JSON where they can be).
        model: model folder under ``$det_models/<task>`` (default: main plan's, e.g. RetinaUNetV001_D3V001_3d).
        resume: continue from ``fold<X>/model_last.pt`` when it exists (False starts over and replaces it).
        plan: plan id (e.g. ``D3V001CPU_3d``) whose bundle to train, instead of ``model``.
        tracking: ``monai.bundle`` experiment tracking (``"mlflow"``: MLflow handlers on trainer and validator).
        gpus: DDP processes per node; > 1 (or ``nnodes`` > 1) runs :func:`torchrun_command` (printed first).
        nnodes, node_rank, rdzv_endpoint: multi-node DDP (see ``docs/distributed.md``); every node runs the
            same call with its own ``node_rank``; only node 0 takes the fold's lock.

    Returns:
        ``<bundle>/fold<X>`` with model_last.pt, model_best.pt, train_log.json, training_curves.png.
    """
    from monai.bundle import run

    bundle = bundle_for(task, model, plan)
    if tracking == "mlflow":
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise ValueError("--tracking mlflow needs the mlflow package: pip install 'nndet-monai[tracking]'")
    ov = normalise_overrides(overrides)
    ov.setdefault("fold", int(fold))
    ov["resume"] = bool(ov.get("resume", resume))
    fold = int(ov["fold"])
    fold_dir = bundle / f"fold{fold}"
    last = fold_dir / "model_last.pt"
    check_override_ids(bundle / TRAIN_CONFIG, ov)
    state = fold_finished(last) if ov["resume"] else None
    if state is not None:
        logger.info("fold %d of %s is trained (%s, epoch %d); `--no_resume` (API: resume=False) trains it again",
                    fold, bundle.name, last, state.get("epoch", -1))
        return fold_dir
    # splits exist before the run starts (created once, deterministic), so a bad file fails early; the
    # bundle's own code is loaded here, and monai.bundle.run then imports that same `scripts` package
    fold_data = bundle_module(bundle, "trainer").fold_data
    fold_data(paths.resolve_task(task), bundle_plan(bundle).plan_id, fold, ov.get("data_root"), ov.get("splits_file"),
              int(ov.get("num_folds", 5)))
    extra = {"tracking": tracking} if tracking else {}
    logger.info("training %s fold %d (overrides %s)", bundle, fold, ov)
    distributed = int(gpus) > 1 or int(nnodes) > 1
    if distributed and tracking:
        raise ValueError("--tracking with --gpus/--nnodes is not supported: every process would log to the "
                         "tracker; train with one process, or read train_log.json / TensorBoard of rank 0")
    lock = (exclusive_lock(bundle / f".fold{fold}.train.lock", f"nndet_train of {bundle.name} fold {fold}")
            if int(node_rank) == 0 else contextlib.nullcontext())  # one lock per fold, not one per node
    with lock:
        if distributed:
            if not (bundle / MULTI_GPU_CONFIG).is_file():
                raise FileNotFoundError(f"{bundle / MULTI_GPU_CONFIG}: missing (bundle made before DDP support); "
                                        f"regenerate it: nndet_prep {task} -o overwrite=True")
            check_gpus(int(gpus))
            cmd = torchrun_command(bundle, ov, int(gpus), int(nnodes), int(node_rank), rdzv_endpoint)
            print("running:", shlex.join(cmd), flush=True)
            rc = subprocess.call(cmd, cwd=bundle, preexec_fn=lambda: paths.die_with_parent(signal.SIGTERM))
            if rc != 0:
                raise TorchrunFailed(f"torchrun exited with code {rc} training {bundle.name} fold {fold}; its output "
                                   "is above; a rerun resumes from model_last.pt")
        else:
            run(run_id=RUN_ID, config_file=str(bundle / TRAIN_CONFIG), meta_file=str(bundle / META_FILE),
                logging_file=False, bundle_root=str(bundle), **extra, **ov)
    return fold_dir


# ------------------------------------------------------------------------------------- folds as jobs
@dataclass
class FoldJob:
    """One fold trained as its own process by :func:`train_folds`."""

    fold: int
    command: list[str]
    devices: str | None = None  # CUDA_VISIBLE_DEVICES of the job; None: the CPU
    log_file: Path | None = None  # None: the job writes to this terminal
    returncode: int | None = None
    started: float = 0.0  # time.perf_counter() at start
    seconds: float = 0.0  # run time, once finished
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class FoldsFailed(RuntimeError):
    """Some folds failed (the others ran to the end); ``jobs`` holds every fold's outcome."""

    def __init__(self, jobs: list[FoldJob]):
        self.jobs = jobs
        bad = [j for j in jobs if not j.ok]
        where = "; ".join(f"fold {j.fold}: exit code {j.returncode}" + (f", log {j.log_file}" if j.log_file else "")
                          for j in bad)
        super().__init__(f"{len(bad)} of {len(jobs)} fold(s) failed ({where}); rerun the same command to resume "
                         "them (finished folds are kept)")


def device_slots(gpus_per_job: int = 1) -> list[str | None]:
    """Where fold jobs can run at the same time: groups of ``gpus_per_job`` visible GPUs, as
    ``CUDA_VISIBLE_DEVICES`` values (``CUDA_VISIBLE_DEVICES`` itself is honoured); ``[None]`` (one job at a
    time, on the CPU) without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return [None]
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [d.strip() for d in env.split(",") if d.strip()] if env else [str(i) for i in range(count)]
    ids = ids[:count]
    n = max(1, int(gpus_per_job))
    if len(ids) < n:
        raise ValueError(f"--gpus {n} per fold: only {len(ids)} CUDA device(s) visible")
    return [",".join(ids[i:i + n]) for i in range(0, len(ids) - n + 1, n)]


def fold_command(task: str | int, fold: int, overrides: dict[str, Any] | None = None, model: str | None = None,
                 plan: str | None = None, resume: bool = True, gpus: int = 1) -> list[str]:
    """``nndet_train`` of one fold as a command line (this interpreter)."""
    cmd = [sys.executable, "-c", "import sys; from workflow.cli import train_main; train_main(sys.argv[1:])",
           str(task), "--fold", str(int(fold))]
    for key, value in (overrides or {}).items():
        if ALIASES.get(key, key) != "fold":
            cmd += ["-o", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    if model:
        cmd += ["--model", model]
    if plan:
        cmd += ["--plan", plan]
    if not resume:
        cmd.append("--no_resume")
    if int(gpus) > 1:
        cmd += ["--gpus", str(int(gpus))]
    return cmd


def run_jobs(jobs: list[FoldJob], slots: list[str | None], poll_s: float = 0.5) -> list[FoldJob]:
    """Run ``jobs`` with at most one per slot at a time (each with its slot as ``CUDA_VISIBLE_DEVICES``; a
    ``None`` slot hides no device and the job runs on the CPU). A failing job does not stop the others. With
    more than one slot each job writes to its ``log_file``; with one it writes to this terminal.

    Returns:
        ``jobs`` with ``returncode``, ``seconds`` and ``devices`` set.
    """
    pending, running, free = list(jobs), [], list(slots)
    try:
        while pending or running:
            while pending and free:
                job = pending.pop(0)
                job.devices = free.pop(0)
                env = dict(os.environ)
                if job.devices is not None:
                    env["CUDA_VISIBLE_DEVICES"] = job.devices
                out = None
                if job.log_file is not None and len(slots) > 1:
                    job.log_file.parent.mkdir(parents=True, exist_ok=True)
                    out = open(job.log_file, "ab")
                else:
                    job.log_file = None
                where = "CPU" if job.devices is None else f"GPU {job.devices}"
                print(f"fold {job.fold}: started on {where}" + (f" (log {job.log_file})" if out else ""), flush=True)
                job.started = time.perf_counter()
                job.proc = subprocess.Popen(job.command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                            preexec_fn=paths.die_with_parent)
                if out is not None:
                    out.close()  # the child holds its own descriptor
                running.append(job)
            for job in list(running):
                rc = job.proc.poll()
                if rc is None:
                    continue
                job.returncode, job.seconds = rc, time.perf_counter() - job.started
                running.remove(job)
                free.append(job.devices)
                print(f"fold {job.fold}: {'done' if rc == 0 else f'FAILED (exit code {rc})'} after "
                      f"{job.seconds / 60:.1f} min", flush=True)
            if running:
                time.sleep(poll_s)
    finally:
        for job in running:  # interrupted (Ctrl-C): stop the folds still running; a rerun resumes them
            job.proc.terminate()
    return jobs


def fold_summary(bundle: Path, jobs: list[FoldJob]) -> str:
    """The table printed after :func:`train_folds`: per fold its device, outcome, epochs, best metric, time."""
    import torch

    rows = [("fold", "device", "status", "epoch", "best metric", "minutes")]
    for job in jobs:
        last, best = bundle / f"fold{job.fold}" / "model_last.pt", bundle / f"fold{job.fold}" / "model_best.pt"
        state = torch.load(last, map_location="cpu", weights_only=True) if last.is_file() else None  # finished or not
        metric = torch.load(best, map_location="cpu", weights_only=True).get("metric") if best.is_file() else None
        rows.append((str(job.fold), "cpu" if job.devices is None else f"gpu {job.devices}",
                     "ok" if job.ok else f"FAILED ({job.returncode})",
                     str(state.get("epoch", "-")) if state else "-",
                     f"{metric:.4f}" if isinstance(metric, float) else "-", f"{job.seconds / 60:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def train_folds(task: str | int, folds: Sequence[int], overrides: dict[str, Any] | None = None,
                model: str | None = None, plan: str | None = None, resume: bool = True, gpus: int = 1,
                slots: list[str | None] | None = None) -> list[FoldJob]:
    """`nndet_train TASK --folds 0 1 2 3 4`: every fold as its own ``nndet_train`` process, one per free GPU (or
    group of ``gpus`` GPUs for DDP folds), one after another on a machine without CUDA; prints the summary table.

    Args:
        folds: fold indices (each once).
        overrides, model, plan, resume: as for :func:`run_training`, for every fold.
        gpus: GPUs per fold (DDP inside a fold when > 1).
        slots: ``CUDA_VISIBLE_DEVICES`` values to schedule over (default :func:`device_slots`).

    Returns:
        one :class:`FoldJob` per fold.

    Raises:
        FoldsFailed: after every fold ran, when one or more failed (their exit codes and logs are named).
    """
    folds = list(dict.fromkeys(int(f) for f in folds))
    bundle = bundle_for(task, model, plan)
    check_override_ids(bundle / TRAIN_CONFIG, normalise_overrides(
        {k: v for k, v in (overrides or {}).items() if ALIASES.get(k, k) != "fold"}))
    slots = device_slots(gpus) if slots is None else slots
    jobs = [FoldJob(f, fold_command(task, f, overrides, model, plan, resume, gpus),
                    log_file=bundle / "logs" / f"fold{f}_train.log") for f in folds]
    logger.info("training folds %s of %s on %s", folds, bundle.name,
                "the CPU, one after another" if slots == [None] else f"{len(slots)} GPU slot(s) {slots}")
    run_jobs(jobs, slots)
    print(fold_summary(bundle, jobs), flush=True)
    if not all(j.ok for j in jobs):
        raise FoldsFailed(jobs)
    return jobs
