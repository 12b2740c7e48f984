"""`nndet_consolidate` as an API: one self-contained inference bundle from a task's trained folds.

``consolidate("000")`` writes ``$det_models/<task>/<model>/consolidated/``::

    configs/inference.json      folder prediction (scripts/predict.py): NIfTI in, <case>_boxes.json out
    configs/metadata.json       MONAI metadata (valid against meta_schema_20240725.json, checked offline)
    configs/train.json          the network definition (``network_def``) every fold is built from
    configs/preprocessing.json  the preprocessing nndet_prep applied offline (one definition)
    configs/plan.json, configs/logging.conf
    scripts/                    the bundle's code (importable as ``scripts`` under monai.bundle run)
    models/model_fold<X>.pt     network weights only: ``torch.save(state_dict)``, load with weights_only=True
    docs/README.md              how to run it

Run it with nothing but the installed package::

    cd consolidated && python -m monai.bundle run --config_file configs/inference.json \
        --meta_file configs/metadata.json --bundle_root . --input_dir <folder> --output_dir <folder>

The postprocessing parameters in ``inference.json`` (``postprocessing``) are ``workflow.sweep.ensemble_params``
over the folds (one fold's sweep, or a sweep over the union of the folds' raw validation predictions) with
``sweep_boxes``, nnDetection's defaults otherwise (or when the folds have no sweep predictions).

The operating point (``metadata.json`` -> ``nndet.operating_point``: the score threshold findings are reported
at, e.g. by the DICOM app) is chosen on the folds' out-of-fold validation predictions with that postprocessing
(``workflow.evaluate.validation_operating_point``): by default the lowest threshold with FPPI <= 1, or by
``fppi`` / ``min_sensitivity`` / ``threshold``.

Export to TorchScript / ONNX (measured with MONAI 1.6.1 / torch 2.13 on the cpu preset's network): MONAI's
``ckpt_export`` does not work for this model, so we ship state dicts and rebuild the network from
train.json. Scripting fails in ``UFPN.forward`` (a ``ModuleDict`` indexed by a computed key). Tracing
(``use_trace=True``) fails because ``RetinaUNet`` returns a dict of lists of tensors; a wrapper that
flattens the outputs into a tuple traces, with outputs equal to eager at the traced and at another valid
input size. The detector's postprocessing (anchors, decoding, NMS through ``ops``/numpy) cannot be
scripted or traced, so an export could cover the network only. ``onnx_export`` needs ``onnx`` /
``onnxscript``, which we do not depend on (not tried).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from planner import paths
from planner.bundle import TEMPLATE_DIR, verify_bundle
from planner.io import load_json, make_temp_dir, save_json
from planner.plan.plan import Plan
from workflow.bundle_code import bundle_module
from workflow.evaluate import validation_operating_point
from workflow.models import bundle_for, bundle_plan, trained_folds
from workflow.sweep import ensemble_params

logger = logging.getLogger(__name__)

CONSOLIDATED = "consolidated"
COPIED_CONFIGS = ("train.json", "preprocessing.json", "plan.json", "logging.conf")
INFERENCE_CONFIG = "configs/inference.json"
PREDICT_SCRIPT = "scripts/predict.py"
# fold validation metrics (fold<X>/val_results/results_boxes.json) averaged into metadata eval_metrics
METRIC_KEYS = ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "AP_IoU_0.50_MaxDet_100",
               "FROC_score_IoU_0.10", "AR_IoU_0.10_MaxDet_100")
# the consolidated inference.json's run-time settings (each a command-line override of monai.bundle run)
RUNTIME_DEFAULTS = {
    "bundle_root": ".",
    "input_dir": None,
    "output_dir": "$@bundle_root + '/predictions'",
    "num_tta": None,
    "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
    "amp": True,
    "overlap": 0.5,
    "grid": "nndetection",
    "overwrite": False,
    "masks": False,
}
# the consolidated inference.json's "run": predict a folder of cases with "@predictor" (also the ensemble's)
RUN_SECTION = {
    "_target_": "scripts.predict.predict_folder",
    "cases": "@cases",
    "output_dir": "@output_dir",
    "predictor": "@predictor",
    "overwrite": "@overwrite",
    "task": "@task",
    "model": "@model",
    "folds": "@folds",
}


def _select_folds(bundle: Path, num_folds: int | None, folds: Sequence[int] | None = None) -> list[int]:
    trained = trained_folds(bundle)
    if folds is not None:
        missing = [f for f in folds if f not in trained]
        if missing:
            raise FileNotFoundError(f"{bundle}: fold(s) {missing} are not trained (finished model_last.pt); "
                                    f"trained: {trained}")
        return sorted(int(f) for f in folds)
    if num_folds is None:
        if not trained:
            raise FileNotFoundError(f"{bundle}: no trained fold (fold<X>/model_last.pt with finished training); "
                                    "run `nndet_train` first")
        return trained
    wanted = list(range(int(num_folds)))
    missing = [f for f in wanted if f not in trained]
    if missing:
        raise FileNotFoundError(f"{bundle}: fold(s) {missing} of --num_folds {num_folds} are not trained (finished "
                                f"model_last.pt); trained: {trained}. Train them or pass a smaller --num_folds")
    return wanted


def _postprocessing(bundle: Path, folds: Sequence[int], sweep_boxes: bool) -> tuple[dict[str, Any], str]:
    """(every postprocessing parameter, where they come from)."""
    params = ensemble_params(bundle, folds) if sweep_boxes else None
    if params is not None:
        source = (f"sweep of fold {folds[0]} (fold{folds[0]}/sweep/params.json)" if len(folds) == 1 else
                  f"sweep over the raw validation predictions of folds {list(folds)} (consolidated_sweep/params.json)")
    else:
        source = "nnDetection's defaults (" + ("folds not swept" if sweep_boxes else "--no_sweep_boxes") + ")"
    return bundle_module(bundle, "inference").check_params(params), source


def fold_metrics(bundle: Path, folds: Sequence[int]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean over folds of each ``METRIC_KEYS`` entry every evaluated fold has, per-fold values) from
    ``fold<X>/val_results/results_boxes.json`` (``nndet_eval``); empty when no fold was evaluated."""
    per_fold = {}
    for f in folds:
        res = bundle / f"fold{f}" / "val_results" / "results_boxes.json"
        if res.is_file():
            per_fold[str(f)] = {k: float(v) for k, v in load_json(res).items() if k in METRIC_KEYS}
    keys = [k for k in METRIC_KEYS if per_fold and all(k in m for m in per_fold.values())]
    mean = {k: sum(m[k] for m in per_fold.values()) / len(per_fold) for k in keys}
    return mean, per_fold


