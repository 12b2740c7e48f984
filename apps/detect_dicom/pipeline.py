"""What the app does to one series, as plain functions the Deploy operators (and the DICOM node) call.

``load_model`` builds the consolidated bundle's ``predictor`` (its preprocessing definition, folds, TTA and
swept postprocessing: nothing of it is copied here) and reads the bundle's operating point;
``process_series`` turns the instances of one series into a :class:`~apps.detect_dicom.findings.DicomVolume`
(refusing what is not one regular volume), predicts it, and writes SR + SEG + JSON into
``<out>/<SeriesInstanceUID>/``. A refused or failed series gets a :class:`SeriesResult` with the reason and
no output files; the other series of the study go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apps.detect_dicom.findings import DicomVolume, Finding, findings_from_prediction
from planner.io import load_json, save_json

logger = logging.getLogger(__name__)

SR_NAME = "findings_sr.dcm"
SEG_NAME = "findings_seg.dcm"
JSON_NAME = "findings.json"
REPORT_NAME = "report.json"
DEFAULT_OPERATING_POINT = 0.5  # used only when the bundle records none (consolidated by an older version)
VOXEL_ORDER = "(slice, row, column) indices of the DICOM volume, slices along row x column cosine, half-open"


@dataclass
class Model:
    """A loaded consolidated bundle: the predictor, its identity and its operating point."""

    bundle: Path
    predictor: Any
    name: str
    version: str
    task: str
    classes: dict[str, str]
    modalities: dict[str, str]
    operating_point: float
    operating_point_source: str
    folds: list[int] = field(default_factory=list)


@dataclass
class SeriesResult:
    """What happened to one series: ``status`` is ``done``, ``rejected`` (not one regular volume, or not
    for this model) or ``failed`` (an error while predicting or writing); ``reason`` says why."""

    study_instance_uid: str
    series_instance_uid: str
    description: str
    status: str
    reason: str = ""
    num_boxes: int = 0
    num_findings: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def operating_point_of(meta: Mapping[str, Any], override: float | None = None) -> tuple[float, str]:
    """(score threshold, where it comes from): ``override``, else the bundle's validated operating point
    (``metadata.json`` -> ``nndet.operating_point.threshold``, written by ``nndet_consolidate``)."""
    if override is not None:
        return float(override), "--operating_point"
    op = meta.get("nndet", {}).get("operating_point")
    if isinstance(op, Mapping) and op.get("threshold") is not None:
        return float(op["threshold"]), f"bundle metadata ({op.get('rule', 'validation')})"
    logger.warning("the bundle records no operating point (consolidated by an older version?): using score >= %.2f; "
                   "consolidate again or pass --operating_point", DEFAULT_OPERATING_POINT)
    return DEFAULT_OPERATING_POINT, "default (the bundle records none)"


def load_model(bundle: str | Path, *, num_tta: int | None = None, device: str | None = None,
               operating_point: float | None = None, masks: bool = False) -> Model:
    """Build the consolidated bundle's ``predictor`` with ``monai.bundle.ConfigParser`` (``configs/inference.json``).

    ``masks``: the predictor also gives a mask per finding (the segmentation head, the bundle's ``scripts/masks.py``),
    which the SEG then holds instead of filled boxes.

    Raises:
        FileNotFoundError: ``bundle`` is not a consolidated bundle (the message says how to make one).
    """
    from monai.bundle import ConfigParser

    from workflow.bundle_code import load_scripts

    root = Path(bundle).resolve()
    cfg, meta_file = root / "configs" / "inference.json", root / "configs" / "metadata.json"
    if not cfg.is_file() or not meta_file.is_file():
        raise FileNotFoundError(f"{root}: not a consolidated bundle (no configs/inference.json + metadata.json); make "
                                "one with `nndet_consolidate TASK` and pass its consolidated/ folder with -m")
    meta = load_json(meta_file)
    load_scripts(root)
    parser = ConfigParser()
    parser.read_config(str(cfg))
    parser["bundle_root"] = str(root)
    if num_tta is not None:
        parser["num_tta"] = int(num_tta)
    if device is not None:
        parser["device"] = f"$torch.device('{device}')"
    if masks:
        if "masks" not in parser:
            raise ValueError(f"{cfg}: this consolidated bundle predates masks per finding; consolidate again")
        parser["masks"] = True
    if "predictor" not in parser:
        raise FileNotFoundError(f"{cfg}: no 'predictor' (made by an older nndet_consolidate); consolidate again")
    predictor = parser.get_parsed_content("predictor")
    op, source = operating_point_of(meta, operating_point)
    inf = parser.get()
    return Model(bundle=root, predictor=predictor, name=str(inf.get("model", root.parent.name)),
                 version=str(meta.get("version", "0")), task=str(inf.get("task", "")),
                 classes={str(k): str(v) for k, v in dict(inf.get("classes", {})).items()},
                 modalities={str(k): str(v) for k, v in dict(inf.get("modalities", {})).items()},
                 operating_point=op, operating_point_source=source, folds=[int(f) for f in inf.get("folds", [])])


def findings_json(volume: DicomVolume, findings: Sequence[Finding], model: Model) -> dict[str, Any]:
    """The JSON output: every box (any score) with class, LPS mm and voxel corners, centre slice UID."""
    return {
        "study_instance_uid": volume.study_instance_uid,
        "series_instance_uid": volume.series_instance_uid,
        "series_description": volume.description,
        "model": model.name, "model_version": model.version, "task": model.task, "folds": model.folds,
        "operating_point": {"threshold": model.operating_point, "source": model.operating_point_source},
        "world_frame": "LPS millimetres (DICOM patient coordinates): [min_x, min_y, min_z, max_x, max_y, max_z] "
                       "over voxel edges",
        "voxel_frame": VOXEL_ORDER,
        "volume_shape": list(volume.array.shape),
        "findings": [{
            "finding": f"Finding {f.index}", "index": f.index, "score": f.score, "label": f.label,
            "class_name": f.class_name, "above_operating_point": f.score >= model.operating_point,
            "box_lps_mm": list(f.box_lps_mm), "box_voxel": list(f.box_voxel),
            "center_slice": f.center_slice, "center_slice_sop_instance_uid": volume.sop_instance_uids[f.center_slice],
        } for f in findings],
    }


def check_modalities(volume: DicomVolume, model: Model) -> str | None:
    """Why this model cannot read the series (None when it can): one image per case, the same kind."""
    if len(model.modalities) != 1:
        return (f"the model takes {len(model.modalities)} modalities {model.modalities}; a DICOM series gives one "
                "(multi-series input is not supported)")
    modality = str(getattr(volume.datasets[0], "Modality", "")) if volume.datasets else ""
    trained = next(iter(model.modalities.values())).upper()
    if trained == "CT" and modality and modality != "CT":
        return f"series modality {modality}, the model was trained on CT"
    return None


def predict_volume(volume: DicomVolume, model: Model) -> list[Finding]:
    """Every box the bundle's predictor finds in ``volume`` (all scores), as findings of that volume."""
    image, affine = volume.nifti_view()
    record = model.predictor(np.ascontiguousarray(image)[None], affine, volume.series_instance_uid)
    return findings_from_prediction(record, volume, model.classes)


def write_outputs(volume: DicomVolume, findings: Sequence[Finding], model: Model, out_dir: Path,
                  series_number: int = 990) -> dict[str, str]:
    """SR (always), SEG (when a finding is above the operating point) and JSON into ``out_dir``, all or
    nothing: they are written into a temporary sibling folder that is renamed to ``out_dir`` at the end."""
    import shutil
    import uuid

    from apps.detect_dicom.seg import write_seg
    from apps.detect_dicom.sr import write_sr

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        names = {"sr": SR_NAME}
        write_sr(volume, list(findings), tmp / SR_NAME, operating_point=model.operating_point,
                 model_name=model.name, model_version=model.version, algorithm_name=f"nndet-monai {model.name}",
                 series_number=series_number)
        if write_seg(volume, list(findings), tmp / SEG_NAME, operating_point=model.operating_point,
                     series_number=series_number + 1) is not None:
            names["seg"] = SEG_NAME
        save_json(findings_json(volume, findings, model), tmp / JSON_NAME)
        names["json"] = JSON_NAME
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {k: str(out_dir / v) for k, v in names.items()}


def _series_result(datasets: Sequence[Any]) -> SeriesResult:
    first = datasets[0] if datasets else None
    return SeriesResult(str(getattr(first, "StudyInstanceUID", "")), str(getattr(first, "SeriesInstanceUID", "")),
                        str(getattr(first, "SeriesDescription", "")), "done")


def volume_step(datasets: Sequence[Any], model: Model) -> tuple[DicomVolume | None, SeriesResult]:
    """The series' volume, or None with the result saying why it was refused (not one regular volume, or
    not something this model reads)."""
    from apps.detect_dicom.volume import SeriesRejected, build_volume

    result = _series_result(datasets)
    t0 = time.perf_counter()
    try:
        volume = build_volume(datasets)
        why = check_modalities(volume, model)
        if why:
            raise SeriesRejected(result.series_instance_uid, result.description, why)
    except SeriesRejected as e:
        result.status, result.reason = "rejected", str(e)
        logger.warning("%s", e)
        volume = None
    except Exception as e:  # an unreadable series never stops the others
        result.status, result.reason = "failed", f"{type(e).__name__}: {e}"
        logger.exception("series %s (%s): no volume", result.series_instance_uid, result.description)
        volume = None
    result.seconds += time.perf_counter() - t0
    return volume, result


def detect_step(volume: DicomVolume, model: Model, result: SeriesResult) -> list[Finding] | None:
    """Every box of the series, or None (the result says why) when prediction failed."""
    t0 = time.perf_counter()
    try:
        findings = predict_volume(volume, model)
    except Exception as e:
        result.status, result.reason = "failed", f"prediction: {type(e).__name__}: {e}"
        logger.exception("series %s: prediction failed", result.series_instance_uid)
        findings = None
    result.seconds += time.perf_counter() - t0
    return findings


def write_step(volume: DicomVolume, findings: Sequence[Finding], model: Model, out_root: str | Path,
               result: SeriesResult, overwrite: bool = False) -> None:
    """SR + SEG + JSON of the series into ``<out_root>/<series UID>/`` (the result records them); an existing
    folder of that series is kept (status ``exists``) unless ``overwrite``."""
    import shutil

    t0 = time.perf_counter()
    target = Path(out_root) / volume.series_instance_uid
    if target.exists() and not overwrite:
        result.status, result.reason = "exists", f"{target} exists (kept; --overwrite replaces it)"
        logger.warning("%s", result.reason)
        return
    try:
        if target.exists():
            shutil.rmtree(target)
        result.outputs = write_outputs(volume, findings, model, Path(out_root) / volume.series_instance_uid)
        result.num_boxes = len(findings)
        result.num_findings = int(sum(f.score >= model.operating_point for f in findings))
        logger.info("series %s (%s): %d box(es), %d finding(s) >= %.3f -> %s", result.series_instance_uid,
                    result.description, result.num_boxes, result.num_findings, model.operating_point,
                    Path(out_root) / volume.series_instance_uid)
    except Exception as e:
        result.status, result.reason = "failed", f"writing outputs: {type(e).__name__}: {e}"
        logger.exception("series %s: outputs not written", result.series_instance_uid)
    result.seconds = round(result.seconds + time.perf_counter() - t0, 2)


def process_series(datasets: Sequence[Any], model: Model, out_root: str | Path,
                   overwrite: bool = False) -> SeriesResult:
    """One series end to end (volume, prediction, outputs in ``<out_root>/<series UID>/``); never raises for a
    bad series: the result's ``status`` and ``reason`` say what happened."""
    volume, result = volume_step(datasets, model)
    if volume is not None:
        findings = detect_step(volume, model, result)
        if findings is not None:
            write_step(volume, findings, model, out_root, result, overwrite)
    return result


def write_report(results: Sequence[SeriesResult], model: Model, out_root: str | Path,
                 skipped: Sequence[Mapping[str, str]] = (), path: str | Path | None = None) -> Path:
    """``<out_root>/report.json`` (or ``path``): per series its status, reason, counts and outputs; series not
    selected."""
    out = Path(path) if path is not None else Path(out_root) / REPORT_NAME
    save_json({"model": model.name, "model_version": model.version, "bundle": str(model.bundle),
               "operating_point": model.operating_point, "series": [r.to_dict() for r in results],
               "not_selected": list(skipped)}, out)
    return out
