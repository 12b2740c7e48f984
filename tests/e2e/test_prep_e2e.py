"""End to end: toy data -> nndet_prep (checks, fingerprint, plan, bundle, preprocessing) via the CLI.

Runs the real commands on tiny tasks (3D toy, 2D toy, anisotropic CT-like) and checks the artefacts a
user and the later stages rely on, plus the rerun/overwrite behaviour.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from planner import paths
from planner.plan.plan import Plan
from planner.toy import generate_example
from workflow import cli


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("det_data", str(tmp_path / "data"))
    monkeypatch.setenv("det_models", str(tmp_path / "models"))
    (tmp_path / "data").mkdir()
    return tmp_path


def _prep(task: str, *extra: str) -> None:
    cli.prep_main([task, "-np", "0", "-npp", "0", *extra])


def _check_task(task_name: str, expect_dim: int) -> Plan:
    root = paths.det_data() / task_name
    fp = json.loads((root / "preprocessed" / "fingerprint.json").read_text())
    assert fp["dim"] == expect_dim and fp["cases"]
    plan_files = sorted((root / "preprocessed" / "plans").glob("*.json"))
    assert plan_files, "no plan written"
    plan = Plan.from_json(plan_files[0])
    assert plan.dim == expect_dim
    assert len(plan.patch_size) == expect_dim
    assert plan.anchors.mean_best_iou > 0.5, plan.anchors
    pngs = list((root / "preprocessed" / "plans" / "analysis").rglob("*.png"))
    assert pngs, "planner plots missing"

    from planner.bundle import verify_bundle

    bundle = paths.det_models() / task_name / plan.model_name
    verify_bundle(bundle)

    pre = root / "preprocessed" / plan.plan_id
    for split in ("Tr", "Ts"):
        jsons = sorted((pre / f"images{split}").glob("*.json"))
        assert jsons, f"no preprocessed {split} cases"
        props = json.loads(jsons[0].read_text())
        case = jsons[0].stem
        data = np.load(pre / f"images{split}" / f"{case}.npy", mmap_mode="r")
        assert data.ndim == expect_dim + 1 and data.dtype == np.float32
        assert np.isfinite(np.asarray(data)).all()
        if split == "Tr":
            seg = np.load(pre / "imagesTr" / f"{case}_seg.npy", mmap_mode="r")
            assert seg.shape == data.shape[1:]
            boxes = np.asarray(props["boxes"], dtype=float).reshape(-1, 2 * expect_dim)
            assert len(boxes) == len(props["classes"])
            # every box lies inside the preprocessed array
            assert (boxes[:, :expect_dim] >= 0).all()
            assert (boxes[:, expect_dim:] <= np.asarray(data.shape[1:])).all()
    return plan


def test_toy_3d_prep_end_to_end(env, capsys):
    generate_example(paths.det_data(), preset="cpu", num_train=4, num_test=2, size=32)
    _prep("000")
    out = capsys.readouterr().out
    assert "D3V001_3d" in out and "mean best IoU" in out
    plan = _check_task("Task000D3_Example", 3)
    assert plan.plan_id == "D3V001_3d"
    assert plan.normalization_schemes == ["nonCT"]

    # a rerun reuses everything (no file rewritten), overwrite recomputes
    root = paths.det_data() / "Task000D3_Example"
    fp_file = root / "preprocessed" / "fingerprint.json"
    case_json = sorted((root / "preprocessed" / plan.plan_id / "imagesTr").glob("*.json"))[0]
    before = (fp_file.stat().st_mtime_ns, case_json.stat().st_mtime_ns)
    _prep("000")
    assert (fp_file.stat().st_mtime_ns, case_json.stat().st_mtime_ns) == before
    _prep("Task000", "-o", "overwrite=True")
    assert fp_file.stat().st_mtime_ns != before[0]
    assert case_json.stat().st_mtime_ns != before[1]


def test_toy_2d_prep_end_to_end(env):
    out = generate_example(paths.det_data(), preset="cpu", num_train=4, num_test=2, size=48, dim=2)
    plan = _check_task_after_prep(out.name, 2)
    assert plan.plan_id == "D2V001_2d"
    assert plan.anchors.num_anchors_per_location == 9


def _check_task_after_prep(task_name: str, dim: int) -> Plan:
    _prep(task_name)
    return _check_task(task_name, dim)


def test_anisotropic_ct_like_prep(env):
    out = generate_example(
        paths.det_data(), preset="cpu", num_train=4, num_test=1, size=40, spacing=(0.8, 0.8, 3.0),
        modality="CT", task_name="Task101D3_CTLike",
    )
    plan = _check_task_after_prep(out.name, 3)
    # coarsest axis (2, 3 mm) goes first; the CT scheme uses dataset statistics
    assert plan.transpose_forward[0] == 2
    assert plan.target_spacing[2] == pytest.approx(3.0, rel=0.2)
    assert plan.normalization_schemes == ["CT"]
    assert plan.intensity_properties[0]["std"] > 0
