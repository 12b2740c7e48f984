"""The app on a folder of many series, split over N processes (``--processes N``; one per GPU, or N CPU
processes when there is none, :mod:`planner.shards`).

This process reads the headers only (:func:`series_in_folder`: which file belongs to which series, in the
order the SDK's loader lists them), keeps the series whose output folder exists (``exists``, unless
``overwrite``), and deals the others round-robin (by Series Instance UID) to the processes. Each process loads
the bundle once on its device and runs the unchanged Deploy application on a folder of links to its series'
files, so selection, refusals and outputs are what one process would make; its report comes back here and
:func:`run_sharded` writes the one ``report.json``, series in input order. A process that fails or dies marks
its unfinished series ``failed``; the others go on.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.detect_dicom import pipeline
from planner.io import load_json, make_temp_dir, save_json
from planner.shards import assign_devices, run_shards, split_round_robin, written_since

logger = logging.getLogger(__name__)

HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription"]


@dataclass
class SeriesFiles:
    """The files of one series of the input folder (absolute paths, listing order)."""

    study_instance_uid: str
    series_instance_uid: str
    description: str
    files: list[str] = field(default_factory=list)

    def result(self, status: str, reason: str = "") -> pipeline.SeriesResult:
        return pipeline.SeriesResult(self.study_instance_uid, self.series_instance_uid, self.description, status,
                                     reason)


def _list_files(folder: str, out: list[str]) -> None:
    """Every file under ``folder``, in the SDK loader's order (``DICOMDataLoaderOperator._list_files``)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            _list_files(path, out)
        else:
            out.append(path)


def series_in_folder(input_dir: str | Path) -> list[SeriesFiles]:
    """The DICOM series under ``input_dir`` (headers only, no pixel data read), in order of first appearance.

    Files that are not DICOM or carry no Series Instance UID are left out (the loader ignores them too).
    """
    import pydicom

    files: list[str] = []
    _list_files(str(Path(input_dir).resolve()), files)
    series: dict[str, SeriesFiles] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except Exception as e:  # noqa: BLE001 -- not DICOM: the loader skips it as well
            logger.debug("%s: not read as DICOM (%s)", f, e)
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            logger.debug("%s: no SeriesInstanceUID, ignored", f)
            continue
        if uid not in series:
            series[uid] = SeriesFiles(str(getattr(ds, "StudyInstanceUID", "") or ""), uid,
                                      str(getattr(ds, "SeriesDescription", "") or ""))
        series[uid].files.append(f)
    return list(series.values())


def _link_folder(series: Sequence[SeriesFiles], folder: Path) -> Path:
    """A folder of symbolic links to the files of ``series`` (the loader follows them)."""
    folder.mkdir(parents=True)
    i = 0
    for s in series:
        for f in s.files:
            (folder / f"{i:06d}_{Path(f).name}").symlink_to(f)
            i += 1
    return folder


def _shard(series: list[SeriesFiles], device: str, run_app: Callable[..., Any], tmp: str, output_dir: str,
           bundle: str, rules: dict, num_tta: int | None, operating_point: float | None,
           overwrite: bool, masks: bool = False) -> dict[str, Any]:
    """One process's share: the app (``run_app``) on a folder of links to its series; returns its report."""
    own = make_temp_dir("shard-", dir=tmp)
    links, report = _link_folder(series, own / "dicom"), own / pipeline.REPORT_NAME
    model = pipeline.load_model(bundle, num_tta=num_tta, device=device, operating_point=operating_point, masks=masks)
    run_app(links, Path(output_dir), model, rules, overwrite, report_file=report)
    return load_json(report)


def _report_header(bundle: Path, operating_point: float | None) -> dict[str, Any]:
    """The report's model fields as :func:`pipeline.load_model` reads them, without building the predictor."""
    meta, inf = load_json(bundle / "configs" / "metadata.json"), load_json(bundle / "configs" / "inference.json")
    op, _ = pipeline.operating_point_of(meta, operating_point)
    return {"model": str(inf.get("model", bundle.parent.name)), "model_version": str(meta.get("version", "0")),
            "bundle": str(bundle), "operating_point": op}


