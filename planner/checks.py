"""Dataset checks run by `nndet_prep` (nnDetection's ``nndet/utils/check.py``, extended): every problem at
once, nothing written.

Quick checks (always; no image is loaded):

* dataset.json / dataset.yaml is valid (``planner.dataset``);
* ``raw_splitted/imagesTr`` exists and holds cases; every modality file of every case exists;
* no stray files (an image without modality suffix, a modality not in dataset.json, a label or
  instance json without image);
* a label map and an instance json exist for every training case (and test case when
  ``test_labels`` is true); the json is ``{"instances": {"<id>": <class>}}`` with string integer
  ids starting at 1 and consecutive, and integer classes defined in ``labels``;
* no ``.`` in the task folder name or in case file names. nnDetection rejects a ``.`` anywhere in
  a case file's parent path because it derives case ids by splitting paths at the first ``.``; we
  derive ids from file names only, so a ``.`` in the folders *above* the task (``/data/v1.2/``) only
  gets a warning (the task would break nnDetection itself), while one inside the task folder is an
  error (it breaks nnDetection and makes case ids ambiguous).

Checks of loaded files (:func:`check_loaded`), run by the full check and, on every training case, by the
fingerprint (``planner.fingerprint.load_checked_case``), so the default ``nndet_prep`` stops on them too
before anything is written; ``--full_check`` runs them up front and on the test cases as well
(``full=True``, one case per worker, progress bar):

* same dimension, shape and affine (spacing, origin, direction; ``np.allclose`` with a tolerance for
  float32 header rounding) across modalities and label; dimension matches dataset.json ``dim``
  (2D files may be (X, Y) or (X, Y, 1));
* images: no NaN/inf, not constant (all zero or a single value: an empty export);
* labels: integer values, no negatives, and the ids in the map equal the ids in the json exactly
  (an id missing from either side is reported);
* box annotations (``"annotation": "boxes"``, ``planner.box_labels``): the quick check reads every box
  json (frame, entries, numbers, classes, inverted boxes, zero size in mm); the checks of loaded files
  put the boxes on the image grid (outside the image, no voxel inside, covered by other boxes).

``nndet_predict --check`` runs :func:`check_test_cases`: the quick and full checks of ``imagesTs`` only,
images only (no label is needed to predict).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from planner import paths
from planner.box_labels import box_problems
from planner.dataset import (
    IMAGE_SUFFIX,
    CaseFiles,
    DatasetError,
    DatasetInfo,
    case_and_modality,
    case_files,
    list_case_ids,
    load_dataset_info,
)
from planner.nifti import label_to_int, read_nifti

logger = logging.getLogger(__name__)

Problem = tuple[str, str]
AFFINE_RTOL, AFFINE_ATOL = 1e-4, 1e-3  # float32 sform rounding of different writers stays below this


def assert_task_ok(task_root: Path, full: bool = False, num_processes: int = 0) -> None:
    """Check a raw task folder; raise one DatasetError listing every problem found.

    Args:
        task_root: the task folder (``$det_data/Task000D3_Example``).
        full: also load every case (geometry, NaN/constant images, label map vs instance json).
        num_processes: worker processes for the full check (0: in this process).

    Raises:
        DatasetError: ``problems`` holds (file, reason with fix) for every problem.
    """
    task_root = Path(task_root)
    problems = quick_check(task_root)
    if full:
        try:
            problems += full_check(task_root, num_processes=num_processes)
        except DatasetError:
            pass  # dataset.json is broken: already reported by the quick check
    if problems:
        raise DatasetError(problems)
    if full:
        logger.info("dataset checks passed for %s (full)", task_root)
    else:
        logger.info("quick dataset checks passed for %s (files, names, dataset.json, instance jsons); image "
                    "contents, grids and label values are checked as the fingerprint loads each training case "
                    "(test cases only with --full_check, which checks everything before the fingerprint)", task_root)


# ------------------------------------------------------------------------------------------ quick
def quick_check(task_root: Path) -> list[Problem]:
    """All problems found without loading images (empty list when the task is fine)."""
    task_root = Path(task_root)
    if not task_root.is_dir():
        return [(str(task_root), "task folder does not exist; check det_data and the task name")]
    problems = _check_dots(task_root)
    info: DatasetInfo | None = None
    try:
        info = load_dataset_info(task_root)
    except DatasetError as e:
        problems += e.problems
    raw = task_root / "raw_splitted"
    images_tr = raw / "imagesTr"
    if not images_tr.is_dir():
        problems.append((str(images_tr), "folder is missing; put training images in "
                         "raw_splitted/imagesTr/<case>_0000.nii.gz"))
    elif not list_case_ids(images_tr):
        problems.append((str(images_tr), "holds no cases; images must be named <case>_<XXXX>.nii.gz "
                         "(XXXX = 4-digit modality index, e.g. case_1_0000.nii.gz)"))
    if info is None:
        return problems
    for split in ("Tr", "Ts"):
        if not (raw / f"images{split}").is_dir():
            continue
        with_labels = split == "Tr" or info.test_labels
        problems += _check_split(raw, split, info, with_labels)
    return problems


def _check_dots(task_root: Path) -> list[Problem]:
    problems = []
    if "." in task_root.name:
        problems.append((str(task_root), "task folder name contains '.', which nnDetection cannot handle "
                         "(it splits paths at '.'); rename it, e.g. Task100_MyData"))
    above = [p for p in task_root.resolve().parent.parts if "." in p]
    if above:
        logger.warning("'.' in folder(s) %s above %s: fine for us, but nnDetection itself rejects such paths",
                       above, task_root)
    raw = task_root / "raw_splitted"
    if raw.is_dir():
        for sub in sorted(raw.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    stem = f.name[: -len(IMAGE_SUFFIX)] if f.name.endswith(IMAGE_SUFFIX) else f.name
                    stem = stem[: -len(".json")] if stem.endswith(".json") else stem
                    if "." in stem and not f.name.startswith("."):
                        problems.append((str(f), "file name contains '.' before the extension; nnDetection "
                                         "splits names at '.', so rename the case without dots"))
    return problems


def _load_json_problems(path: Path, info: DatasetInfo) -> tuple[list[Problem], dict[str, int] | None]:
    """Type-check an instance json; return (problems, {id: class}) (None when unreadable)."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [(str(path), f"not valid JSON ({e}); fix the syntax")], None
    inst = raw.get("instances") if isinstance(raw, dict) else None
    if not isinstance(inst, dict):
        return [(str(path), 'must be {"instances": {"<id>": <class>}}, e.g. {"instances": {"1": 0}}')], None
    problems = []
    classes = [int(k) for k in info.labels]
    ids = []
    for key, cls in inst.items():
        if not (isinstance(key, str) and key.isdigit()):
            problems.append((str(path), f"instance id {key!r} must be a string of an integer, e.g. \"1\""))
        else:
            ids.append(int(key))
        if not isinstance(cls, int) or isinstance(cls, bool):
            problems.append((str(path), f"class of instance {key} must be an integer, got {cls!r}"))
        elif cls not in classes:
            problems.append((str(path), f"class {cls} of instance {key} is not defined in dataset labels "
                             f"{info.labels}; use one of {classes} or add it to dataset.json"))
    if ids and sorted(ids) != list(range(1, len(ids) + 1)):
        problems.append((str(path), f"instance ids must start at 1 and be consecutive (1..{len(ids)}), got "
                         f"{sorted(ids)}; renumber the label map and the json"))
    return problems, {str(k): v for k, v in inst.items()}


