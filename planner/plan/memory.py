"""Training GPU memory of the Retina U-Net, estimated without a GPU (nnDetection measures it on one).

nnDetection (``MemoryEstimatorDetection``) builds the network while planning and measures the memory
of 10 real training steps on a GPU. We count it instead, phase by phase of one training step (forward pass
with the losses, backward pass, optimizer step), and take the largest, plus two fixed terms nnDetection also
budgets: the CUDA context and a safety offset for cuDNN workspaces and allocator slack. The result is a pure
function of (architecture, patch, batch, anchors per location, boxes per image).

Where the numbers come from:

- **the network** (:mod:`planner.plan.network_facts`): the template's ``RetinaUNet`` is built on the
  ``meta`` device; its parameter count and weight-decay group are read off its modules, and what its forward
  pass saves for the backward pass is counted by running it once on ``meta`` tensors under CUDA autocast's
  casting rules (``SavedActivations``: bytes per voxel of every pyramid level, by encoder, decoder, heads and
  segmentation head, and the 16-bit weight copies). Nothing here describes the network a second time, so the
  estimate follows ``network.py`` when it changes. (The hand count this replaced had wrong terms: conv biases
  in the encoder, which MONAI's ``UnetBasicBlock`` does not have; a "merged + output" map on every FPN level,
  where the output maps are kept by the heads; the CUDA-only GroupNorm fp32 copies counted by hand.)
- **the losses** (``scripts/detector.py``, ``scripts/losses.py``, MONAI's ATSS matcher and box IoU): modelled
  below per anchor, per voxel and per GT box, term by term with the code line it stands for. They run partly
  on data-dependent shapes (matching, sampling), which a meta pass cannot follow.
- **the optimizer**: fp32 weights and SGD momentum all step long; fp32 gradients and, in CUDA's foreach SGD,
  one gradient copy for the weight-decay group during ``step()``.

Per phase (b images, N anchors per image, V voxels, G GT boxes per image, C classes, K = 2 * dim, S seg
classes, ``act`` = 2 bytes under AMP, 4 in float32):

- **forward**: parameters + weight copies + inputs + what the network saves, plus the largest of the loss
  stage's moments: matching the last image (MONAI's ``box_iou`` holds four ``[G, N, dim]`` float32 arrays,
  or three and three ``[G, N]`` ones, next to the ``[G, N]`` centre distances); the foreground probabilities of the sampler; the stacked matched
  boxes; the segmentation loss. All of them on top of the network outputs (kept by the detector until the
  forward returns), their flattened copies, the anchors and the per-image labels and matched boxes.
- **backward**: everything saved at the end of the forward pass plus gradient buffers of the largest map
  (``BACKWARD_GRAD_BUFFERS`` of the batch and ``BACKWARD_IMAGE_BUFFERS`` of one image; the largest of the
  encoder/FPN maps, the heads' fp32 maps and the head outputs).
- **step**: parameters + gradients + the foreach copy of the decayed gradients.

``CALIBRATION_FACTOR`` scales the activation-dependent terms; it was set from a measurement of one training
step on the CPU under bfloat16 autocast (same 2 bytes as fp16 AMP; ``benchmarks/memory_probe.py``, which also
runs CUDA autocast's float32 ops in float32 as a GPU does) of five plans; see its comment for the numbers.
What the CPU cannot measure stays the fixed margin: ``CUDA_CONTEXT_BYTES`` and ``WORKSPACE_OFFSET_BYTES``
(cuDNN's workspaces and the caching allocator's block rounding and fragmentation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from planner.plan.network_facts import network_facts, network_saved_activations
from planner.plan.plan import ArchitecturePlan

MIB = 2**20
CUDA_CONTEXT_BYTES = 910 * MIB  # nnDetection's CUDA context assumption (RTX 2080 Ti)
WORKSPACE_OFFSET_BYTES = 768 * MIB  # nnDetection's safety offset (cuDNN workspaces, fluctuation)
DEFAULT_BUDGET_BYTES = 11523260416 - 11 * MIB  # nnDetection's target: RTX 2080 Ti total minus 11 MB
# measured / estimated activation part of one step on the CPU (benchmarks/memory_probe.py via
# ``benchmarks/train_step.py --memory``; tests/planner/test_memory_measured.py): five plans at the test's sizes
# 0.989-0.997 (mean 0.993), at the plans' own patches (batch 1) 0.985-0.995 (mean 0.991). Left at 1.0: the
# model errs by at most 1.5 % high, the safe side; the table is in benchmarks/RESULTS.md
CALIBRATION_FACTOR = 1.0
DEFAULT_BOXES_PER_IMAGE = 16  # GT boxes per image the matcher sees (IoU/distance matrices)
# backward: gradient buffers of the largest map alive at once on top of the saved tensors, for the batch and
# for one image (measured on the CPU: 3.2x the largest map of one image at batch 1, 2.2x the batch's at 2, 2.1x at 4)
BACKWARD_GRAD_BUFFERS = 2
BACKWARD_IMAGE_BUFFERS = 1
PARAM_BYTES_SGD = 4 + 4  # fp32 weight and SGD momentum, alive all step long
GRAD_BYTES = 4  # fp32 gradient (``zero_grad(set_to_none=True)``: allocated in backward)
FOREACH_GRAD_COPY_BYTES = 4  # CUDA's foreach SGD: ``grads + weight_decay * params`` as new tensors
# per anchor (bytes), the detection loss (scripts/detector.py ``_losses`` / ``_match``)
ANCHOR_LIST_BYTES = 8  # + 4 * K: per image, the anchor labels (int64) and the matched box (fp32 K) per anchor
MATCH_INDEX_BYTES = 8 + 8  # ``_match``: the matcher's index and its clamped copy (int64), one image
# box_iou (MONAI's _box_inter_union), [G, N, dim] / [G, N] float32: the larger of its two moments, lt, rb and two
# temporaries of ``rb - lt + 1`` (4 dim-arrays) or lt, rb, wh with inter, area1 + area2 and union (3 + 3 arrays)
MATCHER_IOU_ARRAYS = (4, 0), (3, 3)  # (per-axis arrays, per-pair arrays)
MATCHER_PAIR_BYTES = 4  # boxes_center_distance: [G, N] float32, alive during box_iou
MATCHER_ANCHOR_BYTES = 4  # + 4 * K: anchor areas (fp32) and centres (fp32, K per anchor)
FG_PROB_BYTES_PER_CLASS = 4 + 4  # sampler input: cls.float() and its sigmoid
FG_PROB_BYTES = 4 + 8  # their max over classes: values (fp32) and indices (int64)
STACK_BYTES = 8 + 2 + 4 + 2  # + 4 * K: stack(labels) int64, pos/sampled masks, fg_probs, sampler masks
LOSS_MASK_BYTES = 2  # pos and sampled masks saved by the indexing for backward
# per voxel, the segmentation loss (scripts/losses.py SegLoss: CE + MONAI Dice, float32)
SEG_SAVED_BYTES_PER_CLASS = 3 * 4  # log_softmax output (CE), softmax output and one-hot target (Dice)
SEG_SAVED_BYTES = 8  # the int64 foreground target
SEG_TRANSIENT_BYTES_PER_CLASS = 4 + 4  # logits.float() and the Dice product (one class less, rounded up)


def count_parameters(arch: ArchitecturePlan, num_anchors_per_location: int) -> int:
    """Parameters of the template's Retina U-Net for this plan: ``sum(p.numel())`` of the built network."""
    return network_facts(arch, num_anchors_per_location).num_parameters


