"""The app's two data types and the one place where DICOM and NIfTI conventions meet.

* :class:`DicomVolume`: one regular image volume built from a DICOM series, its array in the volume's
  ``(slice, row, column)`` index order, slices ordered along the slice normal ``row cosine x column cosine``
  (so index 0 is the first slice in that direction), with the affine from ``(slice, row, column)`` voxel
  indices to LPS millimetres (DICOM patient coordinates) and each slice's SOP Instance UID.
* :class:`Finding`: one detected box in that volume: half-open voxel indices ``[s0, r0, c0, s1, r1, c1)``
  (voxel ``s`` spans the voxel edges ``s .. s + 1``, so in a slice's pixel coordinates (column, row), whose
  origin is the top-left corner of the top-left pixel, the box's edges are exactly ``c0, c1`` and
  ``r0, r1``) and its world corners in LPS mm over voxel edges.

The detector (a consolidated bundle's predictor) works in the NIfTI convention of the training data:
array axes ``(i, j, k)`` = ``(column, row, slice)`` and a RAS+ affine. :meth:`DicomVolume.nifti_view` and
:func:`findings_from_prediction` convert between the two, once, here: RAS = LPS with x and y negated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# (slice, row, column) <-> (i, j, k) = (column, row, slice): the permutation is its own inverse
SRC_TO_IJK = (2, 1, 0)


@dataclass(frozen=True)
class DicomVolume:
    """One regular volume of a DICOM series (see module docstring).

    Attributes:
        array: float32 ``[slices, rows, columns]``, modality values (rescale slope/intercept applied).
        affine: 4x4, ``(slice, row, column, 1)`` voxel index -> LPS mm (voxel centres).
        sop_instance_uids: per slice index, the SOP Instance UID of the source instance.
        study_instance_uid, series_instance_uid, frame_of_reference_uid: of the source series.
        datasets: the source instances (pydicom Datasets, pixel data may be dropped) in slice-index order;
            SR and SEG writers reference them.
        description: Series Description (for messages).
    """

    array: np.ndarray
    affine: np.ndarray
    sop_instance_uids: tuple[str, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    datasets: tuple[Any, ...] = field(repr=False, default=())
    description: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def nifti_view(self) -> tuple[np.ndarray, np.ndarray]:
        """``(array [i, j, k] = [column, row, slice], RAS+ affine of (i, j, k))`` as nibabel would load a
        NIfTI made of this series; the array is a view, not a copy."""
        arr = np.transpose(self.array, SRC_TO_IJK)
        aff = LPS_TO_RAS @ self.affine[:, [*SRC_TO_IJK, 3]]
        return arr, aff


@dataclass(frozen=True)
class Finding:
    """One detected object in a :class:`DicomVolume` (see module docstring).

    Attributes:
        index: 1-based rank by score within its series ("Finding 1" is the highest score).
        label: 0-based class index of the bundle's label map; class_name: its name.
        score: detector probability in [0, 1].
        box_voxel: ``(s0, r0, c0, s1, r1, c1)`` half-open voxel indices of the volume.
        box_lps_mm: ``(x0, y0, z0, x1, y1, z1)`` min/max LPS corners in mm over voxel edges.
    """

    index: int
    label: int
    class_name: str
    score: float
    box_voxel: tuple[int, int, int, int, int, int]
    box_lps_mm: tuple[float, float, float, float, float, float]
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def center_slice(self) -> int:
        """Index of the slice through the box's centre (the slice its 2D outline is drawn on)."""
        s0, s1 = self.box_voxel[0], self.box_voxel[3]
        return int((s0 + s1 - 1) // 2)

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Box size along LPS x, y, z (mm)."""
        b = self.box_lps_mm
        return (b[3] - b[0], b[4] - b[1], b[5] - b[2])


def voxel_box_to_lps(box_voxel: Sequence[float], affine: np.ndarray) -> tuple[float, ...]:
    """Axis-aligned LPS min/max corners (mm) of a half-open voxel box, over voxel edges: the 8 corners
    ``index - 0.5`` .. ``end - 0.5`` through ``affine`` (voxel centres at integer indices)."""
    lo = np.asarray(box_voxel[:3], float) - 0.5
    hi = np.asarray(box_voxel[3:], float) - 0.5
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    world = (affine[:3, :3] @ corners.T).T + affine[:3, 3]
    return (*world.min(axis=0).tolist(), *world.max(axis=0).tolist())


def findings_from_prediction(pred: Mapping[str, Any], volume: DicomVolume,
                             classes: Mapping[str, str] | Sequence[str]) -> list[Finding]:
    """Findings of one prediction made on :meth:`DicomVolume.nifti_view` (all boxes, any score).

    Args:
        pred: ``boxes`` [N, 6] half-open voxel boxes in (i, j, k) = (column, row, slice) order,
            ``scores`` [N], ``labels`` [N] (0-based), as the bundle's predictor returns them.
        volume: the volume the prediction was made on.
        classes: label index -> class name (the bundle's ``{"0": "nodule"}`` or a list).
            With ``finding_masks`` in ``pred`` (a predictor with masks on) each finding gets its ``mask``:
            bool ``[s1 - s0, r1 - r0, c1 - c0]`` over its ``box_voxel`` (slice, row, column order).

    Returns:
        Findings sorted by descending score, ``index`` 1..N, boxes on the nearest voxel edges, clipped to the
        volume, at least one voxel thick.
    """
    boxes = np.asarray(pred["boxes"], float).reshape(-1, 6)
    scores = np.asarray(pred["scores"], float).reshape(-1)
    labels = np.asarray(pred["labels"], int).reshape(-1)
    names = (lambda i: classes[str(i)]) if isinstance(classes, Mapping) else (lambda i: classes[i])
    shape = np.asarray(volume.array.shape)
    out = []
    for rank, n in enumerate(np.argsort(-scores, kind="stable"), start=1):
        i0, j0, k0, i1, j1, k1 = boxes[n]
        # nearest voxel edge (WBC averages make fractional boxes): within half a voxel of the prediction
        # a box on (or past) the far edge keeps its last voxel: lo <= shape - 1, so it is never empty
        lo = np.clip(np.rint([k0, j0, i0]), 0, shape - 1).astype(int)
        hi = np.clip(np.rint([k1, j1, i1]), 0, shape).astype(int)
        hi = np.maximum(hi, lo + 1)
        vox = (*lo.tolist(), *hi.tolist())
        mask = _mask_in_box(pred["finding_masks"][n], vox) if "finding_masks" in pred else None
        out.append(Finding(rank, int(labels[n]), str(names(int(labels[n]))), float(scores[n]), vox,
                           voxel_box_to_lps(vox, volume.affine), mask))
    return out


def _mask_in_box(finding_mask: Any, box: tuple[int, ...]) -> np.ndarray:
    """A predictor's mask (``offset`` + ``mask`` in (i, j, k) = (column, row, slice)) on the finding's box
    (slice, row, column), the part outside the box dropped."""
    m = np.transpose(np.asarray(finding_mask.mask, bool), (2, 1, 0))
    off = np.asarray(finding_mask.offset[::-1], int)
    lo, hi = np.asarray(box[:3], int), np.asarray(box[3:], int)
    out = np.zeros(tuple(hi - lo), bool)
    a, b = np.maximum(lo, off), np.minimum(hi, off + m.shape)
    if (b > a).all():
        out[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, lo, strict=True))] = \
            m[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, off, strict=True))]
    return out