def _check_split(raw: Path, split: str, info: DatasetInfo, with_labels: bool) -> list[Problem]:
    problems: list[Problem] = []
    images_dir, labels_dir = raw / f"images{split}", raw / f"labels{split}"
    case_ids = list_case_ids(images_dir)
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith(".") or f.is_dir():
            continue
        if not f.name.endswith(IMAGE_SUFFIX):
            problems.append((str(f), f"unexpected file in images{split}: images must be <case>_<XXXX>.nii.gz "
                             "(compress .nii with gzip; move other files elsewhere)"))
            continue
        stem = f.name[: -len(IMAGE_SUFFIX)]
        parsed = case_and_modality(f.name)
        mod = stem[-4:]
        if parsed is None:
            problems.append((str(f), "image name lacks the modality suffix; rename to "
                             f"{stem}_0000{IMAGE_SUFFIX}"))
        elif parsed[1] >= info.num_modalities:
            problems.append((str(f), f"modality {mod} is not in dataset.json modalities {info.modalities}; "
                             "add it there or remove the file"))
    boxes = info.annotation == "boxes"
    if with_labels and not labels_dir.is_dir():
        needs = "<case>.json (its boxes)" if boxes else "<case>.nii.gz and <case>.json"
        problems.append((str(labels_dir), f"folder is missing: every {split} case needs {needs} here"
                         + (" (or set test_labels false)" if split == "Ts" else "")))
        with_labels = False
    for cid in case_ids:
        files = case_files(raw, cid, info.num_modalities, split, info.annotation)
        for p in files.images:
            if not p.is_file():
                problems.append((str(p), f"modality file of case {cid} is missing ({info.num_modalities} "
                                 f"modalities in dataset.json: {info.modalities}); add it"))
        if not with_labels:
            continue
        if boxes:
            problems += box_problems(files.instances_json, info.dim, [int(k) for k in info.labels])
            continue
        if not files.label.is_file():
            problems.append((str(files.label), f"label map of case {cid} is missing; add the instance map "
                             "(0 background, 1..N instances)"))
        if not files.instances_json.is_file():
            problems.append((str(files.instances_json), f"instance json of case {cid} is missing; write "
                             '{"instances": {"1": <class>}} (or {"instances": {}} for no object)'))
        else:
            problems += _load_json_problems(files.instances_json, info)[0]
    if labels_dir.is_dir():
        known = set(case_ids)
        for f in sorted(labels_dir.iterdir()):
            if f.name.startswith(".") or f.is_dir():
                continue
            cid = f.name[: -len(IMAGE_SUFFIX)] if f.name.endswith(IMAGE_SUFFIX) else f.name.removesuffix(".json")
            if cid not in known:
                problems.append((str(f), f"stray file: no image {cid}_0000{IMAGE_SUFFIX} in images{split}; "
                                 "add the image or remove the file"))
    return problems


