"""`nndet_predict` as an API: the fold ensemble on a task's test set or on any folder of NIfTI cases.

* :func:`predict_test`: cases of ``raw_splitted/imagesTs`` (preprocessed first into ``preprocessed/<plan>/imagesTs``
  unless ``preprocess=False``) -> ``<bundle>/test_predictions/<case>_boxes.json`` with boxes in original voxels
  and in world millimetres; checks and case selection in :mod:`workflow.testset`.
* :func:`predict_dir`: any folder of raw cases through the bundle's own preprocessing definition (in memory),
  the same function the consolidated bundle's ``inference.json`` runs.

Both take ``gpus=N``: the cases still to do are split round-robin over N processes (one per GPU, or N CPU
processes when there is none; :mod:`planner.shards`), each case written once by one of them; preprocessing,
checks and the ensemble's parameters are done once, in this process, before the shards start.

Boxes are MONAI StandardMode, half-open: ``[x1, y1, z1, x2, y2, z2]`` covers voxels x1..x2-1 etc.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from planner import paths
from planner.io import load_json
from planner.shards import WrittenCounter, assign_devices, run_shards, split_round_robin, written_since
from workflow.bundle_code import bundle_module
from workflow.models import bundle_for, bundle_plan, folds_or_trained
from workflow.sweep import ensemble_params, images_dir, load_detector, resolve_device

logger = logging.getLogger(__name__)

BOXES_SUFFIX = "_boxes.json"  # <case>_boxes.json, the bundle's predict.OUTPUT_SUFFIX


def predict_test(task: str | int, model: str | None = None, plan: str | None = None,
                 folds: Sequence[int] | None = None, num_tta: int | None = None, overwrite: bool = False,
                 device: str | None = None, *, preprocess: bool = True, check: bool = False,
                 num_processes_preprocessing: int | None = None, force_args: bool = False, gpus: int = 1,
                 masks: bool = False) -> Path:
    """`nndet_predict TASK MODEL [--fold -1] [--no_preprocess] [--check] [-npp N] [--force_args] [--gpus N]`: the
    ensemble of ``folds`` (default: all trained) on the test cases; per case
    ``<bundle>/test_predictions/<case>_boxes.json``.

    Args:
        preprocess: first preprocess ``raw_splitted/imagesTs`` with the bundle's preprocessing definition into
            ``preprocessed/<plan>/imagesTs`` (done cases are skipped); False uses what is there.
        check: dataset checks of the test images (:func:`planner.checks.check_test_cases`) before anything runs.
        num_processes_preprocessing: workers for the checks and the preprocessing (default ``det_num_threads``).
        force_args: predict even though the model was trained on another task (its plan's ``task``).
        overwrite: predict cases whose json exists (else they are skipped when made with the same folds).
        gpus: processes to split the cases to do over (:func:`planner.shards.assign_devices`: ``cuda:0`` ..
            ``cuda:N-1``, or N CPU processes without a GPU); 1 predicts in this process. With N > 1 a case that
            fails is reported at the end (``CasesFailed``) after the others are written.
        masks: also a mask per finding from the segmentation head, ``<case>_masks.npz`` beside the json (the
            bundle's ``scripts/masks.py``); cases predicted before without masks are redone.

    Raises:
        ValueError: model of another task without ``force_args``; test cases with another modality count;
            ``gpus`` more than the visible CUDA devices (when there are any).
        DatasetError: ``check`` found problems (every one is listed).
        FileNotFoundError: no test case, or with ``preprocess=False`` a test case that is not preprocessed.
        FileExistsError: existing predictions were made with other folds (without ``overwrite``).
    """
    from planner.dataset import load_dataset_info
    from workflow.testset import cases_to_predict, check_model_task, select_test_cases

    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = bundle_plan(bundle)
    task_root = paths.det_data() / task_name
    check_model_task(p, task_name, load_dataset_info(task_root).task, bundle, force_args)
    folds = folds_or_trained(bundle, folds)
    devices = assign_devices(gpus, device) if gpus > 1 else None
    nproc = paths.num_threads() if num_processes_preprocessing is None else num_processes_preprocessing
    if check:
        from planner.checks import check_test_cases

        check_test_cases(task_root, num_processes=nproc)
    images = images_dir(task_name, p, "Ts")
    cases = select_test_cases(task_name, p, bundle, images, preprocess)
    out = bundle / "test_predictions"
    todo = cases_to_predict(out, cases, folds, overwrite, masks)
    if not todo:
        logger.info("test predictions exist in %s (overwrite to recompute)", out)
        return out
    if preprocess:
        from planner.preprocess.run import preprocess_task

        preprocess_task(task_root, bundle, p, num_processes=nproc, splits=("Ts",))
    params = ensemble_params(bundle, folds)
    if devices is None:
        predict_preprocessed(bundle, task_name, folds, todo, num_tta, params, device, masks=masks)
    else:
        _run_case_shards(bundle, _test_shard, split_round_robin(todo, gpus), devices,
                         (bundle, task_name, folds, num_tta, params, masks), out,
                         desc=f"predict test ({len(folds)} fold(s))")
    return out


def predict_preprocessed(bundle: Path, task_name: str, folds: Sequence[int], cases: Sequence[str],
                         num_tta: int | None, params: dict | None, device: str | None = None,
                         keep_going: bool = False, masks: bool = False) -> list[tuple[str, str]]:
    """The ensemble on preprocessed test cases (``preprocessed/<plan>/imagesTs/<case>.npy`` + ``.json``) ->
    ``<bundle>/test_predictions/<case>_boxes.json``, one case after the other.

    Args:
        params: the ensemble's postprocessing parameters (:func:`workflow.sweep.ensemble_params`).
        keep_going: a case that fails is logged and returned, and the next one predicted (else it raises).
        masks: also ``<case>_masks.npz`` (a mask per finding, the bundle's ``predict.attach_masks``).

    Returns:
        (case id, reason) of the cases that failed (``keep_going`` only).
    """
    from tqdm import tqdm

    p = bundle_plan(bundle)
    images, out = images_dir(task_name, p, "Ts"), bundle / "test_predictions"
    inference, predict = bundle_module(bundle, "inference"), bundle_module(bundle, "predict")
    dets = [load_detector(bundle, f, "last", device) for f in folds]
    dev = resolve_device(bundle, device)
    failures = []
    for case in tqdm(cases, desc=f"predict test ({len(folds)} fold(s))", unit="case"):
        try:
            props = load_json(images / f"{case}.json")
            image = np.load(images / f"{case}.npy", mmap_mode="r")
            pred = inference.predict_case(dets, image, p.patch_size, p.batch_size, num_tta=num_tta, params=params,
                                          device=dev, masks=masks)
            record = predict.prediction_record(case, pred.detections, props, props["affine"], p.labels, params,
                                               task_name, bundle.name, folds)
            if masks:
                record["original_shape"] = list(props["original_shape"])
                record["finding_masks"] = predict.attach_masks(record, pred.seg_prob, props, props["original_shape"])
            predict.write_prediction(record, out)
        except Exception as e:  # noqa: BLE001 -- with keep_going, reported with the case at the end
            if not keep_going:
                raise
            logger.exception("case %s not predicted", case)
            failures.append((case, f"{type(e).__name__}: {e}"))
    return failures


def _test_shard(cases: list[str], device: str, bundle: Path, task_name: str, folds: Sequence[int],
                num_tta: int | None, params: dict | None, masks: bool = False) -> list[tuple[str, str]]:
    """One process's share of :func:`predict_test` (:func:`planner.shards.run_shards` runs it)."""
    return predict_preprocessed(bundle, task_name, folds, cases, num_tta, params, device, keep_going=True,
                                masks=masks)


def _dir_shard(cases: list, device: str, bundle: Path, task_name: str, folds: Sequence[int], num_tta: int | None,
               params: dict | None, output_dir: Path, overwrite: bool, masks: bool = False) -> list[tuple[str, str]]:
    """One process's share of :func:`predict_dir`: the bundle's ``predict_folder`` on its cases; the failures."""
    predict = bundle_module(bundle, "predict")
    try:
        predict.predict_folder(cases, output_dir, folder_predictor(bundle, folds, num_tta, params, device, masks),
                               overwrite=overwrite, task=task_name, model=bundle.name, folds=folds)
    except predict.CasesFailed as e:
        return e.failures
    return []


def _run_case_shards(bundle: Path, target, shards: list[list], devices, args: tuple, out: Path, desc: str) -> None:
    """Run the case shards, each in a process (a single one too: a case is predicted with the same device and
    thread count whatever else was still to do, so a resumed run writes what an uninterrupted one would); after
    all shards ended, raise the bundle's ``CasesFailed`` with every case not written (a failed case, or the
    unfinished cases of a shard whose process failed or died)."""
    ids = [[getattr(c, "case_id", c) for c in shard] for shard in shards]
    outputs = [out / f"{c}{BOXES_SUFFIX}" for shard in ids for c in shard]
    t0 = time.time_ns()
    outcomes = run_shards(target, shards, devices[: len(shards)], args, progress=WrittenCounter(outputs, t0),
                          desc=f"{desc}, {len(shards)} process(es)")
    failures = []
    for o, shard in zip(outcomes, ids, strict=True):
        if o.error is None:
            failures += [tuple(f) for f in o.result]
        else:
            failures += [(c, o.error) for c in shard if not written_since(out / f"{c}{BOXES_SUFFIX}", t0)]
    if failures:
        predict = bundle_module(bundle, "predict")
        raise predict.CasesFailed(failures, out, len(outputs) - len(failures))
    logger.info("predictions of %d case(s) by %d processes in %s", len(outputs), len(shards), out)


def folder_predictor(bundle: Path, folds: Sequence[int], num_tta: int | None, params: dict | None,
                     device: str | None = None, masks: bool = False):
    """The bundle's ``Predictor`` (its preprocessing definition, the folds' detectors, ``params``, a mask per
    finding with ``masks``) on ``device``."""
    from planner.preprocess.run import load_preprocessing

    p, predict = bundle_plan(bundle), bundle_module(bundle, "predict")
    dets = [load_detector(bundle, f, "last", device) for f in folds]
    return predict.Predictor(dets, load_preprocessing(bundle), p.patch_size, p.batch_size, num_tta=num_tta,
                             params=params, device=resolve_device(bundle, device), classes=p.labels, masks=masks)


def predict_dir(task: str | int, input_dir: str | Path, output_dir: str | Path, model: str | None = None,
                plan: str | None = None, folds: Sequence[int] | None = None, num_tta: int | None = None,
                overwrite: bool = False, device: str | None = None, check: bool = False,
                num_processes: int | None = None, gpus: int = 1, masks: bool = False) -> Path:
    """`nndet_predict TASK --input_dir IN --output_dir OUT [--gpus N]`: any folder of raw NIfTI cases
    (``<case>_0000.nii.gz`` per modality) through the bundle's own preprocessing definition and the fold ensemble;
    writes ``<output_dir>/<case>_boxes.json`` with the fields of :func:`predict_test` (the consolidated bundle's
    ``inference.json`` runs the same function). ``check``: :func:`planner.checks.check_input_folder` first.
    ``gpus``: the cases without an output (all with ``overwrite``) split over N processes as in
    :func:`predict_test`. A case that fails is reported at the end (``CasesFailed``) after the others are
    written. ``masks``: a mask per finding too (``<case>_masks.npz``)."""
    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = bundle_plan(bundle)
    predict = bundle_module(bundle, "predict")
    folds = folds_or_trained(bundle, folds)
    devices = assign_devices(gpus, device) if gpus > 1 else None
    if check:
        from planner.checks import check_input_folder

        check_input_folder(Path(input_dir), len(p.modalities), p.dim,
                           num_processes=paths.num_threads() if num_processes is None else num_processes)
    cases = predict.find_cases(input_dir, len(p.modalities), p.modalities)
    params = ensemble_params(bundle, folds)
    out = Path(output_dir)
    if devices is None:
        return predict.predict_folder(cases, out, folder_predictor(bundle, folds, num_tta, params, device, masks),
                                      overwrite=overwrite, task=task_name, model=bundle.name, folds=folds)
    todo = [c for c in cases if overwrite or not (out / f"{c.case_id}{BOXES_SUFFIX}").is_file()
            or (masks and not (out / f"{c.case_id}_masks.npz").is_file())]
    if len(todo) < len(cases):
        logger.info("%d case(s) already predicted in %s, skipped (overwrite to recompute)", len(cases) - len(todo),
                    out)
    if todo:
        _run_case_shards(bundle, _dir_shard, split_round_robin(todo, gpus, key=lambda c: c.case_id), devices,
                         (bundle, task_name, folds, num_tta, params, out, overwrite, masks), out,
                         desc=f"predict ({len(folds)} fold(s))")
    return out
