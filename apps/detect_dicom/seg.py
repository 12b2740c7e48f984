"""The findings of one series as a DICOM Segmentation (highdicom): one segment per finding above the operating
point, labelled and tracked like the SR's groups. A segment is the finding's mask when the predictor made masks
(``--masks``: the segmentation head's foreground inside the box), else (or when that mask is empty) its box filled.

Only the slices a box spans are source images of the SEG (empty frames are never written), so a 300-slice CT
with a few small findings stays small in memory and on disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np

from apps.detect_dicom import codes as cc
from apps.detect_dicom.findings import DicomVolume, Finding
from apps.detect_dicom.sr import MANUFACTURER, comment

SERIES_DESCRIPTION = "nndet findings (SEG)"


def build_seg(volume: DicomVolume, findings: Sequence[Finding], *, operating_point: float, model_name: str = "",
              model_version: str = "0", series_number: int = 991) -> hd.seg.Segmentation | None:
    """The SEG of the findings with ``score >= operating_point``; None when there is none."""
    shown = [f for f in findings if f.score >= operating_point]
    if not shown:
        return None
    slices = sorted({s for f in shown for s in range(f.box_voxel[0], f.box_voxel[3])})
    where = {s: n for n, s in enumerate(slices)}
    rows, cols = volume.array.shape[1:]
    mask = np.zeros((len(slices), rows, cols, len(shown)), dtype=bool)
    algorithm = hd.AlgorithmIdentificationSequence(name=f"nndet-monai {model_name}"[:64], version=str(model_version),
                                                   family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"))
    segments = []
    for n, f in enumerate(shown):
        s0, r0, c0, s1, r1, c1 = f.box_voxel
        own = f.mask if f.mask is not None and f.mask.any() else True
        mask[where[s0]:where[s1 - 1] + 1, r0:r1, c0:c1, n] = own
        segments.append(hd.seg.SegmentDescription(
            segment_number=n + 1, segment_label=f"Finding {f.index}: {comment(f)}"[:64],
            segmented_property_category=cc.MORPHOLOGIC_ABNORMALITY, segmented_property_type=cc.finding_type(f.class_name),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=f"Finding {f.index}"))
    return hd.seg.Segmentation(
        source_images=[volume.datasets[s] for s in slices], pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=(model_name or "nndet-monai")[:64],
        software_versions=str(model_version), device_serial_number="0", series_description=SERIES_DESCRIPTION)


def write_seg(volume: DicomVolume, findings: Sequence[Finding], path: str | Path, **kwargs) -> Path | None:
    """Build the SEG (:func:`build_seg`'s keyword arguments) and write it atomically; None (nothing written)
    when no finding reaches the operating point."""
    seg = build_seg(volume, findings, **kwargs)
    if seg is None:
        return None
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
