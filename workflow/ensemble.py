"""The ensemble of a task's plans as one consolidated bundle, and the out-of-fold predictions it is chosen on.

``nndet_find_best`` scores each plan and their ensemble on the folds' out-of-fold validation predictions in
the original voxels (:func:`oof_predictions`, :func:`ensemble_oof`). When the ensemble wins (or on request,
``nndet_consolidate TASK --plans A B``), :func:`consolidate_ensemble` writes
``$det_models/<task>/Ensemble_<planA>+<planB>/consolidated/``::

    configs/inference.json      predictor = scripts.predict.EnsemblePredictor over the members
    configs/metadata.json       MONAI metadata; nndet.ensemble (members, ensembling), the ensemble's
                                out-of-fold metrics and operating point
    configs/plan.json           the first member's plan (classes, dimension: the same in every member)
    scripts/                    the bundle code (the members' code is checked to be the same)
    members/<model>/            each plan's consolidated bundle without its code: configs/ (its own
                                preprocessing.json, network definition, swept postprocessing) + models/
    docs/README.md

It runs like any consolidated bundle (``python -m monai.bundle run ... --input_dir IN --output_dir OUT``, the
DICOM app's ``-m``): every member predicts the image through its own preprocessing, the boxes are restored to
the original voxels and clustered there by weighted box clustering (IoU 0.5, one expected vote per member),
which is what the out-of-fold comparison scored.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from planner import paths
from planner.bundle import verify_bundle
from planner.io import load_json, make_temp_dir, save_json
from workflow.bundle_code import bundle_module
from workflow.consolidate import RUN_SECTION, RUNTIME_DEFAULTS
from workflow.models import bundle_for, bundle_plan, class_names, consolidated_folds
from workflow.sweep import RAW_SUFFIX, as_dict, fold_params, gt_preprocessed, val_cases

logger = logging.getLogger(__name__)

ENSEMBLE_PREFIX = "Ensemble_"
MEMBERS = "members"
ENSEMBLE_IOU = 0.5  # nnDetection's ensembling IoU; scripts.predict.ENSEMBLE_IOU runs it


def ensemble_name(plans: Sequence[str]) -> str:
    """Folder name of the plans' ensemble under ``$det_models/<task>``."""
    return ENSEMBLE_PREFIX + "+".join(plans)


def oof_predictions(bundle: Path, folds: Sequence[int]) -> dict[str, tuple[dict, dict]]:
    """case id -> (prediction, ground truth), both in original voxels, of the folds' validation cases (each case
    by the fold that did not train on it, with that fold's swept postprocessing).

    Raises:
        FileNotFoundError: a fold lacks its sweep (raw predictions and swept parameters).
    """
    p = bundle_plan(bundle)
    inference = bundle_module(bundle, "inference")
    out = {}
    for fold in folds:
        params = fold_params(bundle, fold)
        raw_dir = bundle / f"fold{fold}" / "sweep_predictions"
        if params is None or not raw_dir.is_dir():
            raise FileNotFoundError(f"{bundle.name} fold {fold}: not swept; run `nndet_sweep {p.task} {bundle.name} "
                                    f"{fold}` (or `nndet run {p.task} --plan {p.plan_id}`)")
        images, cases = val_cases(bundle, p.task, p, fold)
        for case in cases:
            raw = inference.load_raw_predictions(raw_dir / f"{case}{RAW_SUFFIX}")
            pred = as_dict(inference.postprocess_members(raw.members, raw.shape, params))
            props = load_json(images / f"{case}.json")
            gt = gt_preprocessed(images, case, p.dim)
            pred["boxes"] = inference.restore_boxes(pred["boxes"], props)
            gt = {**gt, "boxes": inference.restore_boxes(gt["boxes"], props)}
            out[case] = (pred, gt)
    return out


def ensemble_oof(bundle: Path, per_plan: Sequence[dict]) -> dict:
    """The plans' predictions of one case (original voxels) clustered as the ensemble bundle does."""
    inference = bundle_module(bundle, "inference")
    members = [inference.Detections(p["boxes"], p["scores"], p["labels"]) for p in per_plan]
    return as_dict(inference.ensemble_members(members, ensemble_iou=ENSEMBLE_IOU))


def plan_bundles(task_name: str, plans: Sequence[str]) -> dict[str, Path]:
    """plan id -> its generated bundle, for two or more distinct plans."""
    if len(plans) < 2 or len(set(plans)) != len(plans):
        raise ValueError(f"an ensemble needs two or more distinct plans, got {list(plans)}")
    return {pid: bundle_for(task_name, plan=pid) for pid in plans}


