"""The Deploy app end to end on a DICOM study made from toy NIfTI cases, with a consolidated bundle.

The bundle's folds have random weights (what is tested is the plumbing and the geometry, not accuracy):
the app's boxes must equal the bundle's own NIfTI prediction of the same volume within half a voxel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("monai.deploy")
pytest.importorskip("highdicom")

from tests.apps import dicom_factory as factory  # noqa: E402
from tests.planner.helpers import det_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CASE = "case_6"
OPERATING_POINT = 0.3


def _oblique(affine: np.ndarray) -> np.ndarray:
    a, b = np.deg2rad(20), np.deg2rad(-12)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    out = affine.copy()
    out[:3, :3] = rz @ rx @ affine[:3, :3]
    out[:3, 3] = [10.0, -20.0, 35.0]
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A consolidated bundle and a study: axial ascending, oblique descending with rescale and non-square pixels,
    a series with a missing slice, a scout series (not selected) and a non-image SR object."""
    from planner.prep import run_prep
    from planner.toy import generate_example
    from tests.workflow.test_consolidate import fake_train
    from workflow.bundle_code import load_scripts
    from workflow.consolidate import consolidate
    from workflow.models import bundle_for

    root = tmp_path_factory.mktemp("app")
    mp = pytest.MonkeyPatch()
    det_env(mp, root, num_threads=1)
    generate_example(root / "data", preset="cpu", num_train=6, num_test=2, size=32)
    run_prep("000", preset="cpu")
    bundle = bundle_for("000")
    load_scripts(bundle)  # fake_train builds the bundle's network_def (scripts.detector)
    fake_train(bundle)
    cons = consolidate("000")
    img = nib.load(str(root / "data" / "Task000D3_Example" / "raw_splitted" / "imagesTs" / f"{CASE}_0000.nii.gz"))
    arr = np.asarray(img.dataobj, np.float32)
    vol = 2 * np.round(arr * 50)  # even integers, so storage with slope 2 / intercept -1024 is exact
    aff = img.affine.copy()
    aff[:3, :3] = aff[:3, :3] @ np.diag([0.8, 1.0, 1.5])  # non-square pixels, thick slices
    study_dir, nifti_dir = root / "study", root / "nifti"
    nifti_dir.mkdir()
    series = {
        "axial": dict(array=vol, affine=aff, description="Axial 1.5mm"),
        "oblique": dict(array=vol, affine=_oblique(aff), description="Oblique", descending=True, slope=2.0,
                        intercept=-1024.0),
    }
    study_uid = factory.uid("study")
    uids = {}
    for name, s in series.items():
        uids[name] = factory.uid(name)
        factory.write_series(study_dir / name, s["array"], s["affine"], modality="MR", description=s["description"],
                             descending=s.get("descending", False), slope=s.get("slope", 1.0),
                             intercept=s.get("intercept", 0.0), study_uid=study_uid, series_uid=uids[name])
        nib.save(nib.Nifti1Image(s["array"].astype(np.float32), s["affine"]), str(nifti_dir / f"{name}_0000.nii.gz"))
    uids["missing"] = factory.uid("missing")
    factory.write_series(study_dir / "missing", vol, aff, modality="MR", description="Broken", study_uid=study_uid,
                         series_uid=uids["missing"], defect="missing_slice")
    uids["scout"] = factory.uid("scout")
    factory.write_series(study_dir / "scout", vol, aff, modality="MR", description="Scout", study_uid=study_uid,
                         series_uid=uids["scout"])
    factory.write_text_sr(study_dir / "other", study_uid=study_uid)
    yield {"root": root, "cons": cons, "study": study_dir, "nifti": nifti_dir, "uids": uids, "series": series}
    mp.undo()


@pytest.fixture(scope="module")
def app_run(study):
    from apps.detect_dicom.app import main

    out = study["root"] / "out"
    rc = main(["-i", str(study["study"]), "-o", str(out), "-m", str(study["cons"]), "--num_tta", "1",
               "--device", "cpu", "--operating_point", str(OPERATING_POINT)])
    return rc, out, json.loads((out / "report.json").read_text())