def _level_voxels(arch: ArchitecturePlan, patch_size: Sequence[int]) -> list[int]:
    cum = np.cumprod(np.asarray(arch.strides, dtype=np.int64), axis=0)
    return [int(np.prod(np.maximum(np.asarray(patch_size) // c, 1))) for c in cum]


def _model(arch: ArchitecturePlan, patch_size: Sequence[int], batch_size: int, num_anchors_per_location: int,
           amp: bool, num_boxes_per_image: int) -> tuple[dict[str, int], dict[str, int]]:
    """(kept-at-end-of-forward components, phase peaks), bytes without the CUDA margin."""
    act = 2 if amp else 4
    b, dim, k = int(batch_size), arch.dim, 2 * arch.dim
    g = max(1, int(num_boxes_per_image))
    facts = network_facts(arch, num_anchors_per_location)
    saved = network_saved_activations(arch, num_anchors_per_location, amp)
    vox = _level_voxels(arch, patch_size)
    v = vox[0]
    n = num_anchors_per_location * sum(vox[lv] for lv in arch.decoder_levels)  # anchors per image
    c, s = facts.cls_out_channels // num_anchors_per_location, facts.seg_classes
    cal = CALIBRATION_FACTOR

    params = facts.num_parameters * PARAM_BYTES_SGD
    copies = saved.weight_copies
    inputs = b * v * (4 * arch.in_channels + 4) + b * g * (4 * k + 8)  # fp32 image, int32 seg, boxes, labels
    net = saved.component_bytes(vox, b)
    seg_saved = b * v * (s * SEG_SAVED_BYTES_PER_CLASS + SEG_SAVED_BYTES)
    loss_saved = b * n * LOSS_MASK_BYTES
    kept = {
        "encoder_activations": cal * net["encoder"],
        "decoder_activations": cal * net["decoder"],
        "head_activations": cal * net["heads"],
        "seg_head_activations": cal * (net["seg_head"] + seg_saved),
        "loss_activations": cal * loss_saved,
    }
    base = params + copies + inputs
    end_of_forward = base + sum(kept.values())

    # the loss stage, on top of the network's saved tensors (no loss tensor saved yet)
    outputs = b * n * (c + k) * act + b * s * v * act  # cls / scaled reg / seg logits, held until forward returns
    flat = b * n * (c + k) * act  # _flatten_levels: contiguous [B, N, C] and [B, N, K] copies
    anchors = n * k * 4  # one fp32 set for the batch (anchors_for)
    lists = n * (ANCHOR_LIST_BYTES + 4 * k)  # per matched image
    common = outputs + flat + anchors
    matching = (common + (b - 1) * lists + n * MATCH_INDEX_BYTES
                + n * (g * (4 * max(a * dim + p for a, p in MATCHER_IOU_ARRAYS) + MATCHER_PAIR_BYTES)
                       + MATCHER_ANCHOR_BYTES + 4 * k))
    fg_probs = common + b * lists + b * n * (FG_PROB_BYTES_PER_CLASS * c + FG_PROB_BYTES)
    stacks = common + b * lists + b * n * (STACK_BYTES + 4 * k)
    seg_loss = common + b * lists + loss_saved + seg_saved + b * v * s * SEG_TRANSIENT_BYTES_PER_CLASS
    net_saved = sum(net.values())
    forward = base + cal * (net_saved + max(matching, fg_probs, stacks, seg_loss))

    # the largest gradient buffer of one image: an encoder/FPN map, a head tower map (fp32 after GroupNorm) or
    # a head output (the flattened outputs' gradients are scattered back into full-size tensors)
    largest = max([ch * vv * act for ch, vv in zip(list(facts.encoder_channels) + list(facts.fpn_channels),
                                                   vox + vox, strict=True)]
                  + [facts.head_channels * vox[lv] * 4 for lv in arch.decoder_levels]
                  + [n * k * act, n * c * act])
    backward = end_of_forward + cal * (BACKWARD_GRAD_BUFFERS * b + BACKWARD_IMAGE_BUFFERS) * largest
    step = params + inputs + facts.num_parameters * GRAD_BYTES + facts.num_decay_parameters * FOREACH_GRAD_COPY_BYTES
    components = {"parameters": int(params), "weight_copies": int(copies), "inputs": int(inputs),
                  **{key: int(val) for key, val in kept.items()}}
    phases = {"end_of_forward": int(end_of_forward), "forward": int(forward), "backward": int(backward),
              "step": int(step)}
    return components, phases


def phase_peaks(
    arch: ArchitecturePlan,
    patch_size: Sequence[int],
    batch_size: int,
    num_anchors_per_location: int,
    amp: bool = True,
    num_boxes_per_image: int = DEFAULT_BOXES_PER_IMAGE,
) -> dict[str, int]:
    """Estimated bytes in use at the end of the forward pass and at the peak of each phase (forward incl.
    losses, backward, optimizer step), without the CUDA margin: what ``benchmarks/memory_probe.py`` measures."""
    return _model(arch, patch_size, batch_size, num_anchors_per_location, amp, num_boxes_per_image)[1]


def memory_breakdown(
    arch: ArchitecturePlan,
    patch_size: Sequence[int],
    batch_size: int,
    num_anchors_per_location: int,
    amp: bool = True,
    num_boxes_per_image: int = DEFAULT_BOXES_PER_IMAGE,
) -> dict[str, int]:
    """Bytes per component of the training peak; ``total`` is what the planner compares with the budget.

    The components add up to ``total``: the CUDA margin, the parameters (fp32 weights and momentum), autocast's
    weight copies, the inputs, what is saved for backward at the end of the forward pass (encoder, decoder,
    heads, segmentation head and loss, detection loss) and ``peak_transient``, what the step's peak phase
    (see :func:`phase_peaks`) holds on top of that.

    Args:
        arch: topology (stage strides/kernels, channels, decoder levels, classes).
        patch_size: [dim] training patch (voxels, transposed order).
        batch_size: images per step.
        num_anchors_per_location: A (27 in 3D).
        amp: fp16 activations (autocast) if True, fp32 otherwise.
        num_boxes_per_image: GT boxes per image for the matcher's matrices.

    Returns:
        dict of component -> bytes, with ``total`` (and ``num_parameters``, a count).
    """
    components, phases = _model(arch, patch_size, batch_size, num_anchors_per_location, amp, num_boxes_per_image)
    peak = max(phases["forward"], phases["backward"], phases["step"])
    out = {"cuda_context": CUDA_CONTEXT_BYTES, "workspace_offset": WORKSPACE_OFFSET_BYTES, **components}
    out["peak_transient"] = int(peak - sum(components.values()))
    out["total"] = int(CUDA_CONTEXT_BYTES + WORKSPACE_OFFSET_BYTES + peak)
    out["num_parameters"] = network_facts(arch, num_anchors_per_location).num_parameters
    return out


def estimate_training_memory(
    arch: ArchitecturePlan,
    patch_size: Sequence[int],
    batch_size: int,
    num_anchors_per_location: int,
    amp: bool = True,
) -> int:
    """Estimated peak GPU memory (bytes) of one training step; see :func:`memory_breakdown`."""
    return memory_breakdown(arch, patch_size, batch_size, num_anchors_per_location, amp=amp)["total"]