def _code_digest(scripts: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(scripts.rglob("*.py")):
        h.update(str(f.relative_to(scripts)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def ensemble_oof_metrics(task_name: str, plans: Sequence[str], folds: Sequence[int]) -> tuple[list, list, Path]:
    """(ensemble predictions, ground truth, the first plan's bundle) of the folds' out-of-fold cases."""
    bundles = plan_bundles(task_name, plans)
    oof = {pid: oof_predictions(b, folds) for pid, b in bundles.items()}
    cases = sorted(set.intersection(*(set(o) for o in oof.values())))
    ref = bundles[plans[0]]
    preds = [ensemble_oof(ref, [oof[pid][c][0] for pid in plans]) for c in cases]
    return preds, [oof[plans[0]][c][1] for c in cases], ref


def inference_config(plan: Any, name: str, members: Sequence[str], folds: Sequence[int]) -> dict[str, Any]:
    """The ensemble's ``configs/inference.json`` (same top-level ids as a single plan's consolidated bundle)."""
    return {
        "_doc_": "Folder prediction with the ensemble of several plans (members/<model>, each its own preprocessing, "
                 "folds x mirror TTA and postprocessing), clustered in the original voxels by weighted box "
                 "clustering. Run (in this folder): python -m monai.bundle run --config_file configs/inference.json "
                 "--meta_file configs/metadata.json --bundle_root . --input_dir <folder of <case>_XXXX.nii.gz> "
                 "--output_dir <folder> [--num_tta 1] [--device cpu] [--overwrite True] [--masks True] "
                 "[--ensemble_iou 0.4]. Writes <case>_boxes.json per case; --masks True adds a mask per finding "
                 "from the first member's segmentation head.",
        **RUNTIME_DEFAULTS,
        "ensemble_iou": ENSEMBLE_IOU,
        "task": plan.task,
        "model": name,
        "classes": dict(plan.labels),
        "modalities": dict(plan.modalities),
        "num_modalities": len(plan.modalities),
        "folds": [int(f) for f in folds],
        "members": [f"{MEMBERS}/{m}" for m in members],
        "member_names": list(members),
        "cases": {
            "_target_": "scripts.predict.find_cases",
            "input_dir": "@input_dir",
            "num_modalities": "@num_modalities",
            "modalities": "@modalities",
        },
        "member_predictors": {
            "_target_": "scripts.predict.load_member_predictors",
            "bundle_root": "@bundle_root",
            "members": "@members",
            "device": "@device",
            "num_tta": "@num_tta",
            "amp": "@amp",
            "overlap": "@overlap",
            "grid": "@grid",
            "masks": "@masks",
        },
        "predictor": {
            "_target_": "scripts.predict.EnsemblePredictor",
            "members": "@member_predictors",
            "names": "@member_names",
            "ensemble_iou": "@ensemble_iou",
            "classes": "@classes",
            "masks": "@masks",
        },
        "run": dict(RUN_SECTION),
    }


def ensemble_metadata(meta: dict[str, Any], plan: Any, members: Sequence[str], folds: Sequence[int],
                      metrics: dict[str, float], operating_point: dict | None, selection: str) -> dict[str, Any]:
    """The first member's consolidated metadata turned into the ensemble's (a new dict)."""
    import json

    meta = json.loads(json.dumps(meta))
    version = str(meta.get("version", "0.1.0"))
    note = f"plan ensemble of {list(members)} (folds {list(folds)}) by nndet_consolidate --plans"
    meta["changelog"] = {**dict(meta.get("changelog", {})), version: note}
    meta["task"] = (f"{plan.dim}D medical object detection (boxes, scores, class labels) for {plan.task}: "
                    f"ensemble of {len(members)} plans x {len(folds)} fold(s) on whole NIfTI cases")
    meta["description"] = (
        f"Consolidated plan ensemble: configs/inference.json reads <case>_XXXX.nii.gz ({len(plan.modalities)} "
        f"modality file(s) per case); each member bundle ({', '.join(members)}) applies its own "
        "configs/preprocessing.json and runs its folds with mirror TTA and sliding windows; the members' boxes are "
        "restored to the original voxels and merged by weighted box clustering. Boxes are written in original "
        "voxels and world millimetres.")
    meta["eval_metrics"] = {k: float(v) for k, v in metrics.items()}
    files = [f"{MEMBERS}/{m}/models/model_fold{f}.pt" for m in members for f in folds]
    nd = meta.setdefault("nndet", {})
    nd.update({"consolidated": True, "folds": [int(f) for f in folds], "model_files": files,
               "postprocessing": [f"{MEMBERS}/{m}/configs/inference.json#postprocessing" for m in members],
               "ensemble": {"members": list(members), "ensemble_iou": ENSEMBLE_IOU, "selection": selection},
               "validation": {"note": "out-of-fold validation cases of the folds, each plan with its folds' own "
                              "swept parameters, clustered in original voxels (nndet_find_best); eval_metrics are "
                              "the ensemble's"}})
    nd.pop("postprocessing_source", None)
    nd.pop("operating_point", None)
    if operating_point is not None:
        nd["operating_point"] = dict(operating_point)
    return meta


def readme_text(plan: Any, name: str, members: Sequence[str], folds: Sequence[int], metrics: dict[str, float],
                operating_point: dict | None) -> str:
    """docs/README.md of the ensemble bundle."""
    op = operating_point
    op_line = (f"Operating point (`metadata.json` -> `nndet.operating_point`): score >= {op['threshold']:.4f} "
               f"({op['rule']} on {op['num_cases']} out-of-fold case(s): sensitivity {op['sensitivity']:.3f}, "
               f"FPPI {op['fppi']:.3f})." if op else "No operating point was recorded.")
    rows = "\n".join(f"| `{k}` | {v:.4f} |" for k, v in metrics.items())
    return f"""# {name} (consolidated plan ensemble) for {plan.task}

The ensemble of {len(members)} plans ({', '.join(f'`{m}`' for m in members)}), folds {list(folds)} each, made by
`nndet_consolidate --plans` (or `nndet_find_best` when the ensemble scored best). Research use only; not a
medical device.

## Run

```bash
cd consolidated
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --input_dir /path/to/images --output_dir /path/to/predictions
```

Options: `--num_tta 1`, `--device cpu`, `--overwrite True`, `--masks True` (a mask per finding from the first
member's segmentation head), `--ensemble_iou 0.4`. The DICOM app and node take this folder as `-m` like any
consolidated bundle.

## What runs

Each member (`members/<model>/`: its own `configs/preprocessing.json`, network definition, weights and swept
postprocessing) predicts the image; the boxes are restored to the original voxels and clustered by weighted
box clustering (IoU {ENSEMBLE_IOU}, one expected vote per member), as `nndet_find_best` scored it.

## Out-of-fold validation of the ensemble

| metric | value |
|---|---|
{rows}

{op_line}
"""


def consolidate_ensemble(task: str | int, plans: Sequence[str], folds: Sequence[int], overwrite: bool = False,
                         fppi: float | None = None, min_sensitivity: float | None = None,
                         threshold: float | None = None, selection: str = "nndet_consolidate --plans") -> Path:
    """Write ``$det_models/<task>/Ensemble_<plans>/consolidated/`` (module docstring) and return it.

    Each plan is consolidated first with these folds when it is not already (``workflow.consolidate``). The
    metrics and operating point (default rule FPPI <= 1, or ``fppi`` / ``min_sensitivity`` / ``threshold``) are
    the ensemble's, on the folds' out-of-fold validation cases.

    Raises:
        ValueError: fewer than two distinct plans, or plans of different dimensions or classes.
        FileExistsError: the ensemble bundle exists, or a plan's consolidated bundle holds other folds, and
            ``overwrite`` is False.
        FileNotFoundError: a fold is not trained or not swept.
        RuntimeError: the members' bundle code differs (regenerate them with one version).
    """
    from workflow.consolidate import METRIC_KEYS, _replace, consolidate
    from workflow.evaluate import choose_operating_point, operating_points_module

    task_name = paths.resolve_task(task)
    folds = sorted(int(f) for f in folds)
    plans = list(plans)
    bundles = plan_bundles(task_name, plans)
    plan_objs = {pid: bundle_plan(b) for pid, b in bundles.items()}
    ref = plan_objs[plans[0]]
    for pid, p in plan_objs.items():
        if p.dim != ref.dim or dict(p.labels) != dict(ref.labels) or dict(p.modalities) != dict(ref.modalities):
            raise ValueError(f"plan {pid} predicts other classes/modalities/dimension than {plans[0]}; an ensemble "
                             "needs plans of one task")
    name = ensemble_name(plans)
    root = paths.det_models() / task_name / name
    out = root / "consolidated"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    members = {}
    for pid, b in bundles.items():
        have = consolidated_folds(b)
        if have != folds:
            consolidate(task_name, plan=pid, folds=folds, overwrite=overwrite)
        members[pid] = b / "consolidated"
    digests = {pid: _code_digest(m / "scripts") for pid, m in members.items()}
    if len(set(digests.values())) > 1:
        raise RuntimeError(f"the plans' bundle code differs ({sorted(digests)}): regenerate them with one version "
                           f"(`nndet_prep {task_name} -o overwrite=True`) and consolidate again")
    preds, gts, ref_bundle = ensemble_oof_metrics(task_name, plans, folds)
    evaluation = bundle_module(ref_bundle, "evaluation")
    classes = class_names(ref)
    metrics = {k: float(v) for k, v in evaluation.evaluate_boxes(preds, gts, classes).items() if k in METRIC_KEYS}
    op_module = operating_points_module(ref_bundle)
    op = (choose_operating_point(op_module, preds, gts, classes, folds,
                                 f"out-of-fold validation predictions of folds {folds}, plans {plans} clustered",
                                 fppi=fppi, min_sensitivity=min_sensitivity, threshold=threshold)
          if op_module is not None and preds else None)
    models = [bundles[pid].name for pid in plans]
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(prefix=".consolidated.", suffix=".tmp", dir=root)
    try:
        (tmp / "configs").mkdir()
        first = members[plans[0]]
        for f in ("plan.json", "logging.conf"):
            if (first / "configs" / f).is_file():
                shutil.copy2(first / "configs" / f, tmp / "configs" / f)
        shutil.copytree(first / "scripts", tmp / "scripts", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for pid, model in zip(plans, models, strict=True):
            dst = tmp / MEMBERS / model
            shutil.copytree(members[pid] / "configs", dst / "configs")
            shutil.copytree(members[pid] / "models", dst / "models")
            verify_bundle(dst)
        meta = ensemble_metadata(load_json(first / "configs" / "metadata.json"), ref, models, folds, metrics, op,
                                 selection)
        save_json(meta, tmp / "configs" / "metadata.json", indent=4)
        save_json(inference_config(ref, name, models, folds), tmp / "configs" / "inference.json", indent=4)
        (tmp / "docs").mkdir()
        (tmp / "docs" / "README.md").write_text(readme_text(ref, name, models, folds, metrics, op))
        verify_bundle(tmp, preprocessing=False)
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("consolidated the ensemble of %s (folds %s) into %s", plans, folds, out)
    return out


def ensemble_dir(task: str | int, plans: Sequence[str]) -> Path:
    """``$det_models/<task>/Ensemble_<plans>`` (the consolidated bundle is its ``consolidated/``)."""
    return paths.det_models() / paths.resolve_task(task) / ensemble_name(plans)


def predict_ensemble_test(task: str | int, plans: Sequence[str], num_tta: int | None = None,
                          device: str | None = None, overwrite: bool = False, masks: bool = False) -> Path:
    """The test set (``raw_splitted/imagesTs``) through the consolidated ensemble bundle into
    ``Ensemble_<plans>/test_predictions`` (each member preprocesses the raw images itself); finished cases of
    the same folds are skipped.

    Raises:
        FileNotFoundError: no consolidated ensemble (``nndet_consolidate TASK --plans ...``) or no test images.
        FileExistsError: existing predictions were made with other folds (without ``overwrite``).
    """
    from monai.bundle import ConfigParser

    from workflow.bundle_code import load_scripts

    task_name = paths.resolve_task(task)
    root = ensemble_dir(task_name, plans)
    bundle = root / "consolidated"
    cfg = bundle / "configs" / "inference.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: no consolidated ensemble; run `nndet_consolidate {task_name} --plans "
                                f"{' '.join(plans)}` first")
    images = paths.det_data() / task_name / "raw_splitted" / "imagesTs"
    out = root / "test_predictions"
    folds = [int(f) for f in load_json(cfg)["folds"]]
    stale = sorted(f.name for f in out.glob("*_boxes.json") if load_json(f).get("folds") != folds) \
        if out.is_dir() else []
    if stale and not overwrite:
        raise FileExistsError(f"{out}: {len(stale)} prediction(s) of other folds ({stale[:3]}); pass overwrite=True "
                              "(--overwrite) to replace them")
    load_scripts(bundle)
    parser = ConfigParser()
    parser.read_config(str(cfg))
    parser.update({"bundle_root": str(bundle), "input_dir": str(images), "output_dir": str(out),
                   "overwrite": bool(overwrite or stale), "masks": bool(masks)})
    if num_tta is not None:
        parser["num_tta"] = int(num_tta)
    if device is not None:
        parser["device"] = f"$torch.device('{device}')"
    parser.get_parsed_content("run")
    return out


def evaluate_ensemble_test(task: str | int, plans: Sequence[str], plots: bool = True) -> dict[str, float]:
    """``Ensemble_<plans>/test_predictions`` vs ``labelsTs`` into ``Ensemble_<plans>/test_results``."""
    from workflow.evaluate import evaluate_test_predictions

    task_name = paths.resolve_task(task)
    root = ensemble_dir(task_name, plans)
    return evaluate_test_predictions(task_name, root / "consolidated", root / "test_predictions",
                                     root / "test_results", plots)
