"""The detection app: a DICOM study in, per selected series a TID 1500 SR, a SEG and a JSON of the findings.

``compose()`` wires five named-port operators::

    DICOMDataLoaderOperator --dicom_study_list--> SeriesSelector --study_selected_series_list--> VolumeOperator
        --volumes--> DetectionOperator --detections--> WriterOperator (SR + SEG + JSON, report.json)

Run it as ``python -m apps.detect_dicom -i DICOM_DIR -o OUT_DIR -m CONSOLIDATED_BUNDLE`` (or
``nndet_predict_dicom``), or with ``HOLOSCAN_INPUT_PATH`` / ``HOLOSCAN_OUTPUT_PATH`` / ``HOLOSCAN_MODEL_PATH``
set and no flags, as a MAP container starts it. The consolidated bundle is the only source of
preprocessing, network and postprocessing; its metadata gives the operating point.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators import DICOMDataLoaderOperator

from apps.detect_dicom import pipeline
from apps.detect_dicom.operators import DetectionOperator, VolumeOperator, WriterOperator
from apps.detect_dicom.selection import DEFAULT_RULES, SeriesSelector, load_rules

logger = logging.getLogger(__name__)

ENV_INPUT, ENV_OUTPUT, ENV_MODEL = "HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH"


class DetectionApp(Application):
    """The MONAI Deploy application; build it with :meth:`configure` before ``run()``."""

    def configure(self, input_dir: Path, output_dir: Path, model: pipeline.Model, rules: dict,
                  overwrite: bool = False, report_file: Path | None = None) -> DetectionApp:
        self.input_dir, self.output_dir, self.model, self.rules = Path(input_dir), Path(output_dir), model, rules
        self.overwrite, self.report_file = overwrite, report_file
        self.writer: WriterOperator | None = None
        return self

    def compose(self) -> None:
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=self.input_dir,
                                         name="dicom_loader")
        selector = SeriesSelector(self, rules=self.rules, name="series_selector")
        volumes = VolumeOperator(self, model=self.model, name="volume_builder")
        detector = DetectionOperator(self, model=self.model, name="detector")
        self.writer = WriterOperator(self, model=self.model, output_folder=self.output_dir, selector=selector,
                                     overwrite=self.overwrite, report_file=self.report_file, name="writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, volumes, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(volumes, detector, {("volumes", "volumes")})
        self.add_flow(detector, self.writer, {("detections", "detections")})


def resolve_bundle(path: str | Path) -> Path:
    """The consolidated bundle folder: ``path`` itself, or its only subfolder that is one (a MAP puts models
    under ``/opt/holoscan/models/<name>/``)."""
    p = Path(path)
    if (p / "configs" / "inference.json").is_file():
        return p
    subs = [d for d in sorted(p.iterdir()) if (d / "configs" / "inference.json").is_file()] if p.is_dir() else []
    if len(subs) == 1:
        return subs[0]
    raise FileNotFoundError(f"{p}: no consolidated bundle (configs/inference.json) here or in exactly one subfolder; "
                            "pass the consolidated/ folder made by `nndet_consolidate TASK` with -m")


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m apps.detect_dicom") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description="Detect objects in a DICOM study with a consolidated nndet bundle: per selected "
        "series a TID 1500 SR (boxes the viewer draws), a DICOM SEG and a JSON of every box.",
        epilog="examples:\n  python -m apps.detect_dicom -i study/ -o out/ -m $det_models/Task.../consolidated\n"
               "  HOLOSCAN_INPUT_PATH=study HOLOSCAN_OUTPUT_PATH=out HOLOSCAN_MODEL_PATH=bundle python -m apps.detect_dicom",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", default=None, help=f"folder of DICOM files (default ${ENV_INPUT})")
    p.add_argument("-o", "--output", default=None, help=f"output folder (default ${ENV_OUTPUT})")
    p.add_argument("-m", "--model", default=None, help=f"consolidated bundle folder (default ${ENV_MODEL})")
    p.add_argument("--rules", default=None, help=f"series selection rules JSON (default {DEFAULT_RULES.name} beside "
                   "the app)")
    p.add_argument("--operating_point", type=float, default=None, help="score threshold for SR/SEG findings "
                   "(default: the bundle's validated operating point)")
    p.add_argument("--num_tta", type=int, default=None, help="mirror TTA per fold (1, 4 or 8; default the bundle's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace a series' existing output folder")
    p.add_argument("--masks", action="store_true", help="a mask per finding from the segmentation head in the SEG "
                   "(default: each finding's box filled)")
    p.add_argument("--processes", "--gpus", dest="processes", type=int, default=1, metavar="N",
                   help="split the series over N processes, one per GPU (cuda:0..N-1), or N CPU processes when there "
                        "is no GPU (or with --device cpu); series with outputs are not predicted again (default 1)")
    p.add_argument("-l", "--log-level", dest="log_level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def _path(value: str | None, env: str, what: str, must_exist: bool = True) -> Path:
    v = value or os.environ.get(env)
    if not v:
        raise ValueError(f"no {what}: pass it as a flag or set {env}")
    path = Path(v)
    if must_exist and not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def run_app(input_dir: Path, output_dir: Path, model: pipeline.Model, rules: dict,
            overwrite: bool = False, report_file: Path | None = None) -> list[pipeline.SeriesResult]:
    """Run the Deploy application on one input folder; returns the series results (also in report.json, or in
    ``report_file``)."""
    if not any(f.is_file() for f in Path(input_dir).rglob("*")):
        raise FileNotFoundError(f"{input_dir}: no file to read (expected the DICOM instances of a study)")
    output_dir.mkdir(parents=True, exist_ok=True)
    app = DetectionApp().configure(input_dir, output_dir, model, rules, overwrite, report_file)
    app.run()
    return list(app.writer.results) if app.writer is not None else []


def main(argv: Sequence[str] | None = None, prog: str = "python -m apps.detect_dicom") -> int:
    """Command line entry point; returns 0 when every selected series got its outputs, 1 when one failed or
    was refused, 2 on a usage error (before anything is written)."""
    a = parse_args(argv, prog)
    logging.basicConfig(level=a.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        input_dir = _path(a.input, ENV_INPUT, "input folder")
        output_dir = _path(a.output, ENV_OUTPUT, "output folder", must_exist=False)
        bundle = resolve_bundle(_path(a.model, ENV_MODEL, "model (consolidated bundle)"))
        rules = load_rules(a.rules)
        if a.processes > 1:
            from apps.detect_dicom.batch import run_sharded

            results = run_sharded(run_app, input_dir, output_dir, bundle, rules, a.processes, num_tta=a.num_tta,
                                  device=a.device, operating_point=a.operating_point, overwrite=a.overwrite,
                                  masks=a.masks)
        else:
            model = pipeline.load_model(bundle, num_tta=a.num_tta, device=a.device, operating_point=a.operating_point,
                                        masks=a.masks)
            results = run_app(input_dir, output_dir, model, rules, a.overwrite)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        line = f"{r.status:<9} {r.series_instance_uid} ({r.description or 'no description'})"
        line += f": {r.num_findings} finding(s) of {r.num_boxes} box(es)" if r.status == "done" else f": {r.reason}"
        print(line)
    print(f"report: {output_dir / pipeline.REPORT_NAME}")
    if not results:
        print("no series selected (see report.json for why each series was skipped)", file=sys.stderr)
        return 1
    return 0 if all(r.status in ("done", "exists") for r in results) else 1


def console_main() -> None:
    """``nndet_predict_dicom`` (nnDetection-style name of the same command)."""
    sys.exit(main(prog="nndet_predict_dicom"))