def _from_outputs(s: SeriesFiles, out: Path, why: str, since_ns: int) -> pipeline.SeriesResult:
    """The result of a series of a shard that gave no report: ``done`` when its outputs were written (after
    ``since_ns``), else ``failed`` with ``why``."""
    findings = out / s.series_instance_uid / pipeline.JSON_NAME
    if not written_since(findings, since_ns):
        return s.result("failed", why)
    found = load_json(findings)["findings"]
    r = s.result("done")
    r.num_boxes, r.num_findings = len(found), sum(bool(f["above_operating_point"]) for f in found)
    r.outputs = {k: str(out / s.series_instance_uid / n) for k, n in
                 (("sr", pipeline.SR_NAME), ("seg", pipeline.SEG_NAME), ("json", pipeline.JSON_NAME))
                 if (out / s.series_instance_uid / n).is_file()}
    return r


def run_sharded(run_app: Callable[..., Any], input_dir: Path, output_dir: Path, bundle: Path, rules: dict,
                processes: int, *, num_tta: int | None = None, device: str | None = None,
                operating_point: float | None = None, overwrite: bool = False,
                masks: bool = False) -> list[pipeline.SeriesResult]:
    """The app on every series of ``input_dir`` with ``processes`` processes; writes ``<output_dir>/report.json``
    and returns the series results in input order (the statuses of one process).

    Args:
        run_app: the app on one folder, :func:`apps.detect_dicom.app.run_app` (passed in, as that module calls
            this one; each process imports it by name).

    Raises:
        ValueError: more processes than visible GPUs (when there are any).
        FileNotFoundError: no DICOM series in ``input_dir``.
    """
    bundle = Path(bundle).resolve()
    devices = assign_devices(processes, device)
    series = series_in_folder(input_dir)
    if not series:
        raise FileNotFoundError(f"{input_dir}: no DICOM series (expected the DICOM instances of one or more studies)")
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, pipeline.SeriesResult] = {}
    for s in series:
        target = output_dir / s.series_instance_uid
        if target.exists() and not overwrite:  # what the writer says, without predicting the series again
            results[s.series_instance_uid] = s.result("exists", f"{target} exists (kept; --overwrite replaces it)")
    todo = [s for s in series if s.series_instance_uid not in results]
    logger.info("%d series in %s: %d to do, %d with outputs already", len(series), input_dir, len(todo),
                len(series) - len(todo))
    skipped: list[dict[str, str]] = []
    if todo:
        tmp, t0 = make_temp_dir("nndet-shards-"), time.time_ns()
        try:
            shards = split_round_robin(todo, processes, key=lambda s: s.series_instance_uid)
            outcomes = run_shards(_shard, shards, devices[: len(shards)],
                                  (run_app, str(tmp), str(output_dir), str(bundle), rules, num_tta, operating_point,
                                   overwrite, masks),
                                  desc="series", unit="series")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for o in outcomes:
            if o.error is None:
                results.update({r["series_instance_uid"]: pipeline.SeriesResult(**r) for r in o.result["series"]})
                skipped += o.result["not_selected"]
            else:
                results.update({s.series_instance_uid: _from_outputs(s, output_dir, o.error, t0) for s in o.items})
    order = {s.series_instance_uid: i for i, s in enumerate(series)}
    ordered = sorted(results.values(), key=lambda r: order.get(r.series_instance_uid, len(order)))
    skipped.sort(key=lambda s: order.get(s["series_instance_uid"], len(order)))
    save_json({**_report_header(bundle, operating_point), "series": [r.to_dict() for r in ordered],
               "not_selected": skipped}, output_dir / pipeline.REPORT_NAME)
    return ordered