def inference_config(plan: Plan, model: str, folds: Sequence[int], params: dict[str, Any],
                     source: str) -> dict[str, Any]:
    """The consolidated ``configs/inference.json`` (see ``scripts/predict.py`` for the steps)."""
    return {
        "_doc_": "Folder prediction with the ensemble of all consolidated folds x mirror TTA. Run (in this folder): "
                 "python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json "
                 "--bundle_root . --input_dir <folder of <case>_XXXX.nii.gz> --output_dir <folder> [--num_tta 1] "
                 "[--device cpu] [--overwrite True] [--masks True] [--postprocessing#ensemble_iou 0.4]. Writes "
                 "<case>_boxes.json per case (boxes in original voxels and world mm); --masks True adds a mask per "
                 "finding from the segmentation head (<case>_masks.npz).",
        **RUNTIME_DEFAULTS,
        "task": plan.task,
        "model": model,
        "classes": dict(plan.labels),
        "modalities": dict(plan.modalities),
        "num_modalities": len(plan.modalities),
        "patch_size": list(plan.patch_size),
        "batch_size": int(plan.batch_size),
        "folds": [int(f) for f in folds],
        "model_files": [f"models/model_fold{f}.pt" for f in folds],
        "postprocessing_source": source,
        "postprocessing": dict(params),
        "network_config": "$@bundle_root + '/configs/train.json'",
        "network_id": "network_def",
        "cases": {
            "_target_": "scripts.predict.find_cases",
            "input_dir": "@input_dir",
            "num_modalities": "@num_modalities",
            "modalities": "@modalities",
        },
        "detectors": {
            "_target_": "scripts.predict.load_detectors",
            "network_config": "@network_config",
            "model_files": "@model_files",
            "bundle_root": "@bundle_root",
            "network_id": "@network_id",
            "device": "@device",
        },
        "preprocessing_chain": {
            "_target_": "planner.preprocess.run.load_preprocessing",
            "bundle_dir": "@bundle_root",
        },
        "predictor": {
            "_target_": "scripts.predict.Predictor",
            "detectors": "@detectors",
            "preprocessing": "@preprocessing_chain",
            "patch_size": "@patch_size",
            "batch_size": "@batch_size",
            "num_tta": "@num_tta",
            "params": "@postprocessing",
            "device": "@device",
            "amp": "@amp",
            "overlap": "@overlap",
            "grid": "@grid",
            "classes": "@classes",
            "masks": "@masks",
        },
        "run": dict(RUN_SECTION),
    }


