"""`nndet_predict` as an API: the fold ensemble on a task's test set or on any folder of NIfTI cases.

* :func:`predict_test`: cases of ``raw_splitted/imagesTs`` (preprocessed first into ``preprocessed/<plan>/imagesTs``
  unless ``preprocess=False``) -> ``<bundle>/test_predictions/<case>_boxes.json`` with boxes in original voxels
  and in world millimetres; checks and case selection in :mod:`workflow.testset`.
* :func:`predict_dir`: any folder of raw cases through the bundle's own preprocessing definition (in memory),
  the same function the consolidated bundle's ``inference.json`` runs.

Boxes are MONAI StandardMode, half-open: ``[x1, y1, z1, x2, y2, z2]`` covers voxels x1..x2-1 etc.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from planner import paths
from planner.io import load_json, save_json
from workflow.bundle_code import bundle_module
from workflow.models import bundle_for, bundle_plan, folds_or_trained
from workflow.sweep import ensemble_params, images_dir, load_detector, resolve_device

logger = logging.getLogger(__name__)


def predict_test(task: str | int, model: str | None = None, plan: str | None = None,
                 folds: Sequence[int] | None = None, num_tta: int | None = None, overwrite: bool = False,
                 device: str | None = None, *, preprocess: bool = True, check: bool = False,
                 num_processes_preprocessing: int | None = None, force_args: bool = False) -> Path:
    """`nndet_predict TASK MODEL [--fold -1] [--no_preprocess] [--check] [-npp N] [--force_args]`: the ensemble
    of ``folds`` (default: all trained) on the test cases; per case ``<bundle>/test_predictions/<case>_boxes.json``.

    Args:
        preprocess: first preprocess ``raw_splitted/imagesTs`` with the bundle's preprocessing definition into
            ``preprocessed/<plan>/imagesTs`` (done cases are skipped); False uses what is there.
        check: dataset checks of the test images (:func:`planner.checks.check_test_cases`) before anything runs.
        num_processes_preprocessing: workers for the checks and the preprocessing (default ``det_num_threads``).
        force_args: predict even though the model was trained on another task (its plan's ``task``).
        overwrite: predict cases whose json exists (else they are skipped when made with the same folds).

    Raises:
        ValueError: model of another task without ``force_args``; test cases with another modality count.
        DatasetError: ``check`` found problems (every one is listed).
        FileNotFoundError: no test case, or with ``preprocess=False`` a test case that is not preprocessed.
        FileExistsError: existing predictions were made with other folds (without ``overwrite``).
    """
    from tqdm import tqdm

    from planner.dataset import load_dataset_info
    from workflow.testset import cases_to_predict, check_model_task, select_test_cases

    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = bundle_plan(bundle)
    task_root = paths.det_data() / task_name
    check_model_task(p, task_name, load_dataset_info(task_root).task, bundle, force_args)
    folds = folds_or_trained(bundle, folds)
    nproc = paths.num_threads() if num_processes_preprocessing is None else num_processes_preprocessing
    if check:
        from planner.checks import check_test_cases

        check_test_cases(task_root, num_processes=nproc)
    images = images_dir(task_name, p, "Ts")
    cases = select_test_cases(task_name, p, bundle, images, preprocess)
    out = bundle / "test_predictions"
    todo = cases_to_predict(out, cases, folds, overwrite)
    if not todo:
        logger.info("test predictions exist in %s (overwrite to recompute)", out)
        return out
    if preprocess:
        from planner.preprocess.run import preprocess_task

        preprocess_task(task_root, bundle, p, num_processes=nproc, splits=("Ts",))
    inference, predict = bundle_module(bundle, "inference"), bundle_module(bundle, "predict")
    params = ensemble_params(bundle, folds)
    dets = [load_detector(bundle, f, "last", device) for f in folds]
    dev = resolve_device(bundle, device)
    for case in tqdm(todo, desc=f"predict test ({len(folds)} fold(s))", unit="case"):
        props = load_json(images / f"{case}.json")
        image = np.load(images / f"{case}.npy", mmap_mode="r")
        pred = inference.predict_case(dets, image, p.patch_size, p.batch_size, num_tta=num_tta, params=params,
                                      device=dev).detections
        save_json(predict.prediction_record(case, pred, props, props["affine"], p.labels, params, task_name,
                                            bundle.name, folds), out / f"{case}_boxes.json")
    return out


def predict_dir(task: str | int, input_dir: str | Path, output_dir: str | Path, model: str | None = None,
                plan: str | None = None, folds: Sequence[int] | None = None, num_tta: int | None = None,
                overwrite: bool = False, device: str | None = None, check: bool = False,
                num_processes: int | None = None) -> Path:
    """`nndet_predict TASK --input_dir IN --output_dir OUT`: any folder of raw NIfTI cases (``<case>_0000.nii.gz``
    per modality) through the bundle's own preprocessing definition and the fold ensemble; writes
    ``<output_dir>/<case>_boxes.json`` with the fields of :func:`predict_test` (the consolidated bundle's
    ``inference.json`` runs the same function). ``check``: :func:`planner.checks.check_input_folder` first.
    A case that fails is reported at the end (``CasesFailed``) after the others are written."""
    from planner.preprocess.run import load_preprocessing

    task_name = paths.resolve_task(task)
    bundle = bundle_for(task_name, model, plan)
    p = bundle_plan(bundle)
    predict = bundle_module(bundle, "predict")
    folds = folds_or_trained(bundle, folds)
    if check:
        from planner.checks import check_input_folder

        check_input_folder(Path(input_dir), len(p.modalities), p.dim,
                           num_processes=paths.num_threads() if num_processes is None else num_processes)
    cases = predict.find_cases(input_dir, len(p.modalities), p.modalities)
    params = ensemble_params(bundle, folds)
    dets = [load_detector(bundle, f, "last", device) for f in folds]
    predictor = predict.Predictor(dets, load_preprocessing(bundle), p.patch_size, p.batch_size, num_tta=num_tta,
                                  params=params, device=resolve_device(bundle, device), classes=p.labels)
    return predict.predict_folder(cases, output_dir, predictor, overwrite=overwrite, task=task_name,
                                  model=bundle.name, folds=folds)