def test_every_series_gets_a_status_and_bad_ones_a_reason(study, app_run):
    rc, out, report = app_run
    uids = study["uids"]
    by_uid = {s["series_instance_uid"]: s for s in report["series"]}
    assert by_uid[uids["axial"]]["status"] == "done" and by_uid[uids["oblique"]]["status"] == "done"
    assert by_uid[uids["missing"]]["status"] == "rejected"
    assert "missing" in by_uid[uids["missing"]]["reason"] and uids["missing"] in by_uid[uids["missing"]]["reason"]
    skipped = {s["series_instance_uid"]: s["reason"] for s in report["not_selected"]}
    assert "description_excludes" in skipped[uids["scout"]]
    assert uids["scout"] not in by_uid and not (out / uids["scout"]).exists()  # not predicted, nothing written
    assert not set(by_uid) & set(skipped)  # a series is either processed or not selected
    assert rc == 1  # one selected series was refused
    assert not (out / uids["missing"]).exists()  # no finding for a refused series
    for name in ("axial", "oblique"):
        files = sorted(p.name for p in (out / uids[name]).iterdir())
        assert "findings_sr.dcm" in files and "findings.json" in files
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("name", ["axial", "oblique"])
def test_boxes_equal_the_nifti_path_within_half_a_voxel(study, app_run, name):
    from apps.detect_dicom.pipeline import load_model

    _, out, _ = app_run
    got = json.loads((out / study["uids"][name] / "findings.json").read_text())
    model = load_model(study["cons"], num_tta=1, device="cpu")
    img = nib.load(str(study["nifti"] / f"{name}_0000.nii.gz"))
    ref = model.predictor(np.asarray(img.dataobj, np.float32)[None], img.affine)
    assert len(got["findings"]) == len(ref["scores"]) > 0
    ref_vox = np.asarray(ref["boxes"])[:, [2, 1, 0, 5, 4, 3]]  # (i, j, k) -> (slice, row, column)
    got_vox = np.asarray([f["box_voxel"] for f in got["findings"]], float)
    np.testing.assert_allclose(got_vox, ref_vox, atol=0.5 + 1e-6)
    np.testing.assert_allclose([f["score"] for f in got["findings"]], ref["scores"], atol=1e-5)
    # world boxes: LPS (app) vs RAS (NIfTI path), the same box within half a voxel edge per axis
    lps = np.asarray([f["box_lps_mm"] for f in got["findings"]])
    ras = np.asarray(ref["boxes_world_mm"])
    as_ras = np.stack([-lps[:, 3], -lps[:, 4], lps[:, 2], -lps[:, 0], -lps[:, 1], lps[:, 5]], axis=1)
    half = 0.5 * np.abs(img.affine[:3, :3]).sum(axis=1)  # world extent of half a voxel along x, y, z
    assert np.all(np.abs(as_ras - ras) <= np.concatenate([half, half]) + 1e-4)
    above = [f for f in got["findings"] if f["above_operating_point"]]
    assert all(f["score"] >= OPERATING_POINT for f in above)
    assert got["operating_point"]["threshold"] == OPERATING_POINT


def test_sr_references_the_source_study(study, app_run):
    import highdicom as hd

    _, out, _ = app_run
    for name in ("axial", "oblique"):
        sr = hd.sr.srread(out / study["uids"][name] / "findings_sr.dcm")
        src = json.loads((out / study["uids"][name] / "findings.json").read_text())
        assert sr.StudyInstanceUID == src["study_instance_uid"]
        assert sr.SeriesInstanceUID != study["uids"][name]


def test_started_like_a_map_from_the_environment(study, tmp_path):
    """``python -m apps.detect_dicom`` with only HOLOSCAN_* variables, as the MAP entry point starts it."""
    models = tmp_path / "models"  # a MAP's model folder holds the bundle as its only subfolder
    models.mkdir()
    (models / "detector").symlink_to(study["cons"], target_is_directory=True)
    out = tmp_path / "out"
    env = {**os.environ, "HOLOSCAN_INPUT_PATH": str(study["study"] / "axial"), "HOLOSCAN_OUTPUT_PATH": str(out),
           "HOLOSCAN_MODEL_PATH": str(models), "PYTHONPATH": str(ROOT)}
    env.pop("det_data", None)
    p = subprocess.run([sys.executable, "-m", "apps.detect_dicom", "--num_tta", "1", "--device", "cpu"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["series"]] == ["done"]


def test_usage_errors_write_nothing(study, tmp_path):
    from apps.detect_dicom.app import main

    out = tmp_path / "out"
    assert main(["-i", str(study["study"]), "-o", str(out), "-m", str(tmp_path)]) == 2
    assert main(["-i", str(tmp_path / "nothing"), "-o", str(out), "-m", str(study["cons"])]) == 2
    bad = tmp_path / "rules.json"
    bad.write_text("{not json")
    assert main(["-i", str(study["study"]), "-o", str(out), "-m", str(study["cons"]), "--rules", str(bad)]) == 2
    assert not out.exists() or not any(out.iterdir())
