"""Offline preprocessing of a task with the transform chain of its generated bundle (``nndet_prep``).

Per plan the output is ``<task>/preprocessed/<plan_id>/images{Tr,Ts}/``:

* ``<case>.npy``: float32 [C, *spatial] (axes transposed by ``transpose_forward``, resampled, normalised),
* ``<case>_seg.npy``: int16 (int32 if ids need it) instance map, -1 outside the body (labelled cases),
* ``<case>.json``: properties (geometry for restoring predictions; ``boxes`` in MONAI StandardMode,
  voxel coordinates of the preprocessed arrays, half-open, with their ``classes`` and ``instance_ids``).

The json is written last (each file atomically), so a case counts as done exactly when its json exists:
a rerun skips done cases unless ``overwrite``, and a crash mid-case leaves it to be redone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from planner import paths
from planner.bundle import PREPROCESSING_CONFIG, PREPROCESSING_ID
from planner.dataset import CaseFiles, DatasetError, list_cases, load_dataset_info
from planner.fingerprint import instance_boxes
from planner.io import save_json, save_npy
from planner.nifti import load_case
from planner.plan.plan import Plan
from planner.preprocess.transforms import IMAGE_KEY, SEG_KEY, SPACING_KEY, to_numpy

logger = logging.getLogger(__name__)

SPLITS = ("Tr", "Ts")


@dataclass(frozen=True)
class CaseJob:
    files: CaseFiles
    out_dir: Path


def load_preprocessing(bundle_dir: str | Path):
    """The bundle's preprocessing chain (``configs/preprocessing.json`` -> ``preprocessing``), instantiated.

    Raises:
        FileNotFoundError: the bundle has no preprocessing config.
    """
    from monai.bundle import ConfigParser

    path = Path(bundle_dir) / PREPROCESSING_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: generate the bundle first (nndet_prep, or planner.bundle.generate_bundle)"
        )
    parser = ConfigParser()
    parser.read_config(str(path))
    return parser.get_parsed_content(PREPROCESSING_ID)


def _check_bundle_matches(bundle_dir: Path, plan: Plan) -> None:
    cfg = json.loads((Path(bundle_dir) / PREPROCESSING_CONFIG).read_text())
    if cfg.get("plan_id") != plan.plan_id or cfg.get("target_spacing_transposed") != plan.target_spacing_transposed:
        raise ValueError(
            f"{Path(bundle_dir) / PREPROCESSING_CONFIG} was generated for plan {cfg.get('plan_id')} "
            f"(spacing {cfg.get('target_spacing_transposed')}), not for {plan.plan_id} "
            f"(spacing {plan.target_spacing_transposed}); regenerate the bundle (nndet_prep -o overwrite=True)"
        )


def _seg_dtype(seg: np.ndarray) -> type:
    return np.int16 if seg.size == 0 or (seg.min() >= -1 and seg.max() <= np.iinfo(np.int16).max) else np.int32


def _run_chain(chain, given: list[dict[str, Any]]) -> dict[str, Any]:
    """``chain(data)`` for the one dict in ``given`` (taken out of it, so that nobody else holds it), step by
    step for a ``Compose`` (``monai.transforms.apply_transform`` per step, as Compose does for one dict) so
    that no step's input outlives the step after it."""
    from monai.transforms import Compose, apply_transform

    data = given.pop()
    if not isinstance(chain, Compose) or getattr(chain, "lazy", False):
        return chain(data)
    for t in chain.transforms:
        data = apply_transform(t, data)
    return data