# ------------------------------------------------------------------------------------------- full
def full_check(task_root: Path, num_processes: int = 0) -> list[Problem]:
    """Load every case and return all geometry / content problems (complements :func:`quick_check`).

    Raises:
        DatasetError: dataset.json itself is invalid.
    """
    task_root = Path(task_root)
    info = load_dataset_info(task_root)
    raw = task_root / "raw_splitted"
    jobs: list[tuple[CaseFiles, int, bool]] = []
    for split in ("Tr", "Ts"):
        if (raw / f"images{split}").is_dir():
            with_labels = split == "Tr" or info.test_labels
            jobs += [(case_files(raw, c, info.num_modalities, split, info.annotation), info.dim, with_labels)
                     for c in list_case_ids(raw / f"images{split}")]
    return _run_case_checks(jobs, num_processes, "full check")


def check_test_cases(task_root: Path, num_processes: int = 0) -> None:
    """`nndet_predict --check`: the test images of ``raw_splitted/imagesTs``, before they are preprocessed.

    The quick checks of the split (file names, every modality file of every case present) and the per-case
    loading checks of :func:`check_case` (readable NIfTI, dimension, one grid across modalities, no NaN/inf,
    not constant) on the images only: labels are not needed to predict (nnDetection's ``labels=False``).

    Args:
        task_root: the task folder (``$det_data/Task000D3_Example``).
        num_processes: worker processes for loading the cases (0: in this process).

    Raises:
        DatasetError: ``problems`` holds (file, reason with fix) for every problem (dataset.json included).
    """
    task_root = Path(task_root)
    info = load_dataset_info(task_root)
    raw = task_root / "raw_splitted"
    images_ts = raw / "imagesTs"
    if not images_ts.is_dir() or not list_case_ids(images_ts):
        raise DatasetError([(str(images_ts), "holds no test cases; put them there as <case>_<XXXX>.nii.gz "
                             "(XXXX = 4-digit modality index, e.g. case_1_0000.nii.gz)")])
    problems = _check_split(raw, "Ts", info, with_labels=False)
    jobs = [(case_files(raw, c, info.num_modalities, "Ts"), info.dim, False) for c in list_case_ids(images_ts)]
    problems += _run_case_checks(jobs, num_processes, "check test cases")
    if problems:
        raise DatasetError(problems)
    logger.info("test case checks passed for %s (%d case(s))", images_ts, len(jobs))


