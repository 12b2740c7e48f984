"""plan_task on synthetic fingerprints: toy-like 3D, anisotropic CT-like, 2D, low-res, memory budget, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from planner.dataset import DatasetInfo
from planner.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from planner.plan.anchors import anchors_per_location
from planner.plan.memory import count_parameters, estimate_training_memory, memory_breakdown
from planner.plan.plan import Plan
from planner.plan.planner import PRESET_SUFFIX, PRESETS, plan_task
from planner.presets import PRESET_NAMES

GIB = 2**30


def _stats() -> IntensityStats:
    return IntensityStats(mean=100.0, std=20.0, median=95.0, min=-50.0, max=400.0, percentile_00_5=10.0,
                          percentile_99_5=300.0, num_voxels=1000)


def _fingerprint(spacings, shapes, boxes, modalities=("MRI",), labels=("lesion",), size_reduction=1.0,
                 classes=None) -> tuple[Fingerprint, DatasetInfo]:
    dim = len(spacings[0])
    cases = []
    counts: dict[str, int] = {}
    for i, (sp, sh, bx) in enumerate(zip(spacings, shapes, boxes, strict=True)):
        cl = [0] * len(bx) if classes is None else classes[i]
        for k in cl:
            counts[str(k)] = counts.get(str(k), 0) + 1
        cases.append(CaseFingerprint(
            case_id=f"case{i:03d}", shape=[int(s) for s in sh], spacing=[float(s) for s in sp],
            crop_bbox=[[0, int(s)] for s in sh], shape_after_crop=[int(s) for s in sh],
            size_reduction=size_reduction, boxes=[[float(v) for v in b] for b in bx], box_classes=cl,
            instance_ids=list(range(1, len(bx) + 1)), intensity=[_stats() for _ in modalities],
        ))
    mods = {str(i): m for i, m in enumerate(modalities)}
    labs = {str(i): name for i, name in enumerate(labels)}
    fp = Fingerprint(task="Task999_Synth", dim=dim, modalities=mods, labels=labs, cases=cases,
                     intensity=[_stats() for _ in modalities], num_instances=counts)
    return fp, DatasetInfo(task="Task999_Synth", dim=dim, labels=labs, modalities=mods)


def _cubes(rng, n_cases, shape, n_boxes, lo, hi):
    """Per case ``n_boxes`` cubes with edge in [lo, hi) voxels inside ``shape`` (StandardMode)."""
    out = []
    for _ in range(n_cases):
        case = []
        for _ in range(n_boxes):
            e = int(rng.integers(lo, hi))
            start = [int(rng.integers(0, s - e + 1)) for s in shape]
            case.append([*start, *[s + e for s in start]])
        out.append(case)
    return out


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    fp, ds = _fingerprint([[1.0, 1.0, 1.0]] * 8, [[64, 64, 64]] * 8, _cubes(rng, 8, (64, 64, 64), 3, 8, 16))
    return fp, ds, plan_task(fp, ds)


@pytest.fixture(scope="module")
def ct():
    rng = np.random.default_rng(1)
    spacings, shapes, boxes = [], [], []
    for _ in range(10):
        sp = [0.7 + rng.uniform(-0.05, 0.05)] * 2 + [float(rng.choice([2.5, 3.0, 3.0, 5.0]))]
        sh = [int(rng.integers(240, 260)), int(rng.integers(240, 260)), int(rng.integers(40, 60))]
        case = []
        for _ in range(4):
            mm = rng.uniform(5, 30)
            ext = [max(1, round(mm / sp[a])) for a in range(3)]
            start = [int(rng.integers(0, sh[a] - ext[a])) for a in range(3)]
            case.append([*start, *[start[a] + ext[a] for a in range(3)]])
        spacings.append(sp)
        shapes.append(sh)
        boxes.append(case)
    fp, ds = _fingerprint(spacings, shapes, boxes, modalities=("CT",))
    return fp, ds, plan_task(fp, ds)


def test_toy_3d_plan(toy):
    fp, ds, plans = toy
    assert [p.plan_id for p in plans] == ["D3V001_3d"]
    p = plans[0]
    assert p.model_name == "RetinaUNetV001_D3V001_3d"
    assert p.target_spacing == [1.0, 1.0, 1.0] and p.transpose_forward == [0, 1, 2]
    assert p.patch_size == [64, 64, 64] and p.batch_size == 4
    assert p.normalization_schemes == ["nonCT"] and p.use_mask_for_norm == [False]
    a = p.architecture
    assert a.strides[0] == [1, 1, 1] and len(a.strides) == len(a.conv_kernels)
    assert a.decoder_levels == list(range(min(max(1, len(a.strides) - 4), 2), len(a.strides)))
    assert len(p.anchors.sizes) == len(a.decoder_levels)
    assert p.anchors.num_anchors_per_location == 27
    assert p.anchors.mean_best_iou > 0.7  # cubes of 8-15 voxels
    assert not p.trigger_lr and not p.do_dummy_2D_data_aug
    assert p.memory_estimate_bytes <= p.memory_budget_bytes
    assert p.memory_estimate_bytes == estimate_training_memory(a, p.patch_size, p.batch_size, 27)
    assert p.intensity_properties[0]["percentile_99_5"] == 300.0
    assert len(a.class_weight) == 2


def test_ct_like_anisotropic_plan(ct):
    fp, ds, plans = ct
    p = plans[0]
    z = np.percentile([c.spacing[2] for c in fp.cases], 10)
    assert p.target_spacing[2] == pytest.approx(z)  # anisotropy rule: 10th percentile of z
    assert p.target_spacing[0] == pytest.approx(np.median([c.spacing[0] for c in fp.cases]))
    assert p.transpose_forward == [2, 0, 1] and p.transpose_backward == [1, 2, 0]
    assert p.normalization_schemes == ["CT"] and p.use_mask_for_norm == [False]
    assert p.patch_size[0] < p.patch_size[1] == p.patch_size[2]
    assert p.architecture.strides[1] == [1, 2, 2]  # slices are not pooled first
    assert p.architecture.conv_kernels[0] == [1, 3, 3]
    assert p.anchors.mean_best_iou > 0.6
    assert any("anisotropic" in n for n in p.notes)
    # median shape in transposed order: slices first
    assert p.median_shape_transposed[0] < p.median_shape_transposed[1]
    for d, s in zip(p.patch_size, np.prod(p.architecture.strides, axis=0), strict=True):
        assert d % s == 0


def test_2d_task_gets_one_2d_plan():
    rng = np.random.default_rng(2)
    # 2D boxes (x1, y1, x2, y2) from the first two axes of 3D cubes
    boxes = [[[b[0], b[1], b[3], b[4]] for b in case] for case in _cubes(rng, 6, (300, 300, 300), 3, 10, 40)]
    fp, ds = _fingerprint([[0.5, 0.5]] * 6, [[300, 300]] * 6, boxes)
    plans = plan_task(fp, ds)
    assert [p.plan_id for p in plans] == ["D2V001_2d"]
    p = plans[0]
    assert p.dim == 2 and len(p.patch_size) == 2 and p.batch_size == 16
    assert p.architecture.start_channels == 48 and p.architecture.fpn_channels == 192
    assert p.anchors.num_anchors_per_location == 9
    n = len(p.architecture.strides)
    assert p.architecture.decoder_levels == list(range(min(max(1, n - 5), 2), n))
    assert min(np.asarray(p.patch_size) // np.prod(p.architecture.strides, axis=0)) >= 8
    assert p.anchors.mean_best_iou > 0.6


def test_huge_objects_trigger_the_lowres_plan():
    rng = np.random.default_rng(3)
    shape = (224, 224, 224)
    boxes = _cubes(rng, 4, shape, 1, 190, 220)
    fp, ds = _fingerprint([[1.0, 1.0, 1.0]] * 4, [shape] * 4, boxes)
    plans = plan_task(fp, ds, memory_budget_bytes=8 * GIB)
    assert [p.plan_id for p in plans] == ["D3V001_3d", "D3V001_3dlr1"]
    main, lr = plans
    assert main.trigger_lr and not lr.trigger_lr
    assert max(main.patch_size) < 190  # objects are larger than the main patch
    np.testing.assert_allclose(lr.target_spacing, np.asarray(main.target_spacing) * 2)
    assert lr.median_shape_transposed == pytest.approx([s / 2 for s in main.median_shape_transposed])
    assert lr.memory_estimate_bytes <= 8 * GIB
    assert lr.anchors.mean_best_iou > 0.5


def test_small_budget_shrinks_the_patch(toy):
    fp, ds, plans = toy
    big = plans[0]
    budget = int(2.6 * GIB)
    assert big.memory_estimate_bytes > budget
    small = plan_task(fp, ds, memory_budget_bytes=budget)[0]
    assert np.prod(small.patch_size) < np.prod(big.patch_size)
    assert small.memory_estimate_bytes <= budget
    assert any("shrunk" in n for n in small.notes)


def test_mask_for_norm_and_multiple_modalities():
    rng = np.random.default_rng(4)
    fp, ds = _fingerprint([[1.0, 1.0, 1.0]] * 4, [[48, 48, 48]] * 4, _cubes(rng, 4, (48, 48, 48), 2, 6, 12),
                          modalities=("CT", "T1"), size_reduction=0.5)
    p = plan_task(fp, ds)[0]
    assert p.normalization_schemes == ["CT", "nonCT"]
    assert p.use_mask_for_norm == [False, True]
    assert p.architecture.in_channels == 2 and len(p.intensity_properties) == 2


def test_plan_json_round_trip_and_python_types(toy, ct, tmp_path):
    for plan in toy[2] + ct[2]:
        text = json.dumps(plan.to_dict())  # fails on numpy scalars
        assert "NaN" not in text
        path = plan.to_json(tmp_path / f"{plan.plan_id}.json")
        assert Plan.from_json(path) == plan


def test_deterministic(toy):
    fp, ds, plans = toy
    assert plan_task(fp, ds) == plans


def test_no_cases_is_an_error():
    fp = Fingerprint(task="Task999_Synth", dim=3, modalities={"0": "CT"}, labels={"0": "a"}, cases=[],
                     intensity=[], num_instances={})
    with pytest.raises(ValueError, match="no training cases"):
        plan_task(fp, DatasetInfo(task="Task999_Synth", dim=3, labels={"0": "a"}, modalities={"0": "CT"}))


def test_cpu_preset_narrows_the_network_and_caps_the_patch(toy):
    fp, ds, default = toy
    (cpu,) = plan_task(fp, ds, preset="cpu")
    d = default[0]
    assert cpu.plan_id == "D3V001CPU_3d" and cpu.model_name == "RetinaUNetV001_D3V001CPU_3d"
    assert cpu.architecture.start_channels == d.architecture.start_channels // 4
    assert cpu.architecture.fpn_channels == d.architecture.fpn_channels // 4
    assert int(np.prod(cpu.patch_size)) <= 32**3 < int(np.prod(d.patch_size))
    # the rules stay the same: spacing, normalisation, anchors over the same boxes
    assert cpu.target_spacing == d.target_spacing and cpu.normalization_schemes == d.normalization_schemes
    assert len(cpu.anchors.sizes) == len(cpu.architecture.decoder_levels)
    assert cpu.anchors.mean_best_iou > 0.7
    assert any("preset cpu" in n for n in cpu.notes)


def test_preset_names_live_in_one_place():
    assert tuple(PRESETS) == tuple(PRESET_SUFFIX) == PRESET_NAMES == ("default", "cpu")


def _multiclass_2d(preset: str) -> Plan:
    rng = np.random.default_rng(5)
    boxes = [[[b[0], b[1], b[3], b[4]] for b in case] for case in _cubes(rng, 6, (200, 200, 200), 3, 10, 30)]
    classes = [[int(k) for k in rng.integers(0, 3, 3)] for _ in range(6)]
    fp, ds = _fingerprint([[0.8, 0.8]] * 6, [[200, 200]] * 6, boxes, modalities=("T1", "T2"),
                          labels=("a", "b", "c"), classes=classes)
    return plan_task(fp, ds, preset=preset)[0]


@pytest.fixture(scope="module")
def several_plans(toy, ct):
    fp, ds, (main,) = toy
    return {
        "3d": main,
        "3d_anisotropic": ct[2][0],
        "3d_cpu": plan_task(fp, ds, preset="cpu")[0],
        "2d_multiclass": _multiclass_2d("default"),
        "2d_cpu_multiclass": _multiclass_2d("cpu"),
    }


@pytest.mark.parametrize("name", ["3d", "3d_anisotropic", "3d_cpu", "2d_multiclass", "2d_cpu_multiclass"])
def test_memory_estimate_counts_the_bundles_network(several_plans, name):
    """The planner's parameter count and anchors per location are those of the detector the bundle builds."""
    detector = pytest.importorskip("bundles.retinaunet_template.scripts.detector")
    plan = several_plans[name]
    a = plan.architecture
    net = detector.build_detector(**detector.detector_kwargs_from_plan(plan))
    assert plan.anchors.num_anchors_per_location == net.network.num_anchors == anchors_per_location(plan.dim)
    expected = sum(p.numel() for p in net.parameters())
    assert expected == sum(p.numel() for p in net.network.parameters())  # the detector adds no parameters
    assert count_parameters(a, plan.anchors.num_anchors_per_location) == expected
    mem = memory_breakdown(a, plan.patch_size, plan.batch_size, plan.anchors.num_anchors_per_location)
    assert mem["num_parameters"] == expected and mem["total"] == plan.memory_estimate_bytes
    if "multiclass" in name:
        assert a.num_classes == 3 and a.in_channels == 2


def test_cpu_preset_2d_and_unknown_preset():
    rng = np.random.default_rng(3)
    fp, ds = _fingerprint([[1.0, 1.0]] * 6, [[256, 256]] * 6,
                          [[[*s, *(np.array(s) + 20)] for s in rng.integers(0, 200, (2, 2)).tolist()] for _ in range(6)])
    (plan,) = plan_task(fp, ds, preset="cpu")
    assert plan.plan_id == "D2V001CPU_2d" and int(np.prod(plan.patch_size)) <= 128**2
    with pytest.raises(ValueError, match="unknown planner preset 'gpu'"):
        plan_task(fp, ds, preset="gpu")
