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
    # splits exist before the run starts (created once, deterministic), so a bad file fails early; the
    # bundle's own code is loaded here, and monai.bundle.run then imports that same `scripts` package
    fold_data = bundle_module(bundle, "trainer").fold_data
    fold_data(paths.resolve_task(task), bundle_plan(bundle).plan_id, fold, ov.get("data_root"), ov.get("splits_file"),
              int(ov.get("num_folds", 5)))
    logger.info("training %s fold %d (overrides %s)", bundle, fold, ov)
    extra = {"tracking": tracking} if tracking else {}
    with exclusive_lock(bundle / f".fold{fold}.train.lock", f"nndet_train of {bundle.name} fold {fold}"):
        run(run_id=RUN_ID, config_file=str(bundle / TRAIN_CONFIG), meta_file=str(bundle / META_FILE),
            logging_file=False, bundle_root=str(bundle), **extra, **ov)
    return fold_dir