def _run_case_checks(jobs: list[tuple[CaseFiles, int, bool]], num_processes: int, desc: str) -> list[Problem]:
    bar = dict(total=len(jobs), desc=desc, unit="case", disable=None)
    results: Iterable[list[Problem]]
    if num_processes > 0 and len(jobs) > 1:
        with paths.worker_pool(min(num_processes, len(jobs))) as pool:
            results = list(tqdm(pool.imap(_check_case_job, jobs), **bar))
    else:
        results = [_check_case_job(j) for j in tqdm(jobs, **bar)]
    return [p for r in results for p in r]


def _check_case_job(job: tuple[CaseFiles, int, bool]) -> list[Problem]:
    return check_case(*job)


def _load(path: Path, dim: int, problems: list[Problem]) -> tuple[np.ndarray, np.ndarray] | None:
    """(array with a 2D task's trailing singleton squeezed, affine) or None (problem recorded)."""
    try:
        img = read_nifti(path)
        arr = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for broken files
        problems.append((str(path), f"cannot be read as NIfTI ({type(e).__name__}: {e}); re-export the file"))
        return None
    if dim == 2 and arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != dim:
        problems.append((str(path), f"has {arr.ndim} axes {arr.shape} but dataset.json dim is {dim}; fix 'dim' "
                         "or the file (2D cases: (X, Y) or (X, Y, 1))"))
        return None
    return arr, np.asarray(img.affine, dtype=np.float64)


def _spacing(affine: np.ndarray, dim: int) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)[:dim]


def check_case(files: CaseFiles, dim: int, with_label: bool = True) -> list[Problem]:
    """Full check of one case (see module docstring); returns its problems.

    Missing files are skipped here: the quick check reports them.
    """
    problems: list[Problem] = []
    images, label = load_case_files(files, dim, with_label, problems)
    return problems + check_loaded(files, images, label, dim)


Loaded = tuple[Path, np.ndarray, np.ndarray]  # (file, array as stored, affine)


def load_case_files(files: CaseFiles, dim: int, with_label: bool,
                    problems: list[Problem]) -> tuple[list[Loaded], Loaded | None]:
    """Every readable image file of a case (and its label map) as stored; unreadable ones are problems."""
    images: list[Loaded] = []
    for p in files.images:
        if p.is_file():
            got = _load(p, dim, problems)
            if got is not None:
                images.append((p, *got))
    label = None
    if with_label and files.label is not None and files.label.is_file():
        got = _load(files.label, dim, problems)
        if got is not None:
            label = (files.label, *got)
    return images, label


