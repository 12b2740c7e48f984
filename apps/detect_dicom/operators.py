"""The app's own operators (named ports), each a thin shell over a :mod:`apps.detect_dicom.pipeline` step.

``VolumeOperator`` (``study_selected_series_list`` -> ``volumes``), ``DetectionOperator`` (``volumes`` ->
``detections``), ``WriterOperator`` (``detections`` -> SR + SEG + JSON per series and ``report.json``).
Study loading and series selection are the SDK's ``DICOMDataLoaderOperator`` and our
:class:`~apps.detect_dicom.selection.SeriesSelector`. A series that fails a step carries its
:class:`~apps.detect_dicom.pipeline.SeriesResult` (status and reason) to the report instead of stopping
the graph.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from apps.detect_dicom import pipeline

logger = logging.getLogger(__name__)


def native_datasets(series) -> list:
    """The pydicom Datasets of an SDK ``DICOMSeries``."""
    return [sop.get_native_sop_instance() for sop in series.get_sop_instances()]


class VolumeOperator(Operator):
    """Each selected series -> (volume or None, its result); refusals carry their reason."""

    def __init__(self, fragment: Fragment, *args, model: pipeline.Model, **kwargs) -> None:
        self.model = model
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study_selected_series_list")
        spec.output("volumes")

    def compute(self, op_input, op_output, context) -> None:
        selected = op_input.receive("study_selected_series_list") or []
        out = [pipeline.volume_step(native_datasets(s.series), self.model)
               for study in selected for s in study.selected_series]
        op_output.emit(out, "volumes")


class DetectionOperator(Operator):
    """Each volume through the consolidated bundle's predictor -> (volume, findings or None, result)."""

    def __init__(self, fragment: Fragment, *args, model: pipeline.Model, **kwargs) -> None:
        self.model = model
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volumes")
        spec.output("detections")

    def compute(self, op_input, op_output, context) -> None:
        out = []
        for volume, result in op_input.receive("volumes") or []:
            findings = pipeline.detect_step(volume, self.model, result) if volume is not None else None
            out.append((volume, findings, result))
        op_output.emit(out, "detections")


class WriterOperator(Operator):
    """SR + SEG + JSON per detected series into ``<output>/<SeriesInstanceUID>/`` and ``<output>/report.json``
    (or ``report_file``).

    ``self.results`` holds the series results of the last run (the CLI prints and returns them).
    """

    def __init__(self, fragment: Fragment, *args, model: pipeline.Model, output_folder: Path, selector=None,
                 overwrite: bool = False, report_file: Path | None = None, **kwargs) -> None:
        self.model, self.output_folder, self.selector, self.overwrite = model, Path(output_folder), selector, overwrite
        self.report_file = report_file
        self.results: list[pipeline.SeriesResult] = []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("detections")

    def compute(self, op_input, op_output, context) -> None:
        self.results = []
        for volume, findings, result in op_input.receive("detections") or []:
            if volume is not None and findings is not None:
                pipeline.write_step(volume, findings, self.model, self.output_folder, result, self.overwrite)
            self.results.append(result)
        skipped = getattr(self.selector, "skipped", [])
        pipeline.write_report(self.results, self.model, self.output_folder, skipped, path=self.report_file)