def consolidated_metadata(meta: dict[str, Any], plan: Plan, folds: Sequence[int], source: str,
                          metrics: dict[str, float], per_fold: dict[str, dict[str, float]],
                          with_models: bool, operating_point: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundle's metadata.json turned into the consolidated bundle's (a new dict); ``operating_point``
    (:func:`workflow.evaluate.validation_operating_point`) goes to ``nndet.operating_point``."""
    meta = json.loads(json.dumps(meta))
    version = str(meta.get("version", "0.1.0"))
    note = f"consolidated by nndet_consolidate from folds {list(folds)}; postprocessing: {source}"
    changelog = dict(meta.get("changelog", {}))
    changelog[version] = "; ".join(t for t in (changelog.get(version, ""), note) if t)
    meta["changelog"] = changelog
    meta["task"] = (f"{plan.dim}D medical object detection (boxes, scores, class labels) for {plan.task}: "
                    f"ensemble of {len(folds)} fold(s) on whole NIfTI cases")
    meta["description"] = (
        f"{meta.get('description', '')} Consolidated inference bundle: configs/inference.json reads "
        f"<case>_XXXX.nii.gz ({len(plan.modalities)} modality file(s) per case), applies configs/preprocessing.json, "
        f"runs the folds {list(folds)} (network definition configs/train.json#network_def, weights "
        "models/model_fold<X>.pt) with mirror TTA and sliding windows, ensembles them with weighted box "
        "clustering and writes boxes in original voxels and world millimetres.").strip()
    meta["eval_metrics"] = dict(metrics)
    nfmt = meta["network_data_format"]
    nfmt["inputs"]["image"].update(num_channels=len(plan.modalities), channel_def=dict(plan.modalities))
    world = {"0": "min_x", "1": "min_y", "2": "min_z", "3": "max_x", "4": "max_y", "5": "max_z"}
    nfmt["post_processed_outputs"] = {
        "boxes": {**nfmt["outputs"]["boxes"], "dtype": "float64", "format": f"{nfmt['outputs']['boxes']['format']}, "
                  "half-open voxel indices of the original image (raw NIfTI axes)"},
        "boxes_world_mm": {"type": "tensor", "format": "RAS+ millimetres (NIfTI affine), axis-aligned over voxel edges",
                           "num_channels": 6, "spatial_shape": ["N"], "dtype": "float64", "value_range": [],
                           "is_patch_data": False, "channel_def": world},
        "scores": dict(nfmt["outputs"]["scores"]),
        "labels": dict(nfmt["outputs"]["labels"]),
    }
    meta.setdefault("nndet", {}).update({
        "consolidated": True, "folds": [int(f) for f in folds],
        "model_files": [f"models/model_fold{f}.pt" for f in folds] if with_models else [],
        "postprocessing": "configs/inference.json#postprocessing", "postprocessing_source": source,
        "num_tta_default": 8 if plan.dim == 3 else 4,
        "validation": {"per_fold": per_fold, "note": "fold validation cases with each fold's own swept parameters "
                       "(nndet_eval, preprocessed voxels); eval_metrics is their mean over folds"},
    })
    meta["nndet"].pop("operating_point", None)
    if operating_point is not None:
        meta["nndet"]["operating_point"] = dict(operating_point)
    return meta


def readme_text(plan: Plan, model: str, folds: Sequence[int], source: str, with_models: bool,
                operating_point: dict[str, Any] | None = None) -> str:
    """docs/README.md of the consolidated bundle."""
    op = operating_point
    op_line = (f"Operating point (`metadata.json` -> `nndet.operating_point`): score >= {op['threshold']:.4f} "
               f"({op['rule']} on {op['num_cases']} validation case(s): sensitivity {op['sensitivity']:.3f}, "
               f"FPPI {op['fppi']:.3f}, precision {op['precision']:.3f})." if op else
               "No operating point was recorded (no validation predictions when consolidating).")
    mods = ", ".join(f"`<case>_{int(k):04d}.nii.gz` = {v}" for k, v in sorted(plan.modalities.items(), key=lambda x: int(x[0])))
    labels = ", ".join(f"{k}: {v}" for k, v in sorted(plan.labels.items(), key=lambda x: int(x[0])))
    weights = "" if with_models else (
        "\n**This copy was made with `--no_model`: `models/` is empty.** Put the fold weights there "
        "(`models/model_fold<X>.pt`, state dicts) or consolidate again without `--no_model`.\n")
    return f"""# {model} (consolidated) for {plan.task}

Inference bundle with the ensemble of folds {list(folds)} of `{model}` (Retina U-Net, nnDetection's recipe on
MONAI), made by `nndet_consolidate`. Research use only; not a medical device.
{weights}
## Run

Needs the installed `nndet-monai` package (its transforms and box ops) and nothing else:

```bash
cd consolidated
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --input_dir /path/to/images --output_dir /path/to/predictions
```

Options (any id of `configs/inference.json`): `--num_tta 1` (mirror TTA per fold: 1, 4 or 8 in 3D; default
{8 if plan.dim == 3 else 4}), `--device cpu`, `--batch_size 2`, `--overwrite True` (recompute existing outputs),
`--postprocessing#ensemble_iou 0.4` (one postprocessing parameter).

## Input

One NIfTI file per modality and case, nnU-Net naming: {mods}. Every case must have all files; a missing
one stops the run before anything is written, naming the file.

## Output

`<output_dir>/<case>_boxes.json` per case (written atomically): `boxes` (MONAI StandardMode
`[x1, y1, z1, x2, y2, z2]`, half-open voxel indices of the original image), `boxes_world_mm` (axis-aligned
RAS+ millimetres through the NIfTI affine, over voxel edges), `scores` (descending), `labels` (class
index; {labels}), `class_names`, and the `params` used.

## What runs

| file | role |
|------|------|
| `configs/inference.json` | the workflow: find cases, build the networks, preprocess, predict, write |
| `configs/preprocessing.json` | the preprocessing `nndet_prep` applied to the training data (same definition) |
| `configs/train.json` | the network definition (`network_def`) each fold is built from |
| `models/model_fold<X>.pt` | network weights only (`torch.load(..., weights_only=True)`) |
| `scripts/predict.py` | the folder glue; `scripts/inference.py`: sliding window, TTA, NMS, WBC |

Postprocessing parameters (`postprocessing` in `configs/inference.json`): {source}.

{op_line} The folder prediction writes every box; the threshold is for reporting.

TorchScript/ONNX export (`monai.bundle ckpt_export` / `onnx_export`) is not supported for this network;
the weights are shipped as state dicts and the network is rebuilt from `configs/train.json`.
"""


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _write_models(bundle: Path, folds: Sequence[int], models_dir: Path) -> None:
    import torch

    models_dir.mkdir(parents=True, exist_ok=True)
    for f in folds:
        state = torch.load(bundle / f"fold{f}" / "model_last.pt", map_location="cpu", weights_only=True)
        torch.save(state["network"], models_dir / f"model_fold{f}.pt")


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, trash)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(trash, out)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def consolidate(task: str | int, model: str | None = None, plan: str | None = None, num_folds: int | None = None,
                sweep_boxes: bool = True, no_model: bool = False, overwrite: bool = False,
                folds: Sequence[int] | None = None, fppi: float | None = None,
                min_sensitivity: float | None = None, threshold: float | None = None) -> Path:
    """Write ``<bundle>/consolidated/`` (see module docstring) and return it.

    Args:
        task: task id or folder name under ``$det_data``.
        model: model folder under ``$det_models/<task>`` (default: the main plan's); plan: plan id instead.
        num_folds: consolidate folds ``0..num_folds-1`` (all must be trained); default every trained fold.
        sweep_boxes: postprocessing from the folds' sweeps (``workflow.sweep.ensemble_params``); else defaults.
        no_model: leave ``models/`` empty (configs, scripts and docs only).
        overwrite: replace an existing ``consolidated/``.
        folds: exactly these folds (instead of ``num_folds``; all must be trained).
        fppi, min_sensitivity, threshold: the operating-point rule (at most one; default FPPI <= 1), see
            :func:`workflow.evaluate.validation_operating_point`.

    Raises:
        FileExistsError: ``consolidated/`` exists and ``overwrite`` is False.
        FileNotFoundError: no trained fold, or folds of ``num_folds`` are not trained, or a rule was given and
            the folds have no validation predictions.
        ValueError: no threshold satisfies the given rule.
        BundleError: the result does not verify (nothing is left behind).
    """
    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    out = bundle / CONSOLIDATED
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (nndet_consolidate ... --overwrite) to replace it")
    folds = _select_folds(bundle, num_folds, folds)
    p = bundle_plan(bundle)
    params, source = _postprocessing(bundle, folds, sweep_boxes)
    metrics, per_fold = fold_metrics(bundle, folds)
    op = validation_operating_point(bundle, folds, params, fppi=fppi, min_sensitivity=min_sensitivity,
                                    threshold=threshold)
    tmp = make_temp_dir(prefix=f".{CONSOLIDATED}.", suffix=".tmp", dir=bundle)
    try:
        (tmp / "configs").mkdir()
        for name in COPIED_CONFIGS:
            if (bundle / "configs" / name).is_file():
                shutil.copy2(bundle / "configs" / name, tmp / "configs" / name)
        _copy_tree(bundle / "scripts", tmp / "scripts")
        if not (tmp / PREDICT_SCRIPT).is_file():
            logger.warning("%s has no %s (generated by an older version): using the template's", bundle, PREDICT_SCRIPT)
            shutil.copy2(TEMPLATE_DIR / PREDICT_SCRIPT, tmp / PREDICT_SCRIPT)
        meta = consolidated_metadata(load_json(bundle / "configs" / "metadata.json"), p, folds, source,
                                     metrics, per_fold, with_models=not no_model, operating_point=op)
        save_json(meta, tmp / "configs" / "metadata.json", indent=4)
        save_json(inference_config(p, bundle.name, folds, params, source), tmp / INFERENCE_CONFIG, indent=4)
        (tmp / "docs").mkdir()
        (tmp / "docs" / "README.md").write_text(readme_text(p, bundle.name, folds, source, not no_model, op))
        if no_model:
            (tmp / "models").mkdir()
        else:
            _write_models(bundle, folds, tmp / "models")
        verify_bundle(tmp)
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("consolidated %d fold(s) %s of %s into %s (postprocessing: %s)", len(folds), folds, bundle.name,
                out, source)
    if op is not None:
        logger.info("operating point (%s on %d validation case(s)): score >= %.4f, sensitivity %.3f, FPPI %.3f, "
                    "precision %.3f", op["rule"], op["num_cases"], op["threshold"], op["sensitivity"], op["fppi"],
                    op["precision"])
    return out
