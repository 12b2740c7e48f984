"""`nndet_boxes2nii`: box predictions as an instance NIfTI + JSON, for viewers (ITK-SNAP, 3D Slicer).

Each kept box (score >= threshold) becomes one instance id (1 = highest score) filled into a label image
with the geometry (shape, affine) of the case's original image; where boxes overlap, the higher-scoring box
keeps the voxel. A voxel belongs to a box when its centre lies inside the box: a half-open StandardMode box
[x1, x2) covers voxels ``ceil(x1 - 0.5) .. ceil(x2 - 0.5) - 1`` (so an integer box [i, j) covers i..j-1).
The JSON next to it maps instance -> class (nnDetection's ``{"instances": {...}}`` layout) and
instance -> score and class name.

With masks (``nndet_boxes2nii --masks``, predictions of ``nndet_predict --masks``) each instance is the
finding's mask from the segmentation head instead of its box (same ids, same overlap rule).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from planner.io import atomic_path, load_json, save_json

logger = logging.getLogger(__name__)


def voxel_ranges(box: Sequence[float], shape: Sequence[int]) -> tuple[slice, ...]:
    """Slices of the voxels whose centres lie inside a half-open StandardMode box, clipped to ``shape``."""
    d = len(shape)
    lo = [max(0, int(np.ceil(box[a] - 0.5))) for a in range(d)]
    hi = [min(int(shape[a]), int(np.ceil(box[a + d] - 0.5))) for a in range(d)]
    return tuple(slice(lo[a], max(lo[a], hi[a])) for a in range(d))


def rasterize_boxes(boxes: np.ndarray, scores: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Instance map ``[*shape]`` (uint16 0 background, 1.. by decreasing score) and the box order used.

    Args:
        boxes: ``[N, 2*dim]`` StandardMode voxel boxes of an image of ``shape``.
        scores: ``[N]``; higher-scoring boxes are drawn last, so they win overlapping voxels.

    Returns:
        (instance map, ``order``: instance ``k + 1`` is box ``order[k]``).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 2 * len(shape))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if len(order) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(order)} boxes do not fit a uint16 instance map; raise the score threshold")
    seg = np.zeros(tuple(int(s) for s in shape), dtype=np.uint16)
    for k in order[::-1]:  # lowest score first
        seg[voxel_ranges(boxes[k], shape)] = np.nonzero(order == k)[0][0] + 1
    return seg, order


def boxes_to_nifti(prediction_json: str | os.PathLike, reference_image: str | os.PathLike,
                   out_dir: str | os.PathLike, score_threshold: float = 0.5, overwrite: bool = False,
                   masks_module: Any = None) -> Path:
    """Write ``<out_dir>/<case>_boxes.nii.gz`` + ``<case>_boxes.json`` from a ``*_boxes.json`` prediction.

    Args:
        prediction_json: a file of ``nndet_predict`` (``boxes`` in original voxels, ``scores``, ``labels``,
            ``class_names``).
        reference_image: the case's original image (``<case>_0000.nii.gz``): shape and affine of the output.
        out_dir: output folder.
        score_threshold: keep boxes with ``score >= score_threshold``.
        overwrite: replace existing outputs.
        masks_module: the bundle's ``scripts.masks``: fill each finding's mask (the prediction's ``masks_file``)
            instead of its box.

    Returns:
        Path of the NIfTI file.
    """
    pred = load_json(prediction_json)
    case = pred["case_id"]
    out = Path(out_dir) / f"{case}_boxes.nii.gz"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    ref = nib.load(str(reference_image))
    dim = len(pred["boxes"][0]) // 2 if pred["boxes"] else min(3, len(ref.shape))
    shape = ref.shape[:dim]
    boxes = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 2 * dim)
    scores = np.asarray(pred["scores"], dtype=np.float64)
    keep = scores >= score_threshold
    seg, order = rasterize_boxes(boxes[keep], scores[keep], shape)
    if masks_module is not None:
        if "masks_file" not in pred:
            raise FileNotFoundError(f"{prediction_json}: predicted without masks; run nndet_predict --masks first")
        masks, _ = masks_module.load_masks(Path(prediction_json).parent / pred["masks_file"])
        kept = np.nonzero(keep)[0][order]  # instance k + 1 is finding kept[k], as for the boxes
        seg = masks_module.paint_masks(masks, shape, keep=kept, scores=scores).astype(np.uint16)
    labels = np.asarray(pred["labels"])[keep][order]
    names = np.asarray(pred.get("class_names", [str(c) for c in pred["labels"]]), dtype=object)[keep][order]
    img = nib.Nifti1Image(seg, ref.affine)
    img.set_qform(ref.affine, code=1)
    img.set_sform(ref.affine, code=1)
    with atomic_path(out, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))
    ids = [str(i + 1) for i in range(len(order))]
    save_json({"instances": {i: int(c) for i, c in zip(ids, labels, strict=True)},
               "scores": {i: float(s) for i, s in zip(ids, scores[keep][order], strict=True)},
               "class_names": {i: str(n) for i, n in zip(ids, names, strict=True)},
               "score_threshold": float(score_threshold), "source": str(Path(prediction_json).name),
               "fill": "masks" if masks_module is not None else "boxes"},
              Path(out_dir) / f"{case}_boxes.json")
    return out


def convert_folder(pred_dir: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   score_threshold: float = 0.5, overwrite: bool = False, masks_module: Any = None) -> list[Path]:
    """:func:`boxes_to_nifti` for every ``*_boxes.json`` of ``pred_dir`` (reference ``<case>_0000.nii.gz``)."""
    files = sorted(Path(pred_dir).glob("*_boxes.json"))
    if not files:
        raise FileNotFoundError(f"{pred_dir}: no *_boxes.json predictions; run nndet_predict first")
    written = []
    for f in files:
        case = load_json(f)["case_id"]
        ref = Path(images_dir) / f"{case}_0000.nii.gz"
        if not ref.is_file():
            raise FileNotFoundError(f"{ref}: reference image of {f.name} missing (shape and affine come from it)")
        written.append(boxes_to_nifti(f, ref, out_dir, score_threshold, overwrite, masks_module))
    logger.info("%d instance NIfTI file(s) written to %s", len(written), out_dir)
    return written
