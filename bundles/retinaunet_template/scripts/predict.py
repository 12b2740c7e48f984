"""Folder prediction (``configs/inference.json`` of a task bundle or of a consolidated bundle): NIfTI cases
in, box JSON out. The task bundle's config takes the folds' ``fold<X>/model_last.pt`` and their sweep
(:func:`swept_params`); the consolidated one its ``models/`` and fixed parameters.

``python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json
--bundle_root . --input_dir <folder> --output_dir <folder>`` runs, through the factories below:

1. ``find_cases``: every ``<case>_<XXXX>.nii.gz`` of the input folder (one file per modality, nnU-Net
   naming, ``XXXX`` = 0000, 0001, ...), all files checked before anything is loaded or written;
2. ``load_detectors``: one network per weight file, each built from the bundle's own network definition
   (``configs/train.json`` -> ``network_def``; no second copy of it here) with ``models/model_fold<X>.pt``;
3. the preprocessing chain of ``configs/preprocessing.json`` (instantiated by
   ``planner.preprocess.run.load_preprocessing``: the definition ``nndet_prep`` applied offline);
4. ``predictor`` (:class:`Predictor`, one image in memory): preprocess -> ``inference.predict_case`` (all
   folds x mirror TTA, the bundle's postprocessing parameters) -> ``inference.restore_boxes`` (original
   voxels) and ``inference.voxel_boxes_to_world`` (mm); the MONAI Deploy app calls the same object;
5. ``predict_folder``: per case load -> ``predictor`` -> ``<output_dir>/<case>_boxes.json`` (atomic), with the
   fields ``workflow.predict.predict_test`` writes.

Boxes in the output are MONAI StandardMode ``[x1, y1, z1, x2, y2, z2]`` (2D: ``[x1, y1, x2, y2]``),
half-open voxel indices of the original image (raw NIfTI axes i, j, k), and axis-aligned world boxes in
RAS+ millimetres through the NIfTI affine (see ``inference.voxel_boxes_to_world``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from planner.dataset import IMAGE_SUFFIX, CaseFiles, case_and_modality, list_case_ids
from planner.io import load_json, save_json
from planner.nifti import load_case, spacing_from_affine
from planner.preprocess.transforms import IMAGE_KEY, SPACING_KEY, to_numpy

from .inference import GRIDS, Detections, ensemble_members, predict_case, restore_boxes, voxel_boxes_to_world
from .masks import MASKS_SUFFIX, FindingMask, finding_masks, save_masks

logger = logging.getLogger(__name__)

OUTPUT_SUFFIX = "_boxes.json"
BOX_MODE = "StandardMode (x1, y1, z1, x2, y2, z2), half-open voxel indices of the original image"
WORLD_FRAME = "RAS+ millimetres (NIfTI affine); [min_x, min_y, min_z, max_x, max_y, max_z] over voxel edges"


def swept_params(bundle_root: str | Path, folds: Sequence[int]) -> dict[str, Any] | None:
    """Postprocessing parameters swept for exactly ``folds`` in a task bundle, else None (nnDetection's defaults).

    One fold: ``fold<X>/sweep/params.json`` (``nndet_sweep``); several: ``consolidated_sweep/params.json`` when
    its ``folds`` are these (``nndet_consolidate`` writes it from the union of the folds' validation predictions).
    """
    root, folds = Path(bundle_root), sorted(int(f) for f in folds)
    if len(folds) == 1:
        f = root / f"fold{folds[0]}" / "sweep" / "params.json"
        ok = f.is_file()
    else:
        f = root / "consolidated_sweep" / "params.json"
        ok = f.is_file() and sorted(load_json(f).get("folds", [])) == folds
    if ok:
        logger.info("postprocessing swept for folds %s: %s", folds, f)
        return dict(load_json(f)["params"])
    logger.warning("no sweep for folds %s in %s (nndet_sweep / nndet_consolidate): nnDetection's default "
                   "postprocessing parameters", folds, root)
    return None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available, else the CPU (then with ``det_torch_threads`` intra-op threads)."""
    from planner.paths import use_cpu_threads

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    use_cpu_threads(dev)
    return dev


def prediction_record(case_id: str, det: Any, properties: Mapping[str, Any], affine: Any,
                      classes: Mapping[str, str], params: Any, task: str = "", model: str = "",
                      folds: Sequence[int] = ()) -> dict[str, Any]:
    """The ``<case>_boxes.json`` content of one case (``predict_folder`` and ``workflow.predict.predict_test``).

    Args:
        det: final ``inference.Detections`` in preprocessed voxels, in the order to write them.
        properties: the preprocessing bookkeeping ``inference.restore_boxes`` needs.
        affine: the original image's affine (world boxes).
        classes: label index (str) -> class name.
        params: postprocessing parameters to record.
    """
    return voxel_record(case_id, restore_boxes(det.boxes, properties), det.scores, det.labels, affine, classes, params,
                        task, model, folds)


def voxel_record(case_id: str, voxel: Any, scores: Any, labels: Any, affine: Any, classes: Mapping[str, str],
                 params: Any, task: str = "", model: str = "", folds: Sequence[int] = ()) -> dict[str, Any]:
    """:func:`prediction_record` from boxes already in original voxels (the plan ensemble's merged boxes)."""
    voxel = np.asarray(voxel, dtype=np.float64)
    world = voxel_boxes_to_world(voxel, np.asarray(affine))
    labels = np.asarray(labels, dtype=np.int64)
    return {
        "case_id": case_id, "task": task, "model": model, "folds": [int(f) for f in folds],
        "boxes": voxel.tolist(), "boxes_world_mm": world.tolist(), "scores": np.asarray(scores).tolist(),
        "labels": labels.tolist(), "class_names": [classes.get(str(int(c)), str(int(c))) for c in labels],
        "box_mode": BOX_MODE, "world_frame": WORLD_FRAME, "params": params,
    }


def attach_masks(record: dict[str, Any], seg_prob: np.ndarray, properties: Mapping[str, Any],
                 original_shape: Sequence[int]) -> list[FindingMask]:
    """A mask per box of ``record`` (``scripts.masks.finding_masks``), with ``mask_voxels`` per finding and
    ``masks_file`` (the ``<case>_masks.npz`` name) added to the record; returns the masks."""
    masks = finding_masks(seg_prob, np.asarray(record["boxes"], np.float64), properties, original_shape)
    record["mask_voxels"] = [m.voxels for m in masks]
    record["masks_file"] = f"{record['case_id']}{MASKS_SUFFIX}"
    return masks


def write_prediction(record: dict[str, Any], output_dir: str | Path) -> Path:
    """``<case>_boxes.json`` (and ``<case>_masks.npz`` when the record holds ``finding_masks``); the masks first,
    so a json that exists always has its masks."""
    out = Path(output_dir)
    masks = record.pop("finding_masks", None)
    if masks is not None:
        save_masks(masks, out / record["masks_file"], record["original_shape"])
    return save_json(record, out / f"{record['case_id']}{OUTPUT_SUFFIX}")


def _modality_text(modalities: Mapping[str, str] | None, num_modalities: int) -> str:
    names = dict(modalities or {})
    return ", ".join(f"_{m:04d} = {names.get(str(m), f'modality {m}')}" for m in range(num_modalities))


class CasesFailed(RuntimeError):
    """Some cases of a folder could not be predicted; the others were. ``failures``: (case id, reason)."""

    def __init__(self, failures: Sequence[tuple[str, str]], output_dir: Path, done: int) -> None:
        self.failures = list(failures)
        lines = "\n  - ".join(f"{c}: {why}" for c, why in self.failures)
        super().__init__(f"{len(self.failures)} case(s) not predicted ({done} other(s) written to {output_dir}):"
                         f"\n  - {lines}\nfix them and run again: finished cases are skipped")


def find_cases(input_dir: str | Path | None, num_modalities: int,
               modalities: Mapping[str, str] | None = None) -> list[CaseFiles]:
    """The cases of ``input_dir``: ``<case>_0000.nii.gz`` .. ``<case>_<M-1>.nii.gz`` per case (M modalities).

    Args:
        input_dir: folder of NIfTI files in nnU-Net naming.
        num_modalities: files per case the model needs (its input channels, in modality order).
        modalities: modality index (str) -> name, for the messages.

    Returns:
        One ``CaseFiles`` per case id (sorted), images in modality order, no labels.

    Raises:
        ValueError: no ``input_dir`` was given.
        FileNotFoundError: the folder does not exist, holds no case, or a case lacks a modality file (every
            missing file is named).
    """
    expected = _modality_text(modalities, num_modalities)
    if input_dir is None or str(input_dir) == "":
        raise ValueError(f"no input folder: pass --input_dir <folder with <case>_XXXX{IMAGE_SUFFIX} files> ({expected})")
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder does not exist")
    ids = list_case_ids(folder)
    if not ids:
        others = sorted(p.name for p in folder.glob(f"*{IMAGE_SUFFIX}"))[:5]
        hint = f"; found {others} which do not follow that naming" if others else ""
        raise FileNotFoundError(f"{folder}: no input case; expected one file per modality named "
                                f"<case>_XXXX{IMAGE_SUFFIX} ({expected}){hint}")
    strays = sorted(p.name for p in folder.iterdir() if p.is_file() and case_and_modality(p.name) is None)
    if strays:
        logger.warning("%s: %d file(s) not named <case>_XXXX%s are not predicted: %s%s", folder, len(strays),
                       IMAGE_SUFFIX, strays[:10], " ..." if len(strays) > 10 else "")
    cases, missing = [], []
    for case_id in ids:
        images = tuple(folder / f"{case_id}_{m:04d}{IMAGE_SUFFIX}" for m in range(num_modalities))
        missing += [f"{p}: missing (modality {m} of case {case_id})" for m, p in enumerate(images) if not p.is_file()]
        extra = sorted(p.name for p in folder.glob(f"{case_id}_*{IMAGE_SUFFIX}") if p not in images)
        if extra:
            logger.warning("%s: ignoring %s (the model takes %d modality file(s): %s)", folder, extra, num_modalities,
                           expected)
        cases.append(CaseFiles(case_id=case_id, images=images, label=None, instances_json=None))
    if missing:
        raise FileNotFoundError(f"{len(missing)} input file(s) missing; every case needs {num_modalities} "
                                f"file(s) ({expected}):\n  - " + "\n  - ".join(missing))
    return cases


def load_detectors(network_config: str | Path, model_files: Sequence[str | Path], bundle_root: str | Path = ".",
                   network_id: str = "network_def", device: str | torch.device | None = None) -> list[nn.Module]:
    """One detector per weight file, built from the bundle's network definition, in eval mode on ``device``.

    Args:
        network_config: config holding the network definition (the bundle's ``configs/train.json``).
        model_files: state dicts (``torch.save(network.state_dict())``), relative to ``bundle_root`` unless
            absolute; a training checkpoint with a ``"network"`` entry is accepted too.
        bundle_root: the bundle folder.
        network_id: config id of the definition (instantiated once per file).
        device: default CUDA when available, else CPU.

    Raises:
        ValueError: no weight file listed, or weights that do not fit the network.
        FileNotFoundError: weight files are missing (all named).
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    files = [Path(f) if Path(f).is_absolute() else root / f for f in model_files]
    if not files:
        raise ValueError("no model file listed (inference.json 'model_files'); consolidate trained folds first")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"model weights missing: {missing}. The bundle was consolidated without weights "
                                "(--no_model)? Run nndet_consolidate again without --no_model, or copy the weights there")
    dev = resolve_device(device)
    parser = ConfigParser()
    parser.read_config(str(network_config))
    parser["bundle_root"] = str(root)
    nets = []
    for f in files:
        net = parser.get_parsed_content(network_id, lazy=False)
        state = torch.load(f, map_location="cpu", weights_only=True)
        if isinstance(state.get("network"), Mapping):
            state = state["network"]
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{f}: weights do not fit the network '{network_id}' of {network_config} ({e}); "
                             "consolidate again from the bundle these weights were trained with") from e
        nets.append(net.to(dev).eval())
    logger.info("loaded %d network(s) on %s: %s", len(nets), dev, [f.name for f in files])
    return nets


class Predictor:
    """A bundle's whole inference on one image in memory: its preprocessing definition, every fold x mirror
    TTA, and its postprocessing parameters. The NIfTI folder prediction and the MONAI Deploy app both call it,
    so neither holds a transform, threshold or network definition of its own.

    Built by ``configs/inference.json`` (id ``predictor``)::

        parser = ConfigParser(); parser.read_config("configs/inference.json"); parser["bundle_root"] = bundle
        predictor = parser.get_parsed_content("predictor")
        pred = predictor(image, affine)   # image [C, *spatial] (NIfTI axes), affine RAS+ 4x4

    Args:
        detectors: from ``load_detectors`` (one per fold).
        preprocessing: the bundle's preprocessing chain (``planner.preprocess.run.load_preprocessing``).
        patch_size, batch_size: sliding-window tile (preprocessed, transposed axes) and tiles per pass.
        num_tta: mirror transforms per fold (1, 4 or 8 in 3D); None: 8 in 3D, 4 in 2D.
        params: postprocessing parameters (``inference.DEFAULT_PARAMS`` keys; the bundle's sweep).
        device, amp, overlap, grid: see ``inference.predict_case`` (device default CUDA when available).
        classes: label index (str) -> class name.
        masks: also a mask per finding from the segmentation head (``scripts.masks``): the result then holds
            ``finding_masks`` (``FindingMask`` per box, original voxels, cropped to the box; not JSON:
            ``write_prediction`` stores them as ``<case>_masks.npz``), ``mask_voxels`` and ``masks_file``.
    """

    def __init__(self, detectors: Sequence[nn.Module], preprocessing: Any, patch_size: Sequence[int], batch_size: int,
                 num_tta: int | None = None, params: Mapping[str, Any] | None = None,
                 device: str | torch.device | None = None, amp: bool = True, overlap: float = 0.5,
                 classes: Mapping[str, str] | None = None, masks: bool = False, grid: str = "nndetection") -> None:
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
        self.grid = grid
        self.detectors, self.preprocessing = list(detectors), preprocessing
        self.patch_size, self.batch_size = [int(p) for p in patch_size], int(batch_size)
        self.num_tta, self.params = num_tta, (dict(params) if params is not None else None)
        self.device, self.amp, self.overlap = resolve_device(device), bool(amp), float(overlap)
        self.classes = {str(k): str(v) for k, v in (classes or {}).items()}
        self.masks = bool(masks)

    @property
    def dim(self) -> int:
        return len(self.patch_size)

    def check_image(self, image: Any, affine: Any) -> tuple[np.ndarray, np.ndarray]:
        """(float32 image, float64 affine); ValueError when the image is not ``[channels, *spatial]``."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != self.dim + 1:
            raise ValueError(f"image of shape {image.shape}: expected [channels, {self.dim} spatial axes]")
        return image, np.asarray(affine, dtype=np.float64)

    def predict(self, image: np.ndarray, affine: np.ndarray) -> tuple[Any, dict[str, Any]]:
        """(``inference.CasePrediction`` in preprocessed voxels, the preprocessing result with the bookkeeping
        ``inference.restore_boxes`` needs) of a checked image (:meth:`check_image`)."""
        pre = self.preprocessing({IMAGE_KEY: image, SPACING_KEY: spacing_from_affine(affine, self.dim)})
        arr = np.ascontiguousarray(to_numpy(pre[IMAGE_KEY]), dtype=np.float32)
        pred = predict_case(self.detectors, arr, self.patch_size, self.batch_size, num_tta=self.num_tta,
                            params=self.params, device=self.device, amp=self.amp, overlap=self.overlap,
                            masks=self.masks, grid=self.grid)
        return pred, pre

    def __call__(self, image: np.ndarray, affine: np.ndarray, case_id: str = "", **provenance: Any) -> dict[str, Any]:
        """Predict one image.

        Args:
            image: float ``[C, *spatial]`` in the NIfTI voxel axes (i, j, k) of the training data, one channel
                per modality in the bundle's modality order.
            affine: 4x4 (3D) RAS+ voxel-to-mm affine of those axes (spacing is read from it).
            case_id, provenance: recorded in the result (``task``, ``model``, ``folds``).

        Returns:
            The ``<case>_boxes.json`` fields: ``boxes`` [N, 2*dim] (original voxels, StandardMode, half-open),
            ``boxes_world_mm`` [N, 6] (RAS+ mm over voxel edges), ``scores`` [N] descending, ``labels`` [N]
            (0-based), ``class_names``, ``params`` (the postprocessing used), provenance.
        """
        image, affine = self.check_image(image, affine)
        pred, pre = self.predict(image, affine)
        det = pred.detections
        det = det.select(np.argsort(-det.scores, kind="stable"))  # WBC orders by cluster head, not final score
        record = prediction_record(case_id, det, pre, affine, self.classes, pred.params, **provenance)
        if self.masks:
            record["original_shape"] = [int(s) for s in image.shape[1:]]
            record["finding_masks"] = attach_masks(record, pred.seg_prob, pre, image.shape[1:])
        return record


ENSEMBLE_IOU = 0.5  # the plans' ensemble: nnDetection's ensembling IoU, as nndet_find_best scored it


def load_member_predictors(bundle_root: str | Path, members: Sequence[str], device: Any = None,
                           num_tta: int | None = None, amp: bool = True, overlap: float = 0.5,
                           masks: bool = False, grid: str = "nndetection") -> list[Predictor]:
    """The :class:`Predictor` of every member of a plan ensemble (``<bundle_root>/<member>/configs/inference.json``:
    each with its own preprocessing, network definition, weights and postprocessing), built with this bundle's
    scripts. ``masks`` goes to the first member only (the full-resolution plan; its segmentation head gives the
    masks of the merged boxes).

    Raises:
        FileNotFoundError: a member folder is missing (named).
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    out = []
    for i, member in enumerate(members):
        cfg = root / member / "configs" / "inference.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{cfg}: member of the plan ensemble missing; consolidate the ensemble again "
                                    "(`nndet_consolidate TASK --plans PLAN_A PLAN_B`)")
        parser = ConfigParser()
        parser.read_config(str(cfg))
        parser["bundle_root"] = str(root / member)
        parser["num_tta"], parser["amp"], parser["overlap"] = num_tta, bool(amp), float(overlap)
        parser["grid"] = grid
        parser["masks"] = bool(masks) and i == 0
        if device is not None:
            parser["device"] = device
        out.append(parser.get_parsed_content("predictor"))
    return out


class EnsemblePredictor:
    """The ensemble of several plans that ``nndet_find_best`` scored: every member :class:`Predictor` on the same
    image (each with its own preprocessing, folds x TTA and swept postprocessing), the boxes restored to the
    original voxels and there clustered by weighted box clustering (``inference.ensemble_members``, IoU
    ``ensemble_iou``, one expected vote per member) exactly as the out-of-fold comparison did. Called and
    answering like :class:`Predictor`, so the folder prediction and the MONAI Deploy app take either.

    Args:
        members: from :func:`load_member_predictors`; names: one per member (recorded with its parameters).
        classes: label index (str) -> class name.
        masks: a mask per merged box from the first member's segmentation head (``masks`` must have been given
            to that member too, as :func:`load_member_predictors` does).
    """

    def __init__(self, members: Sequence[Predictor], names: Sequence[str], ensemble_iou: float = ENSEMBLE_IOU,
                 classes: Mapping[str, str] | None = None, masks: bool = False) -> None:
        if not members or len(members) != len(names):
            raise ValueError(f"a plan ensemble needs one name per member, got {len(members)} member(s), "
                             f"names {list(names)}")
        if len({m.dim for m in members}) != 1:
            raise ValueError(f"members of different dimensions {[m.dim for m in members]}")
        self.members, self.names = list(members), [str(n) for n in names]
        self.ensemble_iou = float(ensemble_iou)
        self.classes = {str(k): str(v) for k, v in (classes or {}).items()}
        self.masks = bool(masks)

    @property
    def dim(self) -> int:
        return self.members[0].dim

    @property
    def detectors(self) -> list[nn.Module]:
        return [d for m in self.members for d in m.detectors]

    def __call__(self, image: np.ndarray, affine: np.ndarray, case_id: str = "", **provenance: Any) -> dict[str, Any]:
        """Predict one image; arguments and result as :meth:`Predictor.__call__` (``params``: each member's
        postprocessing and the ensembling IoU)."""
        image, affine = self.members[0].check_image(image, affine)
        dets, params, seg = [], {}, None
        for name, member in zip(self.names, self.members, strict=True):
            pred, pre = member.predict(image, affine)
            d = pred.detections
            dets.append(Detections(restore_boxes(d.boxes, pre), d.scores, d.labels))
            params[name] = pred.params
            if seg is None and pred.seg_prob is not None:
                seg = (pred.seg_prob, pre)
        det = ensemble_members(dets, ensemble_iou=self.ensemble_iou)
        det = det.select(np.argsort(-det.scores, kind="stable"))
        record = voxel_record(case_id, det.boxes, det.scores, det.labels, affine, self.classes,
                              {"members": params, "ensemble_iou": self.ensemble_iou}, **provenance)
        if self.masks:
            if seg is None:
                raise RuntimeError("masks asked of the plan ensemble, but its first member gave no segmentation "
                                   "(build the members with load_member_predictors(..., masks=True))")
            record["original_shape"] = [int(s) for s in image.shape[1:]]
            record["finding_masks"] = attach_masks(record, seg[0], seg[1], image.shape[1:])
        return record


def predict_folder(cases: Sequence[CaseFiles], output_dir: str | Path, predictor: Predictor, overwrite: bool = False,
                   task: str = "", model: str = "", folds: Sequence[int] = ()) -> Path:
    """Predict every case with ``predictor`` and write ``<output_dir>/<case>_boxes.json``; returns ``output_dir``.

    Args:
        cases: from ``find_cases``.
        predictor: the bundle's :class:`Predictor`.
        overwrite: recompute cases whose output exists (otherwise skipped).
        task, model, folds: recorded in the output.

    Output per case: see :meth:`Predictor.__call__` (scores in descending order: weighted box clustering
    orders by cluster head score, which ``workflow.predict.predict_test`` keeps; here they are re-sorted).
    """
    out = Path(output_dir)
    todo = [c for c in cases if overwrite or not (out / f"{c.case_id}{OUTPUT_SUFFIX}").is_file()
            or (predictor.masks and not (out / f"{c.case_id}{MASKS_SUFFIX}").is_file())]
    if len(todo) < len(cases):
        logger.info("%d case(s) already predicted in %s, skipped (overwrite to recompute)", len(cases) - len(todo), out)
    failures: list[tuple[str, str]] = []
    for files in tqdm(todo, desc=f"predict ({len(predictor.detectors)} fold(s))", unit="case"):
        try:  # one unreadable case must not decide the fate of the others
            case = load_case(files, predictor.dim, with_label=False)
            record = predictor(case.data, case.affine, files.case_id, task=task, model=model, folds=folds)
        except Exception as e:  # noqa: BLE001 -- reported with the case at the end
            why = "; ".join(f"{f}: {r}" for f, r in e.problems) if hasattr(e, "problems") else f"{type(e).__name__}: {e}"
            logger.error("case %s not predicted: %s", files.case_id, why)
            failures.append((files.case_id, why))
            continue
        write_prediction(record, out)
    if failures:
        raise CasesFailed(failures, out, len(cases) - len(failures))
    logger.info("predictions of %d case(s) in %s", len(cases), out)
    return out