def check_loaded(files: CaseFiles, images: list[Loaded], label: Loaded | None, dim: int) -> list[Problem]:
    """The checks of loaded files (see module docstring); the fingerprint runs them on every case it loads,
    so the default ``nndet_prep`` catches them too."""
    problems: list[Problem] = []
    for p, arr, _ in images:
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            n_bad = int((~np.isfinite(arr)).sum())
            problems.append((str(p), f"{n_bad} NaN/inf voxel(s); fix the export (e.g. replace them by the "
                             "background value)"))
        elif arr.size == 0 or arr.min() == arr.max():
            value = arr.flat[0] if arr.size else "none"
            problems.append((str(p), f"image is empty (every voxel is {value}); re-export the case or remove it"))
    loaded = [*images, *([label] if label is not None else [])]
    if loaded:
        ref_path, ref_arr, ref_aff = loaded[0]
        for p, arr, aff in loaded[1:]:
            where = f"compared with {ref_path.name}"
            if arr.shape != ref_arr.shape:
                problems.append((str(p), f"shape {arr.shape} differs from {ref_arr.shape} ({where}); "
                                 "resample all modalities and the label to one grid"))
            elif not np.allclose(_spacing(aff, dim), _spacing(ref_aff, dim), rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
                problems.append((str(p), f"spacing {_spacing(aff, dim).round(4).tolist()} differs from "
                                 f"{_spacing(ref_aff, dim).round(4).tolist()} ({where}); fix the header or resample"))
            elif not np.allclose(aff, ref_aff, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
                problems.append((str(p), f"origin/direction (affine) differs ({where}); the files are not on one "
                                 "grid: copy the reference header or resample (no registration is done)"))
    if label is not None and files.instances_json is not None and files.instances_json.is_file():
        problems += _check_label_content(label[0], label[1], files.instances_json)
    if files.boxes and images and files.instances_json is not None and files.instances_json.is_file():
        _, arr, aff = images[0]
        problems += box_problems(files.instances_json, dim, shape=arr.shape, affine=aff, geometry_only=True)
    return problems


def _check_label_content(label_path: Path, label: np.ndarray, json_path: Path) -> list[Problem]:
    problems: list[Problem] = []
    if np.issubdtype(label.dtype, np.floating):
        try:
            label = label_to_int(label, label_path)
        except DatasetError as e:
            return problems + e.problems
    ids = np.unique(label)
    if ids.size and ids[0] < 0:
        problems.append((str(label_path), f"negative label value(s) {ids[ids < 0].tolist()}; use 0 for "
                         "background and 1..N for instances"))
    mask_ids = {int(i) for i in ids if i > 0}
    try:
        inst = json.loads(json_path.read_text()).get("instances", {})
        json_ids = {int(k) for k in inst}
    except (ValueError, AttributeError, TypeError):
        return problems  # reported by the quick check
    if mask_ids - json_ids:
        problems.append((str(json_path), f"instance id(s) {sorted(mask_ids - json_ids)} are in the label map "
                         f"{label_path.name} but not in this json; add their classes"))
    if json_ids - mask_ids:
        problems.append((str(json_path), f"instance id(s) {sorted(json_ids - mask_ids)} are listed but absent "
                         f"from the label map {label_path.name}; remove them from the json or fix the map"))
    return problems


def check_input_folder(folder: Path, num_modalities: int, dim: int, num_processes: int = 0) -> None:
    """`nndet_predict --input_dir DIR --check`: every case of a folder of raw cases checked before anything
    runs: file names (``<case>_XXXX.nii.gz``), every modality file present, and the loading checks of
    :func:`check_case` on the images (readable, dimension, one grid, no NaN/inf, not constant).

    Raises:
        DatasetError: every problem, each naming its file (messages speak of the folder, not of dataset.json).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError([(str(folder), "input folder does not exist")])
    problems: list[Problem] = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and case_and_modality(p.name) is None:
            problems.append((str(p), f"not named <case>_XXXX{IMAGE_SUFFIX} (XXXX = 4-digit modality index): it "
                             "would not be predicted; rename it or move it out of the input folder"))
    ids = list_case_ids(folder)
    if not ids:
        problems.append((str(folder), f"holds no case named <case>_0000{IMAGE_SUFFIX}"))
    jobs = []
    for case_id in ids:
        images = tuple(folder / f"{case_id}_{m:04d}{IMAGE_SUFFIX}" for m in range(num_modalities))
        problems += [(str(p), f"missing: case {case_id} needs {num_modalities} modality file(s)")
                     for p in images if not p.is_file()]
        extra = sorted(folder.glob(f"{case_id}_*{IMAGE_SUFFIX}"))
        problems += [(str(p), f"modality index beyond the model's {num_modalities} input(s)")
                     for p in extra if p not in images]
        jobs.append((CaseFiles(case_id=case_id, images=images, label=None, instances_json=None), dim, False))
    problems += _run_case_checks(jobs, num_processes, "check input cases")
    if problems:
        raise DatasetError(problems)
    logger.info("input checks passed for %s (%d case(s))", folder, len(jobs))
