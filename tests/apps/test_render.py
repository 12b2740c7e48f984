"""The PNG of an SR: each finding's rectangle drawn where the SR puts it on its centre slice, on a CT-like
phantom series (body, two lungs, two nodules) written as DICOM. With ``NNDET_DOCS_PNG=PATH`` set, the test also
copies its picture there (how ``docs/images/sr_on_ct.png`` was made)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from matplotlib.image import imread

from apps.detect_dicom.findings import findings_from_prediction
from apps.detect_dicom.render import BOX_COLOR, main, render_sr
from apps.detect_dicom.sr import read_sr_boxes, write_sr
from apps.detect_dicom.volume import build_volume, read_folder
from tests.apps.dicom_factory import make_affine, write_series

SHAPE = (128, 96, 10)  # (i, j, k): columns, rows, slices
NODULES = [((44, 40, 5), 6), ((86, 56, 3), 4)]  # (centre (i, j, k), radius in voxels)
# (i, j, k) = (column, row, slice) half-open boxes, as the bundle's predictor returns them
PRED = {"boxes": [[c[0] - r, c[1] - r, c[2] - 2, c[0] + r + 1, c[1] + r + 1, c[2] + 3] for c, r in NODULES]
        + [[10, 10, 0, 20, 20, 1]], "scores": [0.93, 0.71, 0.1], "labels": [0, 0, 0]}
SCALE = 2


def phantom() -> np.ndarray:
    """HU-like ``[i, j, k]`` volume: air, an elliptic body (40), two lungs (-850), spherical nodules (60)."""
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    vol = np.full(SHAPE, -1000.0, np.float32)
    vol[((i - 64) / 60) ** 2 + ((j - 48) / 42) ** 2 <= 1] = 40
    for ci in (40, 88):
        vol[((i - ci) / 22) ** 2 + ((j - 46) / 30) ** 2 <= 1] = -850
    for (ci, cj, ck), r in NODULES:
        vol[(i - ci) ** 2 + (j - cj) ** 2 + ((k - ck) * 2) ** 2 <= r * r] = 60
    return np.round(vol + np.random.default_rng(0).normal(0, 25, SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("render")
    write_series(root / "ct", phantom(), make_affine((0.7, 0.7, 1.5), origin=(-45.0, -34.0, 10.0)))
    vol = build_volume(read_folder(root / "ct"))
    findings = findings_from_prediction(PRED, vol, {"0": "nodule"})
    sr = write_sr(vol, findings, root / "findings_sr.dcm", operating_point=0.5, model_name="toy",
                  model_version="1", algorithm_name="nndet-monai toy")
    png = render_sr(sr, root / "ct", root / "sr.png", scale=SCALE)
    if os.environ.get("NNDET_DOCS_PNG"):
        shutil.copyfile(png, os.environ["NNDET_DOCS_PNG"])
    return {"sr": sr, "png": png, "vol": vol, "root": root}


def _is_box_color(rgb: np.ndarray) -> bool:
    return bool(np.allclose(rgb[:3], BOX_COLOR, atol=0.08))


def test_each_rectangle_is_drawn_where_the_sr_puts_it(rendered):
    img = imread(rendered["png"])
    boxes = read_sr_boxes(rendered["sr"])
    assert len(boxes) == 2
    width = rendered["vol"].array.shape[2]  # panels side by side, one per finding
    assert img.shape[:2] == (rendered["vol"].array.shape[1] * SCALE, 2 * width * SCALE)
    for panel, b in enumerate(boxes):
        pts = np.asarray(b["points"])
        (c0, r0), (c1, r1) = pts.min(0), pts.max(0)
        def x(c, panel=panel):
            return int(round((panel * width + c) * SCALE))

        def y(r):
            return int(round(r * SCALE))

        cm, rm = (c0 + c1) / 2, (r0 + r1) / 2
        # the middle of every edge is the box's colour, the box's centre and a point well outside are not
        for yy, xx in [(y(r1), x(cm)), (y(rm), x(c0)), (y(rm), x(c1))]:
            patch = img[yy - 1:yy + 2, xx - 1:xx + 2].reshape(-1, img.shape[2])
            assert any(_is_box_color(p) for p in patch), (panel, yy, xx)
        assert not _is_box_color(img[y(rm), x(cm)])
        assert not _is_box_color(img[y(r1) + 6 * SCALE, x(cm)])


def test_cli_writes_the_png_and_refuses_a_folder_without_the_images(rendered, tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert main([str(rendered["sr"]), str(rendered["root"] / "ct"), str(out), "--scale", "1"]) == 0
    assert imread(out).shape[:2] == (rendered["vol"].array.shape[1], 2 * rendered["vol"].array.shape[2])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(rendered["sr"]), str(empty), str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "pass the folder of the series" in err
    assert not (tmp_path / "none.png").exists()


def test_a_no_finding_sr_has_nothing_to_draw(rendered, tmp_path):
    vol = rendered["vol"]
    sr = write_sr(vol, findings_from_prediction(PRED, vol, {"0": "nodule"}), tmp_path / "none.dcm",
                  operating_point=0.99, model_name="toy", model_version="1", algorithm_name="a")
    with pytest.raises(ValueError, match="no finding"):
        render_sr(sr, rendered["root"] / "ct", tmp_path / "x.png")
