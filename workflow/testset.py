"""Checks and case selection of ``nndet_predict`` on a task's test set (``workflow.predict.predict_test``).

* :func:`check_model_task`: nnDetection's ``--force_args`` (a model of another task only when asked);
* :func:`select_test_cases`: the cases to predict, raw ``imagesTs`` (to be preprocessed) or the preprocessed ones,
  with the model's modality count checked per case;
* :func:`cases_to_predict`: the cases without a prediction; predictions of other folds are an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from planner import paths
from planner.io import load_json
from planner.plan.plan import Plan

logger = logging.getLogger(__name__)


def check_model_task(p: Plan, task_name: str, dataset_task: str, bundle: Path, force_args: bool) -> None:
    """nnDetection's ``--force_args``: a model trained on another task predicts this one only when asked."""
    if p.task in (task_name, dataset_task):
        return
    msg = f"{bundle}: the model was trained on task {p.task} (configs/plan.json), not on {task_name}"
    if not force_args:
        raise ValueError(f"{msg}; pass --force_args (force_args=True) to predict {task_name} with it anyway")
    logger.warning("%s: predicting %s with it (--force_args)", msg, task_name)


def check_test_modalities(p: Plan, bundle: Path, task_root: Path, raw_ts: Path, case_ids: Sequence[str]) -> None:
    """The test cases must have the model's modality count (also with ``--force_args``); names the file."""
    from planner.dataset import IMAGE_SUFFIX, dataset_file, load_dataset_info

    m, info = len(p.modalities), load_dataset_info(task_root)
    takes = f"model {bundle.name} (trained on {p.task}) takes {m} modality file(s) per case: {p.modalities}"
    if info.num_modalities != m:
        raise ValueError(f"{dataset_file(task_root)}: {info.num_modalities} modalities {info.modalities}, but the "
                         f"{takes}; predict with a model trained on these modalities")
    for cid in case_ids:
        present = sorted(int(f.name[len(cid) + 1: -len(IMAGE_SUFFIX)])
                         for f in raw_ts.glob(f"{cid}_[0-9][0-9][0-9][0-9]{IMAGE_SUFFIX}"))
        if present != list(range(m)):
            odd = [i for i in present if i >= m] or [i for i in range(m) if i not in present]
            raise ValueError(f"{raw_ts / f'{cid}_{odd[0]:04d}{IMAGE_SUFFIX}'}: test case {cid} has {len(present)} "
                             f"modality file(s) {[f'_{i:04d}' for i in present]}, but the {takes}")


def select_test_cases(task_name: str, p: Plan, bundle: Path, images_dir: Path, preprocess: bool) -> list[str]:
    """Case ids to predict: those of ``raw_splitted/imagesTs`` (preprocessed if needed), or with
    ``preprocess=False`` those of ``preprocessed/<plan>/imagesTs``, which must then hold every raw test case."""
    from planner.dataset import list_case_ids

    task_root = paths.det_data() / task_name
    raw_ts = task_root / "raw_splitted" / "imagesTs"
    raw_ids = list_case_ids(raw_ts) if raw_ts.is_dir() else []
    done = sorted(f.stem for f in images_dir.glob("*.json")) if images_dir.is_dir() else []
    if preprocess:
        if not raw_ids and not done:
            raise FileNotFoundError(f"{raw_ts}: no test case; put the images there as <case>_0000.nii.gz "
                                    "(one file per modality, _0000, _0001, ...)")
        check_test_modalities(p, bundle, task_root, raw_ts, raw_ids)
        return raw_ids or done
    missing = [c for c in raw_ids if c not in set(done)]
    if missing or not done:
        what = f"{len(missing)} test case(s) of {raw_ts} are not preprocessed ({missing[:5]})" if missing else \
            "no preprocessed test case"
        raise FileNotFoundError(f"{images_dir}: {what}; run nndet_predict without --no_preprocess (it preprocesses "
                                f"raw_splitted/imagesTs with the bundle's definition) or `nndet_prep {task_name}`")
    for c in done:
        n = load_json(images_dir / f"{c}.json").get("num_modalities", len(p.modalities))
        if n != len(p.modalities):
            raise ValueError(f"{images_dir / f'{c}.json'}: {n} modalities, but model {bundle.name} (trained on "
                             f"{p.task}) takes {len(p.modalities)}: {p.modalities}")
    return done


def cases_to_predict(out: Path, cases: Sequence[str], folds: Sequence[int], overwrite: bool,
                     masks: bool = False) -> list[str]:
    """Cases without a prediction (with ``masks``: or without its ``<case>_masks.npz``); existing ones made with
    other folds are an error, not kept silently."""
    if overwrite:
        return list(cases)
    existing = {c: load_json(out / f"{c}_boxes.json") for c in cases if (out / f"{c}_boxes.json").is_file()}
    stale = {c: d["folds"] for c, d in existing.items() if "folds" in d and sorted(d["folds"]) != sorted(folds)}
    if stale:
        made = sorted({tuple(sorted(f)) for f in stale.values()})
        raise FileExistsError(f"{out}: {len(stale)} of {len(cases)} test prediction(s) were made with fold(s) "
                              f"{[list(m) for m in made]}, not the requested {sorted(folds)} (e.g. "
                              f"{next(iter(stale))}_boxes.json); rerun with --overwrite (overwrite=True) to replace "
                              "them, or delete the folder")
    return [c for c in cases if c not in existing or (masks and not (out / f"{c}_masks.npz").is_file())]