def preprocess_case(files: CaseFiles, dim: int, chain, out_dir: Path, plan_id: str) -> dict[str, Any]:
    """Load, preprocess and write one case; returns its properties (also written as ``<case>.json``).

    Raises:
        DatasetError: an instance in the label map is missing from the case json.
    """
    # compact: an int16 CT stays int16 until the resampling converts it slab by slab (the chain's
    # output is float32 as always, the same values; issue 17, item 6)
    case = load_case(files, dim, with_label=True, compact=True)
    data: dict[str, Any] = {IMAGE_KEY: case.data, SPACING_KEY: case.spacing}
    if case.seg is not None:
        data[SEG_KEY] = case.seg[None]
    # the chain's dict is the only holder of the loaded arrays, and its steps run one by one, so each step's
    # inputs are released once the next one has them (a Compose call would keep its input dict to the end)
    case = replace(case, data=None, seg=None)
    given = [data]
    del data
    out = _run_chain(chain, given)
    image = np.ascontiguousarray(to_numpy(out[IMAGE_KEY]), dtype=np.float32)
    props: dict[str, Any] = {
        "case_id": files.case_id,
        "plan_id": plan_id,
        "original_shape": out["original_shape"],
        "original_spacing": [float(s) for s in case.spacing],
        "affine": np.asarray(case.affine, dtype=np.float64).tolist(),
        "crop_bbox": out["crop_bbox"],
        "shape_after_crop": out["shape_after_crop"],
        "transpose_forward": out["transpose_forward"],
        "spacing_after_resampling": out["spacing_after_resampling"],
        "shape_after_resampling": out["shape_after_resampling"],
        "num_modalities": int(image.shape[0]),
        "has_label": SEG_KEY in out,
        "boxes": [],
        "classes": [],
        "instance_ids": [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if SEG_KEY in out:
        seg = to_numpy(out[SEG_KEY])[0]
        seg = np.ascontiguousarray(seg, dtype=_seg_dtype(seg))
        ids, boxes = instance_boxes(seg)
        unknown = [i for i in ids if i not in case.instances]
        if unknown:
            raise DatasetError(
                [(str(files.instances_json), f"instances {unknown} of {files.label} are not listed; add their class")]
            )
        props.update(boxes=boxes, classes=[int(case.instances[i]) for i in ids], instance_ids=[int(i) for i in ids])
        save_npy(seg, out_dir / f"{files.case_id}_seg.npy")
    save_npy(image, out_dir / f"{files.case_id}.npy")
    save_json(props, out_dir / f"{files.case_id}.json")  # last: marks the case done
    return props


# ------------------------------------------------------------------------------- parallel driver
_WORKER: dict[str, Any] = {}


def _init_worker(bundle_dir: str, dim: int, plan_id: str) -> None:
    _WORKER.update(chain=load_preprocessing(bundle_dir), dim=dim, plan_id=plan_id)


def _worker(job: CaseJob) -> tuple[str, str, Any]:
    """(case id, "ok" | "error", problems); DatasetError problems survive the trip back."""
    try:
        preprocess_case(job.files, _WORKER["dim"], _WORKER["chain"], job.out_dir, _WORKER["plan_id"])
    except DatasetError as e:
        return job.files.case_id, "error", e.problems
    return job.files.case_id, "ok", None


def preprocess_task(
    task_root: str | Path, bundle_dir: str | Path, plan: Plan, num_processes: int = 0, overwrite: bool = False,
    splits: Sequence[str] = SPLITS,
) -> Path:
    """Preprocess the training and test cases of a task with the bundle's preprocessing config.

    Args:
        task_root: task folder (``dataset.json``, ``raw_splitted/``).
        bundle_dir: generated bundle of ``plan`` (its ``configs/preprocessing.json`` is the definition).
        plan: the plan (its ``plan_id`` names the output folder).
        num_processes: worker processes (``spawn``); 0 runs in this process.
        overwrite: recompute cases whose json exists (otherwise they are skipped).
        splits: which of ``"Tr"`` / ``"Ts"`` (``raw_splitted/images<split>``) to preprocess; ``nndet_predict``
            passes ``("Ts",)``.

    Returns:
        ``task_root/preprocessed/<plan_id>``.

    Raises:
        DatasetError: every case problem found, after all cases were visited.
    """
    task_root, bundle_dir = Path(task_root), Path(bundle_dir)
    dataset = load_dataset_info(task_root)
    if not (bundle_dir / PREPROCESSING_CONFIG).is_file():
        raise FileNotFoundError(f"{bundle_dir / PREPROCESSING_CONFIG} is missing: generate the bundle first")
    _check_bundle_matches(bundle_dir, plan)
    out_root = task_root / "preprocessed" / plan.plan_id
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"splits {unknown} are not among {list(SPLITS)}")
    jobs, skipped = [], 0
    for split in splits:
        out_dir = out_root / f"images{split}"
        for files in list_cases(task_root / "raw_splitted", dataset.num_modalities, split, dataset.annotation):
            if not overwrite and (out_dir / f"{files.case_id}.json").is_file():
                skipped += 1
                continue
            jobs.append(CaseJob(files, out_dir))
    if skipped:
        logger.info("%s: %d case(s) already preprocessed, skipped (overwrite to redo)", plan.plan_id, skipped)
    if not jobs:
        return out_root
    bar = {"total": len(jobs), "desc": f"preprocess {plan.plan_id}", "unit": "case", "disable": None}
    init = (str(bundle_dir), dataset.dim, plan.plan_id)
    if num_processes > 0:
        with paths.worker_pool(min(num_processes, len(jobs)), initializer=_init_worker, initargs=init) as pool:
            results = list(tqdm(pool.imap_unordered(_worker, jobs, chunksize=1), **bar))
    else:
        _init_worker(*init)
        results = [_worker(j) for j in tqdm(jobs, **bar)]
    problems = [p for _, status, payload in results if status == "error" for p in payload]
    if problems:
        raise DatasetError(problems)
    logger.info("%s: %d case(s) preprocessed into %s", plan.plan_id, len(results), out_root)
    return out_root


def unpack(path: str | Path | None = None, num_processes: int = 0) -> Path | None:
    """``nndet_unpack``: nothing to do in our format, said after checking the folder.

    nnDetection stores compressed ``.npz`` and unpacks them to ``.npy`` for memory-mapped loading; we
    write uncompressed ``.npy`` directly, so they are memory-mappable as they are.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if path is None:
        logger.info("nothing to unpack: preprocessed arrays are written as uncompressed .npy (memory-mapped)")
        return None
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; give a preprocessed folder such as "
            "$det_data/Task000D3_Example/preprocessed/D3V001_3d (run nndet_prep first)"
        )
    arrays = [p for p in path.rglob("*.npy") if not p.name.endswith("_seg.npy")]
    logger.info(
        "%s: %d preprocessed case array(s) already in .npy format (memory-mapped at training); nothing to unpack",
        path, len(arrays),
    )
    return path
