"""What a viewer shows of our SR, as a PNG: each finding's rectangle drawn on its centre slice.

The picture is made from the SR itself (:func:`apps.detect_dicom.sr.read_sr_boxes`: the SCOORD's pixel points
and the instance it is SELECTED FROM) and the referenced DICOM images, so it shows what the SR says, not what
the app meant. One panel per finding, side by side; every image pixel is ``scale`` x ``scale`` PNG pixels and
the SCOORD origin (0, 0) is the top-left corner of the top-left pixel, as in DICOM and in the viewers.

    python -m apps.detect_dicom.render OUT/<series>/findings_sr.dcm DICOM_DIR sr.png

Written with matplotlib's Agg canvas directly (no pyplot, no display), like the planner's plots.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from apps.detect_dicom import codes as cc
from apps.detect_dicom.sr import read_sr_boxes

BOX_COLOR = (1.0, 0.15, 0.1)  # the rectangle (RGB 0..1); tests look for it on the box's edges
DPI = 100


def _instances(images_dir: Path, wanted: set[str]) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> dataset for the wanted instances under ``images_dir`` (any file name)."""
    found: dict[str, pydicom.Dataset] = {}
    for path in sorted(p for p in images_dir.rglob("*") if p.is_file()):
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 -- not DICOM (README, DICOMDIR index, ...): not an image of ours
            continue
        uid = str(head.get("SOPInstanceUID", ""))
        if uid in wanted and uid not in found:
            found[uid] = pydicom.dcmread(path)
    return found


def _display(ds: pydicom.Dataset) -> tuple[np.ndarray, float, float]:
    """Modality values of one instance and the grey window: the instance's first Window Center/Width when it
    has one, else its 1st..99th percentile."""
    arr = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        return arr, center - width / 2, center + width / 2
    lo, hi = np.percentile(arr, [1, 99])
    return arr, float(lo), float(hi if hi > lo else lo + 1)


def render_sr(sr_path: str | Path, images_dir: str | Path, out_png: str | Path, scale: int = 4,
              label: bool = True) -> Path:
    """Draw every planar finding of the SR at ``sr_path`` on its image from ``images_dir``; write ``out_png``.

    Args:
        sr_path: an SR written by :func:`apps.detect_dicom.sr.write_sr`.
        images_dir: folder holding (at least) the instances the SR's rectangles are drawn on.
        out_png: the PNG to write (parent folders are made).
        scale: PNG pixels per image pixel (integer, >= 1).
        label: write "Finding N: <comment>" beside each rectangle.

    Raises:
        ValueError: the SR has no finding to draw (a "no finding" SR), or ``scale`` < 1.
        FileNotFoundError: an instance a rectangle is drawn on is not under ``images_dir``.
    """
    if scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    sr_path, images_dir, out_png = Path(sr_path), Path(images_dir), Path(out_png)
    boxes = read_sr_boxes(sr_path)
    if not boxes:
        raise ValueError(f"{sr_path} has no finding to draw (its report says no finding reached the operating "
                         "point)")
    instances = _instances(images_dir, {b["sop_instance_uid"] for b in boxes})
    missing = sorted({b["sop_instance_uid"] for b in boxes} - set(instances))
    if missing:
        raise FileNotFoundError(f"{images_dir} lacks the instance(s) {', '.join(missing)} that {sr_path} draws on: "
                                "pass the folder of the series the SR was made from")
    comments = _comments(sr_path)
    shapes = [instances[b["sop_instance_uid"]].pixel_array.shape[:2] for b in boxes]
    rows = max(s[0] for s in shapes)
    cols = sum(s[1] for s in shapes)
    fig = Figure(figsize=(cols * scale / DPI, rows * scale / DPI), dpi=DPI, facecolor="black")
    x0 = 0
    for box, (h, w) in zip(boxes, shapes, strict=True):
        ds = instances[box["sop_instance_uid"]]
        ax = fig.add_axes((x0 / cols, 1 - h / rows, w / cols, h / rows))
        x0 += w
        arr, vmin, vmax = _display(ds)
        ax.imshow(arr, cmap="gray", vmin=vmin, vmax=vmax, extent=(0, w, h, 0), interpolation="nearest")
        pts = np.asarray(box["points"], float)
        ax.plot(pts[:, 0], pts[:, 1], color=BOX_COLOR, linewidth=max(1.0, scale / 2))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
        if label:
            comment = comments.get(str(box["tracking_uid"]))
            text = box["tracking_identifier"] + (f": {comment}" if comment else "")
            ax.text(1, 1, text, color="yellow", fontsize=max(6, 2 * scale), va="top", ha="left",
                    bbox=dict(facecolor="black", alpha=0.6, pad=1, linewidth=0))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp")
    try:
        FigureCanvasAgg(fig).print_png(str(tmp))
        tmp.replace(out_png)
    finally:
        tmp.unlink(missing_ok=True)
    return out_png


def _comments(sr_path: Path) -> dict[str, str]:
    """Tracking UID -> the planar group's TEXT comment ("nodule p=0.87")."""
    out = {}
    for group in hd.sr.srread(sr_path).content.get_planar_roi_measurement_groups():
        texts = [i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"
                 and i.ConceptNameCodeSequence[0].CodeValue == cc.COMMENT.value]
        if texts:
            out[str(group.tracking_uid)] = texts[0]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apps.detect_dicom.render", description=__doc__.split("\n")[0])
    p.add_argument("sr", type=Path, help="an SR written by the app (OUT/<series>/findings_sr.dcm)")
    p.add_argument("images", type=Path, help="folder with the series the SR was made from")
    p.add_argument("png", type=Path, help="PNG to write")
    p.add_argument("--scale", type=int, default=4, help="PNG pixels per image pixel (default 4)")
    p.add_argument("--no_label", action="store_true", help="draw the rectangles without their text")
    args = p.parse_args(argv)
    try:
        out = render_sr(args.sr, args.images, args.png, scale=args.scale, label=not args.no_label)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
