"""Memory of one training step measured on the CPU, to calibrate the planner's GPU estimate without a GPU.

What one training step keeps does not depend on the device: the parameters with their gradients and SGD
momentum, the 16-bit weight copies autocast makes, and the activations autograd saves for the backward pass
are the same tensors on a CPU and on a GPU. :func:`measure_step` runs one step of the bundle's own training
(the template's ``build_detector``: network, anchors, ATSS matching, hard-negative sampling, the detection and
segmentation losses; ``build_optimizer``'s Nesterov SGD; ``zero_grad(set_to_none=True)`` as
``DetectionTrainStep``) on the CPU under ``torch.autocast("cpu", dtype=torch.bfloat16)``, whose activations
take the same 2 bytes as CUDA's float16 AMP, and measures:

- **saved for backward**: every tensor autograd saves during the forward pass (``saved_tensors_hooks``),
  counted once per storage (by its data pointer) if still alive at the end of the forward pass, split by the
  module that saved it (encoder, decoder, heads, segmentation head and loss, detection loss) and by kind
  (activations, autocast's 16-bit weight copies);
- **parameters**: fp32 weights, gradients and momentum buffers (their storages);
- **peaks**: the CPU allocator's bytes in use over the step, from ``torch.profiler`` (``profile_memory``: every
  allocation and free, summed in time order), per phase (forward incl. losses, backward, optimizer step),
  on top of what was allocated before the step (weights, momentum, the batch).

The step is the state after the first one: the momentum buffers exist, gradients are ``None``. The SGD groups
run with ``foreach=True``, CUDA's default (on the CPU torch defaults to a per-tensor loop, which would hide the
gradient copy of the weight-decay group that CUDA's foreach step makes). The batch has
``DEFAULT_BOXES_PER_IMAGE`` random GT boxes per image, the number the estimate assumes for the matcher.

CPU and CUDA autocast differ in one place that matters here (``torch.amp`` op lists): CUDA runs its "float32"
ops (``group_norm``, ``layer_norm``, ``softmax``, ``log_softmax``, ``sum``, ``exp``, ``log``, ... see
:data:`CUDA_FP32_OPS`) in float32 on float16 inputs, CPU autocast has none of them on its float32 list and
runs them in bfloat16. For the Retina U-Net that is the heads' GroupNorm: on CUDA its input is cast to an
fp32 copy (kept by the norm), its output (kept by the in-place ReLU) is fp32 and the next conv keeps an fp16
cast of it, 10 bytes per element, against 4 bytes on the CPU. With ``cuda_policy=True`` (the default)
:class:`CudaAutocastPolicy` casts the 16-bit inputs of those ops to float32 as CUDA autocast does, so the
measured step keeps what the CUDA step keeps; ``cuda_policy=False`` measures plain CPU autocast. The losses
cast to float32 themselves (``scripts/losses.py``), so they are the same on both.

What the CPU cannot show, and the planner budgets as a fixed margin instead (``planner.plan.memory``): the
CUDA context, cuDNN's workspaces and the caching allocator's rounding and fragmentation. Transient buffers of
the CPU kernels (oneDNN's) are in the measured peak; cuDNN's take their place on a GPU.

The five plans the calibration uses (:func:`probe_plans`) are made by the planner from synthetic
fingerprints (no files): the default 3D plan of a CT-like task, its low-resolution plan, a 2D task, a
2-modality 3D task and the CT-like task's ``cpu`` preset plan. :func:`compare` measures a plan at a chosen
patch and batch (smaller than the plan's, to keep CPU time short: :func:`reduced_patch`) and evaluates
``memory_breakdown`` at the same patch and batch.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from planner.plan.network_facts import CUDA_FP32_OPS, _is_weight_copy  # noqa: E402

MIB = 2**20

COMPONENTS = ("encoder", "decoder", "heads", "seg", "detection_loss")
TEST_MAX_VOXELS = 100_000  # patch size the test measures at (2D: half of it), batch TEST_BATCH
TEST_BATCH = 2
# tests/planner/test_memory_measured.py: (max voxels, batch) per plan, ~2 s each on one core; the low-resolution
# plan at a larger patch than the main plan's (else both shrink to the same input of the same network)
TEST_SIZES = {"3d": (TEST_MAX_VOXELS, TEST_BATCH), "3dlr1": (300_000, 1), "2d": (TEST_MAX_VOXELS, TEST_BATCH),
              "3d_2mod": (TEST_MAX_VOXELS, TEST_BATCH), "3d_cpu": (None, None)}


class CudaAutocastPolicy(TorchFunctionMode):
    """A torch-function mode: inside CPU autocast, run CUDA's float32 ops (:data:`CUDA_FP32_OPS`) in float32.

    CUDA autocast casts every 16-bit floating argument of those ops to float32 (the output is float32); this
    mode does the same to the bfloat16 arguments, so the CPU step saves the tensors a CUDA step saves.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
            args = tuple(_up(a) for a in args)
            kwargs = {k: _up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _up(a):
    return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step measured on the CPU (see the module docstring).

    Attributes:
        plan_id, patch_size, batch_size: what was measured.
        parameter_bytes: fp32 weights + momentum buffers (allocated before the step).
        gradient_bytes: fp32 gradients after the backward pass.
        input_bytes: the batch (fp32 images, int32 segmentation target, boxes).
        weight_copy_bytes: autocast's 16-bit weight copies saved for the backward pass.
        saved_bytes: component -> bytes of unique saved activations alive at the end of the forward pass.
        end_of_forward_bytes: allocated at the end of the forward pass (incl. what was there before the step).
        forward_peak_bytes, backward_peak_bytes, step_peak_bytes: peak allocated per phase (same basis).
        seconds: wall time of the measured step.
    """

    plan_id: str
    patch_size: tuple[int, ...]
    batch_size: int
    parameter_bytes: int
    gradient_bytes: int
    input_bytes: int
    weight_copy_bytes: int
    saved_bytes: dict[str, int]
    end_of_forward_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    step_peak_bytes: int
    seconds: float

    @property
    def peak_bytes(self) -> int:
        """Peak allocated over the whole step."""
        return max(self.forward_peak_bytes, self.backward_peak_bytes, self.step_peak_bytes)

    @property
    def saved_activation_bytes(self) -> int:
        return sum(self.saved_bytes.values())


def _storage(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return int(s.data_ptr()), int(s.nbytes())


def _component_hooks(detector, tag: list[str]):
    """Forward (pre-)hooks that keep ``tag[-1]`` = the component running now; returns the handles."""
    net = detector.network
    parts = {"encoder": [net.encoder], "decoder": [net.decoder],
             "heads": [net.cls_head, net.reg_head, *net.reg_scales], "seg": [net.seg_head, detector.seg_loss]}

    def enter(name):
        def hook(*_):
            tag.append(name)  # returns None: the module's input stays

        return hook

    def leave(*_):
        tag.pop()  # returns None: the module's output stays

    handles = []
    for name, modules in parts.items():
        for m in modules:
            handles += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    return handles


def _phase_peaks(prof, before: int) -> dict[str, int]:
    """Per phase (``record_function`` ranges named ``phase:<name>``), the peak of allocated bytes: ``before``
    plus the running sum of the profiler's CPU memory events in time order; ``end_of_forward`` too."""
    events = list(prof.profiler.kineto_results.events())
    phases = {e.name()[6:]: (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("phase:")}
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    peaks = dict.fromkeys(phases, before)
    cur, end_fwd = before, None
    for t, n in memory:
        if end_fwd is None and t > phases["forward"][1]:
            end_fwd = cur
        cur += n
        for name, (a, b) in phases.items():
            if a <= t <= b:
                peaks[name] = max(peaks[name], cur)
    peaks["end_of_forward"] = cur if end_fwd is None else end_fwd
    return peaks


def synthetic_batch(batch_size: int, in_channels: int, patch_size: Sequence[int], boxes_per_image: int,
                    seed: int = 0):
    """Random images, ``boxes_per_image`` random boxes per image (an eighth to a third of the patch per axis)
    and their instance map (int32, as the loader gives it)."""
    g = torch.Generator().manual_seed(seed)
    dim = len(patch_size)
    images = torch.randn(batch_size, in_channels, *patch_size, generator=g)
    seg = torch.zeros(batch_size, 1, *patch_size, dtype=torch.int32)
    targets = []
    for b in range(batch_size):
        boxes = []
        for i in range(boxes_per_image):
            lo, hi = [], []
            for s in patch_size:
                e = int(torch.randint(max(1, s // 8), max(2, s // 3 + 1), (1,), generator=g))
                start = int(torch.randint(0, s - e + 1, (1,), generator=g))
                lo.append(start)
                hi.append(start + e)
            boxes.append([*lo, *hi])
            seg[(b, 0, *(slice(lo[a], hi[a]) for a in range(dim)))] = i + 1
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 2 * dim),
                        "labels": torch.zeros(len(boxes), dtype=torch.long)})
    return images, targets, seg


def measure_step(plan, patch_size: Sequence[int] | None = None, batch_size: int | None = None,
                 cuda_policy: bool = True, boxes_per_image: int | None = None, seed: int = 0) -> StepMemory:
    """One training step of ``plan``'s detector on the CPU under bfloat16 autocast; see the module docstring.

    Args:
        plan: a ``planner.plan.Plan`` (architecture and anchors).
        patch_size, batch_size: what to measure (default: the plan's).
        cuda_policy: run CUDA autocast's float32 ops in float32 (:class:`CudaAutocastPolicy`).
        boxes_per_image: GT boxes per image (default the estimate's ``DEFAULT_BOXES_PER_IMAGE``).
        seed: torch seed of the weights, the batch and the hard-negative draw.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from bundles.retinaunet_template.scripts.detector import build_detector, detector_kwargs_from_plan
    from bundles.retinaunet_template.scripts.trainer import build_optimizer
    from planner.plan.memory import DEFAULT_BOXES_PER_IMAGE

    patch = [int(p) for p in (patch_size or plan.patch_size)]
    batch = int(batch_size or plan.batch_size)
    torch.manual_seed(seed)
    detector = build_detector(**detector_kwargs_from_plan(plan)).train()
    optimizer = build_optimizer(detector, lr=1e-3)
    for group in optimizer.param_groups:  # CUDA's default: one foreach kernel per group (CPU: a loop)
        group["foreach"] = True
    params = list(detector.parameters())
    for p in params:  # the state after the first step: the momentum buffers exist (SGD clones the first grad)
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    g = DEFAULT_BOXES_PER_IMAGE if boxes_per_image is None else int(boxes_per_image)
    images, targets, seg = synthetic_batch(batch, plan.architecture.in_channels, patch, g, seed)
    param_ptrs = {_storage(p)[0] for p in params}
    param_bytes = sum(_storage(p)[1] for p in params)
    param_bytes += sum(_storage(optimizer.state[p]["momentum_buffer"])[1] for p in params)
    input_bytes = images.nbytes + seg.nbytes + sum(t["boxes"].nbytes + t["labels"].nbytes for t in targets)

    tag: list[str] = ["detection_loss"]
    seen: dict[int, tuple[int, str, weakref.ref]] = {}

    def pack(t):
        ptr, nbytes = _storage(t)
        # once per storage; a freed storage's address can come back for a later tensor
        if ptr and ptr not in param_ptrs and (ptr not in seen or seen[ptr][2]() is None):
            kind = "weight_copies" if _is_weight_copy(t) else tag[-1]
            seen[ptr] = (nbytes, kind, weakref.ref(t))
        return t

    handles = _component_hooks(detector, tag)
    policy = CudaAutocastPolicy() if cuda_policy else contextlib.nullcontext()
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("phase:forward"):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), policy:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        losses = detector(images, targets, seg)
                    loss = sum(losses.values())
            alive: dict[str, int] = {}
            for nbytes, kind, ref in seen.values():
                if ref() is not None:
                    alive[kind] = alive.get(kind, 0) + nbytes
            with record_function("phase:backward"):
                loss.backward()
            with record_function("phase:step"):
                optimizer.step()
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - t0
    grads = sum(_storage(p.grad)[1] for p in params if p.grad is not None)
    peaks = _phase_peaks(prof, param_bytes + input_bytes)
    return StepMemory(
        plan_id=plan.plan_id, patch_size=tuple(patch), batch_size=batch, parameter_bytes=param_bytes,
        gradient_bytes=grads, input_bytes=int(input_bytes), weight_copy_bytes=alive.pop("weight_copies", 0),
        saved_bytes={c: alive.get(c, 0) for c in COMPONENTS}, end_of_forward_bytes=peaks["end_of_forward"],
        forward_peak_bytes=peaks["forward"], backward_peak_bytes=peaks["backward"], step_peak_bytes=peaks["step"],
        seconds=seconds,
    )


# ------------------------------------------------------------------------------------------- the five plans
def _stats():
    from planner.fingerprint import IntensityStats

    return IntensityStats(mean=100.0, std=20.0, median=95.0, min=-50.0, max=400.0, percentile_00_5=10.0,
                          percentile_99_5=300.0, num_voxels=1000)


def _fingerprint(task: str, spacings, shapes, boxes, modalities: Sequence[str]):
    from planner.dataset import DatasetInfo
    from planner.fingerprint import CaseFingerprint, Fingerprint

    dim = len(spacings[0])
    cases = [CaseFingerprint(
        case_id=f"case{i:03d}", shape=[int(s) for s in sh], spacing=[float(s) for s in sp],
        crop_bbox=[[0, int(s)] for s in sh], shape_after_crop=[int(s) for s in sh], size_reduction=1.0,
        boxes=[[float(v) for v in b] for b in bx], box_classes=[0] * len(bx), instance_ids=list(range(1, len(bx) + 1)),
        intensity=[_stats() for _ in modalities],
    ) for i, (sp, sh, bx) in enumerate(zip(spacings, shapes, boxes, strict=True))]
    mods = {str(i): m for i, m in enumerate(modalities)}
    fp = Fingerprint(task=task, dim=dim, modalities=mods, labels={"0": "lesion"}, cases=cases,
                     intensity=[_stats() for _ in modalities], num_instances={"0": sum(len(b) for b in boxes)})
    return fp, DatasetInfo(task=task, dim=dim, labels={"0": "lesion"}, modalities=mods)


def _boxes(rng, shape, spacing, mm_lo: float, mm_hi: float, n: int) -> list[list[int]]:
    out = []
    for _ in range(n):
        mm = rng.uniform(mm_lo, mm_hi)
        ext = [int(max(1, min(shape[a] - 1, round(mm / spacing[a])))) for a in range(len(shape))]
        start = [int(rng.integers(0, shape[a] - ext[a])) for a in range(len(shape))]
        out.append([*start, *[start[a] + ext[a] for a in range(len(shape))]])
    return out


def _task(task: str, spacing, shape, jitter, lesions_mm, large_mm, modalities, cases: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    spacings, shapes, boxes = [], [], []
    for _ in range(cases):
        sh = [int(rng.integers(s - j, s + j + 1)) for s, j in zip(shape, jitter, strict=True)]
        bx = _boxes(rng, sh, spacing, *lesions_mm, 3)
        if large_mm:
            bx += _boxes(rng, sh, spacing, *large_mm, 1)
        spacings.append(list(spacing))
        shapes.append(sh)
        boxes.append(bx)
    return _fingerprint(task, spacings, shapes, boxes, modalities)


def probe_plans() -> dict[str, object]:
    """The five plans of the calibration by name (see :func:`_probe_plans`; planned once per process)."""
    return dict(_probe_plans())


@functools.lru_cache(maxsize=1)
def _probe_plans() -> dict[str, object]:
    """The five plans of the calibration, by name, made by ``plan_task`` (default budget) from synthetic tasks:

    - ``3d``, ``3dlr1``: a CT-like task (10 cases of ~256x256x80 voxels at 0.8x0.8x2.5 mm, lesions of 8-40 mm
      and one 120-180 mm object per case, which triggers the low-resolution plan);
    - ``2d``: a 2D task (radiographs of ~512x512 at 0.5 mm, 8-40 mm findings);
    - ``3d_2mod``: a 2-modality MR task (T1, T2; ~160^3 at 1 mm);
    - ``3d_cpu``: the CT-like task planned with the ``cpu`` preset.
    """
    from planner.plan.planner import plan_task

    ct = _task("Task901_MemCT", (0.8, 0.8, 2.5), (256, 256, 80), (16, 16, 10), (8, 40), (120, 180), ("CT",))
    main, lowres = plan_task(*ct)
    cpu = plan_task(*ct, preset="cpu")[0]
    (two_d,) = plan_task(*_task("Task902_MemXR", (0.5, 0.5), (512, 512), (32, 32), (8, 40), None, ("XR",)))
    (mr,) = plan_task(*_task("Task903_MemMR", (1.0, 1.0, 1.0), (160, 160, 160), (10, 10, 10), (6, 30), None,
                             ("T1", "T2")))
    return {"3d": main, "3dlr1": lowres, "2d": two_d, "3d_2mod": mr, "3d_cpu": cpu}


def reduced_patch(plan, max_voxels: int) -> list[int]:
    """The plan's patch scaled down (same aspect) to at most ``max_voxels`` voxels, every axis a multiple of
    the network's total stride on it (at least one multiple): a valid input of the same network."""
    step = np.prod(np.asarray(plan.architecture.strides, dtype=np.int64), axis=0)
    patch = np.asarray(plan.patch_size, dtype=np.float64)
    if np.prod(patch) <= max_voxels:
        return [int(p) for p in plan.patch_size]
    lo, hi = 0.0, 1.0
    for _ in range(40):  # largest scale whose rounded patch fits
        mid = (lo + hi) / 2
        cand = np.maximum(step, np.round(patch * mid / step) * step)
        lo, hi = (mid, hi) if np.prod(cand) <= max_voxels else (lo, mid)
    out = np.minimum(np.maximum(step, np.round(patch * lo / step) * step), plan.patch_size)
    while np.prod(out // step) < 2:  # instance norm needs more than one element in the bottleneck
        a = int(np.argmax(np.asarray(plan.patch_size) / out))
        out[a] += step[a]
    return [int(v) for v in out]


@dataclass(frozen=True)
class Comparison:
    """A plan measured on the CPU next to the planner's estimate at the same patch, batch and boxes per image.

    Attributes:
        name: the plan's name in :func:`probe_plans`.
        measured: the CPU measurement.
        estimate: ``memory_breakdown`` (with the CUDA margin in ``total``).
        phases: ``phase_peaks`` (without it): end of forward, forward, backward, step.
    """

    name: str
    measured: StepMemory
    estimate: dict[str, int]
    phases: dict[str, int]

    @property
    def estimated_step_bytes(self) -> int:
        """The estimate without the CUDA-only margin (context and workspace offset): what the CPU can show."""
        return int(self.estimate["total"] - self.estimate["cuda_context"] - self.estimate["workspace_offset"])

    @property
    def ratio(self) -> float:
        """Estimated / measured peak of the step."""
        return self.estimated_step_bytes / self.measured.peak_bytes

    @property
    def activation_ratio(self) -> float | None:
        """Measured / estimated activation-dependent part of the peak (the peak less weights, momentum, weight
        copies and the batch), what ``CALIBRATION_FACTOR`` scales; None when the optimizer step is the peak."""
        m = self.measured
        if m.peak_bytes == m.step_peak_bytes:
            return None
        fixed = m.parameter_bytes + m.weight_copy_bytes + m.input_bytes
        return (m.peak_bytes - fixed) / (self.estimated_step_bytes - fixed)


def compare(name: str, plan, patch_size: Sequence[int] | None = None, batch_size: int | None = None,
            cuda_policy: bool = True, boxes_per_image: int | None = None) -> Comparison:
    """Measure ``plan`` at ``patch_size`` / ``batch_size`` and evaluate the estimate at the same."""
    from planner.plan.memory import DEFAULT_BOXES_PER_IMAGE, memory_breakdown, phase_peaks

    g = DEFAULT_BOXES_PER_IMAGE if boxes_per_image is None else int(boxes_per_image)
    m = measure_step(plan, patch_size, batch_size, cuda_policy=cuda_policy, boxes_per_image=g)
    args = (plan.architecture, list(m.patch_size), m.batch_size, plan.anchors.num_anchors_per_location)
    return Comparison(name, m, memory_breakdown(*args, num_boxes_per_image=g),
                      phase_peaks(*args, num_boxes_per_image=g))


def table(rows: Sequence[Comparison]) -> str:
    """Markdown: measured (saved for backward, parameters, peak) next to the estimate, per plan."""
    out = ["| plan | patch | batch | measured: saved for backward | weights + grads + momentum | peak (phase) | "
           "estimate (w/o CUDA margin) | estimate / measured |", "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        m = c.measured
        saved = m.saved_activation_bytes + m.weight_copy_bytes
        params = m.parameter_bytes + m.gradient_bytes
        phase = max(("forward", m.forward_peak_bytes), ("backward", m.backward_peak_bytes),
                    ("step", m.step_peak_bytes), key=lambda x: x[1])[0]
        out.append(f"| {c.name} ({m.plan_id}) | {'x'.join(map(str, m.patch_size))} | {m.batch_size} | "
                   f"{saved / MIB:.1f} MiB | {params / MIB:.1f} MiB | {m.peak_bytes / MIB:.1f} MiB ({phase}) | "
                   f"{c.estimated_step_bytes / MIB:.1f} MiB | {c.ratio:.3f} |")
    return "\n".join(out)


def phase_table(rows: Sequence[Comparison]) -> str:
    """Markdown: measured / estimated MiB at the end of the forward pass and at each phase's peak."""
    out = ["| plan | end of forward | forward peak | backward peak | step peak | saved: measured / meta pass |",
           "|---|---|---|---|---|---|"]
    for c in rows:
        m, e = c.measured, c.phases
        meas = (m.end_of_forward_bytes, m.forward_peak_bytes, m.backward_peak_bytes, m.step_peak_bytes)
        est = (e["end_of_forward"], e["forward"], e["backward"], e["step"])
        comp = components(c)
        net = sum(comp[k][0] for k in ("encoder", "decoder", "heads")), sum(comp[k][1] for k in
                                                                            ("encoder", "decoder", "heads"))
        out.append(f"| {c.name} | " + " | ".join(f"{a / MIB:.1f} / {b / MIB:.1f}" for a, b in zip(meas, est, strict=True))
                   + f" | {net[0]:.2f} / {net[1]:.2f} |")
    return "\n".join(out)


ESTIMATE_KEYS = {"encoder": "encoder_activations", "decoder": "decoder_activations", "heads": "head_activations",
                 "seg": "seg_head_activations", "detection_loss": "loss_activations"}


def components(c: Comparison) -> dict[str, tuple[float, float]]:
    """Per component of what is saved for backward (MiB): (measured, estimated)."""
    m, e = c.measured, c.estimate
    pairs = {k: (m.saved_bytes[k], e[ESTIMATE_KEYS[k]]) for k in COMPONENTS}
    pairs["weight_copies"] = (m.weight_copy_bytes, e["weight_copies"])
    return {k: (a / MIB, b / MIB) for k, (a, b) in pairs.items()}


def probe_sizes(plan, max_voxels: int | None = TEST_MAX_VOXELS, batch_size: int | None = TEST_BATCH
                ) -> tuple[list[int], int]:
    """(patch, batch) to measure ``plan`` at: its patch shrunk to ``max_voxels`` voxels in 3D, half of it in 2D
    (None: the plan's patch), and ``batch_size`` images (None: the plan's batch)."""
    if max_voxels is not None and plan.dim == 2:
        max_voxels //= 2
    patch = list(plan.patch_size) if max_voxels is None else reduced_patch(plan, max_voxels)
    return patch, int(batch_size or plan.batch_size)


__all__ = ["Comparison", "CudaAutocastPolicy", "StepMemory", "compare", "components", "measure_step",
           "phase_table", "probe_plans", "probe_sizes", "reduced_patch", "synthetic_batch", "table"]
