"""Planner plots: every PNG is written and readable, with objects, without objects, in 2D and 3D."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from planner.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from planner.plan.plan import AnchorPlan, ArchitecturePlan, Plan
from planner.plan import plots
from planner.plan.plots import plan_box_sizes, write_planner_plots

DATASET_PNGS = {
    "box_sizes.png", "box_volumes.png", "box_size_scatter.png", "class_counts.png",
    "instances_per_case.png", "spacings.png",
}


def _case(cid: str, boxes: list[list[int]], classes: list[int], spacing: list[float], shape: list[int]) -> CaseFingerprint:
    return CaseFingerprint(
        case_id=cid, shape=shape, spacing=spacing, crop_bbox=[[0, s] for s in shape], shape_after_crop=shape,
        size_reduction=1.0, boxes=boxes, box_classes=classes, instance_ids=list(range(1, len(boxes) + 1)),
        volume_per_class={}, intensity=[IntensityStats(0.5, 0.1, 0.5, 0.0, 1.0, 0.01, 0.99, 10)] if boxes else [],
    )


def _fingerprint(cases: list[CaseFingerprint], dim: int) -> Fingerprint:
    counts: dict[str, int] = {"0": 0, "1": 0}
    for c in cases:
        for k in c.box_classes:
            counts[str(k)] += 1
    return Fingerprint(task="Task950_Plots", dim=dim, modalities={"0": "MRI"}, labels={"0": "Square", "1": "Hole"},
                       cases=cases, intensity=[IntensityStats(0.5, 0.1, 0.5, 0.0, 1.0, 0.01, 0.99, 10)],
                       num_instances=counts)


def _plan(dim: int, target_spacing: list[float], transpose: list[int], mode: str) -> Plan:
    per_axis = [[4.0, 8.0, 16.0]] * dim
    level1 = [[2 * s for s in axis] for axis in per_axis]
    arch = ArchitecturePlan(arch_name="RetinaUNetV001", dim=dim, in_channels=1, num_classes=2,
                            conv_kernels=[[3] * dim] * 3, strides=[[1] * dim, [2] * dim, [2] * dim],
                            decoder_levels=[1, 2])
    backward = [int(i) for i in np.argsort(transpose)]
    return Plan(
        planner_id=f"D{dim}V001", mode=mode, task="Task950_Plots", dim=dim, modalities={"0": "MRI"},
        labels={"0": "Square", "1": "Hole"}, target_spacing=target_spacing, transpose_forward=transpose,
        transpose_backward=backward, normalization_schemes=["nonCT"], use_mask_for_norm=[False],
        intensity_properties=[{}], patch_size=[32] * dim, batch_size=4, median_shape_transposed=[64.0] * dim,
        do_dummy_2D_data_aug=False, trigger_lr=False, architecture=arch,
        anchors=AnchorPlan(base_sizes=per_axis, sizes=[per_axis, level1], mean_best_iou=0.7,
                           num_anchors_per_location=3**dim),
        memory_estimate_bytes=2**30, memory_budget_bytes=11 * 2**30,
    )


def _check_pngs(paths, out_dir, plan_ids):
    expected = {out_dir / n for n in DATASET_PNGS} | {out_dir / p / "box_size_scatter.png" for p in plan_ids}
    assert set(paths) == expected
    for p in paths:
        img = mpimg.imread(p)  # raises on a broken PNG
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert float(np.std(img[..., :3])) > 0  # something is drawn
    assert not [p for p in out_dir.rglob(".*")], "temporary files left behind"


def test_plots_3d_with_boxes(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(5):
        n = int(rng.integers(0, 4))
        lo = rng.integers(0, 20, size=(n, 3))
        ext = rng.integers(2, 12, size=(n, 3))
        cases.append(_case(f"case_{i}", np.concatenate([lo, lo + ext], 1).tolist(), rng.integers(0, 2, n).tolist(),
                           [1.0, 1.0, float(rng.uniform(1.0, 3.0))], [40, 40, 30]))
    cases.append(_case("case_big", [[0, 0, 0, 30, 30, 25]], [1], [1.0, 1.0, 2.0], [40, 40, 30]))
    fp = _fingerprint(cases, 3)
    plans = [_plan(3, [1.0, 1.0, 2.0], [2, 0, 1], "3d"), _plan(3, [2.0, 2.0, 4.0], [2, 0, 1], "3dlr1")]
    out = tmp_path / "analysis"
    paths = write_planner_plots(fp, plans, out)
    _check_pngs(paths, out, ["D3V001_3d", "D3V001_3dlr1"])
    # a rerun replaces the files in place
    assert write_planner_plots(fp, plans, out) == paths


def test_plots_without_objects(tmp_path):
    fp = _fingerprint([_case("a", [], [], [1.0, 1.0, 1.0], [10, 10, 10]),
                       _case("b", [], [], [0.7, 0.7, 2.0], [10, 10, 10])], 3)
    assert fp.box_sizes_mm().shape == (0, 3)
    out = tmp_path / "analysis"
    paths = write_planner_plots(fp, [_plan(3, [1.0, 1.0, 1.0], [0, 1, 2], "3d")], out)
    _check_pngs(paths, out, ["D3V001_3d"])


def test_plots_2d(tmp_path, monkeypatch):
    fp = _fingerprint([_case("a", [[1, 2, 5, 9], [3, 3, 20, 10]], [0, 1], [0.5, 0.8], [30, 30]),
                       _case("b", [[0, 0, 4, 4]], [1], [0.5, 0.8], [30, 30])], 2)
    out = tmp_path / "analysis"
    figures = {}
    real_save = plots._save

    def save(fig, path):
        figures[Path(path).name if Path(path).parent == out else f"{Path(path).parent.name}/{Path(path).name}"] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    paths = write_planner_plots(fp, [_plan(2, [0.5, 0.8], [1, 0], "2d")], out)
    _check_pngs(paths, out, ["D2V001_2d"])
    # the panels a 2D task should get, each with something drawn in it (bars, points or lines)
    panels = {"box_sizes.png": 4, "box_volumes.png": 2, "box_size_scatter.png": 1, "class_counts.png": 1,
              "instances_per_case.png": len(plots.INSTANCE_RANGES), "spacings.png": 1,
              "D2V001_2d/box_size_scatter.png": 1}
    assert {k: len(f.axes) for k, f in figures.items()} == panels
    for name, fig in figures.items():
        for ax in fig.axes:
            drawn = len(ax.patches) + len(ax.lines) + sum(len(c.get_offsets()) for c in ax.collections)
            assert drawn > 0, f"{name}: empty panel {ax.get_title()!r}"
    # the dataset scatter shows the three boxes; the PNG is more than a white page
    points = sum(len(c.get_offsets()) for c in figures["box_size_scatter.png"].axes[0].collections)
    assert points == 3
    img = mpimg.imread(out / "box_size_scatter.png")[..., :3]
    assert (img < 0.9).any(axis=-1).mean() > 0.01


def test_plan_box_sizes_scales_and_transposes():
    # raw extents (4, 5, 2) voxels at spacing (1, 1, 3) mm -> (4, 5, 6) mm; target (1, 1, 1.5) -> (4, 5, 4)
    # voxels in raw order; transpose_forward (2, 0, 1) -> (4, 4, 5)
    fp = _fingerprint([_case("a", [[1, 1, 1, 5, 6, 3]], [0], [1.0, 1.0, 3.0], [10, 10, 10])], 3)
    sizes = plan_box_sizes(fp, _plan(3, [1.0, 1.0, 1.5], [2, 0, 1], "3d"))
    np.testing.assert_allclose(sizes, [[4.0, 4.0, 5.0]])


@pytest.mark.parametrize("dim", [2, 3])
def test_plan_box_sizes_empty(dim):
    shape = [8] * dim
    fp = _fingerprint([_case("a", [], [], [1.0] * dim, shape)], dim)
    assert plan_box_sizes(fp, _plan(dim, [1.0] * dim, list(range(dim)), "x")).shape == (0, dim)
