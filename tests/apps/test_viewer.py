"""OHIF's own SR reading code (Cornerstone3D's SR adapters, run headless by ``tests/apps/viewer``) turns our SR
into one RectangleROI per finding shown, on the finding's centre image, with the box's corners.

The check needs Node.js and the viewer packages (``npm ci`` from the lock file, done here when missing). On CI
(``CI`` set) a missing Node is a failure, elsewhere a skip.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from apps.detect_dicom.findings import findings_from_prediction
from apps.detect_dicom.sr import read_sr_boxes, write_sr
from apps.detect_dicom.volume import build_volume, read_folder
from tests.apps.dicom_factory import make_affine, rotation, toy_volume, write_series
from tests.apps.viewer import ensure_viewer_installed, ohif_tool_state

PRED = {"boxes": [[3, 4, 2, 10, 12, 7], [12.4, 1, 0, 17.6, 6, 3], [1, 1, 1, 3, 3, 2]],
        "scores": [0.91, 0.62, 0.2], "labels": [0, 1, 0]}
CLASSES = {"0": "nodule", "1": "weird thing"}


@pytest.fixture(scope="module")
def viewer():
    reason = ensure_viewer_installed()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the OHIF SR check must run on CI: {reason}")
        pytest.skip(reason)


# Square pixels only: Cornerstone3D swaps row and column spacing when it maps SR pixels to the world
# (cornerstone3D issue #2758), so a viewer draws rectangles on non-square pixels stretched; our SR is right
# there too (test_outputs checks the coordinates against each instance's own geometry).
@pytest.fixture(scope="module", params=["axial", "oblique_descending"])
def case(request, tmp_path_factory, viewer):
    root = tmp_path_factory.mktemp(f"viewer_{request.param}")
    if request.param == "axial":
        aff, kw = make_affine((0.8, 0.8, 2.0), origin=(-10.0, 20.0, -30.0)), {}
    else:
        aff = make_affine((0.7, 0.7, 2.5), rotation((0, 0, 1), 25) @ rotation((1, 0, 0), 15), (5.0, -7.0, 40.0))
        kw = dict(descending=True)
    write_series(root / "img", toy_volume((20, 14, 9)), aff, **kw)
    vol = build_volume(read_folder(root / "img"))
    findings = findings_from_prediction(PRED, vol, CLASSES)
    sr = write_sr(vol, findings, root / "sr.dcm", operating_point=0.5, model_name="toy", model_version="3",
                  algorithm_name="nndet-monai toy")
    return {"root": root, "vol": vol, "findings": findings, "sr": sr, "state": ohif_tool_state(sr, root / "img")}


def test_ohif_rehydrates_one_rectangle_per_finding_shown(case):
    state = case["state"]
    assert state["errors"] == []
    assert state["rehydratable"] is True
    assert state["counts"] == {"RectangleROI": 2}
    rois = state["tools"]["RectangleROI"]
    assert all(r["hydratedByOHIF"] for r in rois)
    assert sorted(r["trackingIdentifier"] for r in rois) == ["Finding 1", "Finding 2"]


def test_each_rectangle_lies_on_the_centre_image_with_the_box_corners(case):
    vol, rois = case["vol"], {r["trackingUniqueIdentifier"]: r for r in case["state"]["tools"]["RectangleROI"]}
    shown = [f for f in case["findings"] if f.score >= 0.5]
    boxes = read_sr_boxes(case["sr"])
    assert len(boxes) == len(shown)
    for f, b in zip(shown, boxes, strict=True):
        roi = rois[b["tracking_uid"]]
        assert roi["sopInstanceUID"] == vol.sop_instance_uids[f.center_slice]
        _, r0, c0, _, r1, c1 = f.box_voxel
        # Cornerstone's handle order: top-left, top-right, bottom-left, bottom-right
        np.testing.assert_allclose(roi["pixelPoints"], [[c0, r0], [c1, r0], [c0, r1], [c1, r1]], atol=1e-4)
        # and in the world, the rectangle sits inside the finding's LPS box (on its centre plane)
        pts = np.array(roi["points"])
        assert np.all(pts.min(0) >= np.array(f.box_lps_mm[:3]) - 1e-3)
        assert np.all(pts.max(0) <= np.array(f.box_lps_mm[3:]) + 1e-3)
