"""`nndet_train` as an API: run a generated bundle's ``configs/train.json`` for one fold.

``run_training("000", fold=0, overrides={"epochs": 3})`` is the same as, inside the bundle folder::

    python -m monai.bundle run training --config_file configs/train.json --meta_file configs/metadata.json \
        --bundle_root . --fold 0 --epochs 3

Override keys are the config ids of ``train.json`` (``epochs``, ``swa_epochs``, ``iterations``, ``warmup``,
``lr``, ``batch_size``, ``num_workers``, ``amp``, ``seed``, ...); nnDetection's ``exp.fold`` is accepted
as ``fold``. A rerun resumes from ``fold<X>/model_last.pt``; a finished fold is not trained again.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from planner import paths
from planner.plan.plan import Plan

logger = logging.getLogger(__name__)

TRAIN_CONFIG = "configs/train.json"
META_FILE = "configs/metadata.json"
RUN_ID = "training"
ALIASES = {"exp.fold": "fold", "exp_fold": "fold", "train.fold": "fold"}


def task_plans(task_name: str) -> list[Plan]:
    """All plans of a task (``$det_data/<task>/preprocessed/plans/*.json``)."""
    pdir = paths.det_data() / task_name / "preprocessed" / "plans"
    plans = [Plan.from_json(p) for p in sorted(pdir.glob("*.json"))] if pdir.is_dir() else []
    if not plans:
        raise FileNotFoundError(f"{pdir}: no plans; run `nndet_prep {task_name}` first")
    return plans


def main_plan(task_name: str, plan_id: str | None = None) -> Plan:
    """The plan to train: ``plan_id`` if given, else the full-resolution 3D (``3d``) or the 2D plan, the
    default preset's before the ``cpu`` preset's when both exist."""
    plans = task_plans(task_name)
    if plan_id is not None:
        match = [p for p in plans if p.plan_id == plan_id]
        if not match:
            raise FileNotFoundError(
                f"task {task_name} has no plan {plan_id!r}; planned: {[p.plan_id for p in plans]} "
                f"(`nndet_prep {task_name} --preset cpu` makes the D3V001CPU_* plans)"
            )
        return match[0]
    main = sorted((p for p in plans if p.mode in ("3d", "2d")), key=lambda p: (p.planner_id.endswith("CPU"), p.plan_id))
    chosen = (main or plans)[0]
    if len(main) > 1:
        logger.info("training plan %s (also planned: %s; choose with --plan)", chosen.plan_id,
                    [p.plan_id for p in main[1:]])
    return chosen


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


def _fresh_scripts_import(bundle_dir: Path) -> None:
    """Drop a ``scripts`` package imported from another bundle so this bundle's own scripts are used."""
    mod = sys.modules.get("scripts")
    origin = Path(getattr(mod, "__file__", "") or "").resolve() if mod is not None else None
    if mod is not None and (origin is None or bundle_dir.resolve() not in origin.parents):
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]


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


def fold_finished(last: Path) -> dict[str, Any] | None:
    """The state of ``fold<X>/model_last.pt`` if that training ran to its end, else None."""
    if not last.is_file():
        return None
    import torch

    state = torch.load(last, map_location="cpu", weights_only=True)
    return state if state.get("finished") else None


def bundle_for(task: str | int, model: str | None = None, plan: str | None = None) -> Path:
    """The generated bundle folder ``$det_models/<task>/<model>`` (default: the main plan's, or ``plan``'s)."""
    task_name = paths.resolve_task(task)
    model = model or main_plan(task_name, plan).model_name
    bundle = paths.det_models() / task_name / model
    if not (bundle / TRAIN_CONFIG).is_file():
        raise FileNotFoundError(
            f"{bundle / TRAIN_CONFIG}: missing. Generate the bundle with `nndet_prep {task_name}` "
            "(or `nndet_prep {task_name} -o overwrite=True` if it was generated by an older version)."
        )
    return bundle


def run_training(
    task: str | int,
    fold: int = 0,
    overrides: dict[str, Any] | None = None,
    model: str | None = None,
    resume: bool = True,
    plan: str | None = None,
    tracking: str | None = None,
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
    # splits exist before the run starts (created once, deterministic), so a bad file fails early
    from bundles.retinaunet_template.scripts.trainer import fold_data

    bundle_plan = Plan.from_json(bundle / "configs" / "plan.json")
    fold_data(paths.resolve_task(task), bundle_plan.plan_id, fold, ov.get("data_root"), ov.get("splits_file"),
              int(ov.get("num_folds", 5)))
    _fresh_scripts_import(bundle)
    logger.info("training %s fold %d (overrides %s)", bundle, fold, ov)
    extra = {"tracking": tracking} if tracking else {}
    run(run_id=RUN_ID, config_file=str(bundle / TRAIN_CONFIG), meta_file=str(bundle / META_FILE),
        logging_file=False, bundle_root=str(bundle), **extra, **ov)
    return fold_dir
