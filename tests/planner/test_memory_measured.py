"""The planner's memory estimate against one real training step measured on the CPU (benchmarks/memory_probe.py).

Five plans (3D default of a CT-like task, its low-resolution plan, 2D, 2 modalities, the cpu preset) are
measured under bfloat16 autocast with CUDA's float32 ops in float32 (~2 s each on one core, at the sizes of
``memory_probe.TEST_SIZES``: patches shrunk to ~1e5 voxels at batch 2, the low-resolution plan at ~3e5 voxels,
the cpu preset plan as planned) and compared with ``memory_breakdown`` at the same patch and batch, without the
CUDA-only margin (context, workspace offset), which no CPU can measure.
"""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import memory_probe as mp
from planner.plan import memory
from planner.plan import network_facts as nf

TOLERANCE = 0.15  # the estimate of the step's peak within 15 % of the measurement


@pytest.fixture(scope="module")
def measured():
    plans = mp.probe_plans()
    out = {}
    for name, plan in plans.items():
        patch, batch = mp.probe_sizes(plan, *mp.TEST_SIZES[name])
        out[name] = mp.compare(name, plan, patch, batch)
    return out


def test_the_five_plans_are_distinct_measurements(measured):
    assert set(measured) == {"3d", "3dlr1", "2d", "3d_2mod", "3d_cpu"}
    sizes = {(c.measured.plan_id, c.measured.patch_size, c.measured.batch_size) for c in measured.values()}
    assert len(sizes) == 5
    assert measured["3d_2mod"].measured.input_bytes > 0
    cpu = measured["3d_cpu"]
    assert cpu.measured.plan_id == "D3V001CPU_3d" and cpu.measured.batch_size == 4  # as planned


@pytest.mark.parametrize("name", ["3d", "3dlr1", "2d", "3d_2mod", "3d_cpu"])
def test_estimate_is_within_15_percent_of_the_measured_peak(measured, name):
    c = measured[name]
    assert abs(c.ratio - 1) < TOLERANCE, f"{name}: estimate / measured = {c.ratio:.3f}\n{mp.table([c])}"


@pytest.mark.parametrize("name", ["3d", "3dlr1", "2d", "3d_2mod", "3d_cpu"])
def test_what_the_network_saves_is_what_the_meta_pass_counts(measured, name):
    """The meta pass (CUDA autocast rules on shapes) counts exactly what the CPU step saved, module by module."""
    c = measured[name]
    for part, (cpu, est) in mp.components(c).items():
        if part in ("encoder", "decoder", "heads", "weight_copies"):
            assert cpu == pytest.approx(est, abs=1e-6), part
    m = c.measured
    assert m.parameter_bytes == 8 * c.estimate["num_parameters"]  # fp32 weights + momentum
    assert m.gradient_bytes == 4 * c.estimate["num_parameters"]
    # the loss terms of the model (segmentation loss, detection loss masks) and the end of the forward pass
    for part in ("seg", "detection_loss"):
        cpu, est = mp.components(c)[part]
        assert cpu == pytest.approx(est, rel=0.02, abs=0.01), part
    assert m.end_of_forward_bytes == pytest.approx(c.phases["end_of_forward"], rel=0.01)


def test_cpu_autocast_alone_keeps_less_in_the_heads(measured):
    """Without the CUDA policy, GroupNorm runs in bfloat16 on the CPU (4 bytes per head element instead of
    CUDA's 10): measuring plain CPU autocast would under-count the heads by that much."""
    plan = mp.probe_plans()["3d_cpu"]
    plain = mp.measure_step(plan, plan.patch_size, 1, cuda_policy=False)
    cuda = measured["3d_cpu"].measured
    assert plain.saved_bytes["heads"] < 0.6 * cuda.saved_bytes["heads"] / cuda.batch_size
    assert plain.saved_bytes["encoder"] == cuda.saved_bytes["encoder"] // cuda.batch_size


def test_the_comparison_fails_when_the_model_double_counts(measured, monkeypatch):
    """The 15 % check has teeth: count what the encoder saves twice, or forget the matcher, and plans fall out."""
    real = nf.network_saved_activations

    def doubled(arch, a, amp=True):
        s = real(arch, a, amp)
        per_voxel = list(s.per_voxel)
        per_voxel[0] = tuple(2 * v for v in per_voxel[0])
        return dataclasses.replace(s, per_voxel=tuple(per_voxel))

    plans = mp.probe_plans()
    args = {n: (plans[n].architecture, list(c.measured.patch_size), c.measured.batch_size,
                plans[n].anchors.num_anchors_per_location) for n, c in measured.items()}

    def off(name):
        est = memory.phase_peaks(*args[name])
        return abs(max(est["forward"], est["backward"], est["step"]) / measured[name].measured.peak_bytes - 1)

    assert all(off(n) < TOLERANCE for n in measured)
    monkeypatch.setattr(memory, "network_saved_activations", doubled)
    assert any(off(n) > TOLERANCE for n in measured)
    monkeypatch.setattr(memory, "network_saved_activations", real)
    monkeypatch.setattr(memory, "MATCHER_IOU_ARRAYS", ((0, 0),))
    assert any(off(n) > TOLERANCE for n in measured)
