"""Training GPU memory of the Retina U-Net, estimated without a GPU (nnDetection measures it on one).

nnDetection (``MemoryEstimatorDetection``) builds the network while planning and measures the memory
of 10 real training steps on a GPU. We count it instead: what autograd keeps for the backward pass at
the peak (the end of the forward pass), the largest gradient buffers alive during the backward pass,
the parameters with their gradients and SGD momentum, the anchors and the matcher's matrices, plus two
fixed terms nnDetection also budgets: the CUDA context and a safety offset for cuDNN workspaces and
allocator slack. The result is a pure function of (architecture, patch, batch, anchors per location).

The network's own facts (channels of every encoder stage and FPN level, convs per stage and per head
tower, which FPN levels have an output conv, head output channels, parameter count) are not described
here: :mod:`planner.plan.network_facts` reads them off the template's network built on the ``meta``
device. This module only models the bytes each kind of layer keeps.

What one layer keeps (bytes per element, AMP = fp16 activations, fp32 master weights):

- encoder ``conv -> InstanceNorm -> ReLU(inplace)``: the conv output (input of the norm) and the
  norm/ReLU output (input of the next conv): 2 fp16 tensors. InstanceNorm is not on autocast's fp32
  list, so it runs in fp16.
- head ``conv -> GroupNorm -> ReLU``: GroupNorm *is* on autocast's fp32 list, so the conv output is
  cast to an fp32 copy (kept by the norm), the norm/ReLU output is fp32 (kept by ReLU) and the next
  conv keeps its own fp16 cast: 4 + 4 + 2 = 10 bytes.
- FPN level: the merged map (kept by the next upsampling and the output conv) and, on the levels with
  an output conv (the decoder levels and P0), the output map.

``CALIBRATION_FACTOR`` scales the activation part and is 1.0 until a measurement on a GPU says
otherwise (``benchmarks``: measure ``torch.cuda.max_memory_reserved`` of real training steps with
the bundle's network and set the factor to measured / estimated activation bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from planner.plan.network_facts import network_facts
from planner.plan.plan import ArchitecturePlan

MIB = 2**20
CUDA_CONTEXT_BYTES = 910 * MIB  # nnDetection's CUDA context assumption (RTX 2080 Ti)
WORKSPACE_OFFSET_BYTES = 768 * MIB  # nnDetection's safety offset (cuDNN workspaces, fluctuation)
DEFAULT_BUDGET_BYTES = 11523260416 - 11 * MIB  # nnDetection's target: RTX 2080 Ti total minus 11 MB
CALIBRATION_FACTOR = 1.0  # measured / estimated activations; 1.0 = not yet calibrated on a GPU
DEFAULT_BOXES_PER_IMAGE = 16  # GT boxes per image the matcher sees (IoU/distance matrices)
BACKWARD_GRAD_BUFFERS = 3  # activation-gradient buffers alive at once in backward, largest map
PARAM_BYTES_SGD = 4 + 4 + 4  # fp32 weight, gradient, momentum
PARAM_BYTES_AMP_COPY = 2  # autocast's cached fp16 copy of each weight during a step
GN_HEAD_BYTES_AMP = 4 + 4 + 2  # fp32 norm input copy, fp32 norm/ReLU output, fp16 copy for next conv
SEG_BYTES_PER_CLASS = 2 + 4 + 4 + 4 + 4 + 8  # logits, CE fp32 cast/log-softmax, Dice softmax/one-hot/products


def count_parameters(arch: ArchitecturePlan, num_anchors_per_location: int) -> int:
    """Parameters of the template's Retina U-Net for this plan: ``sum(p.numel())`` of the built network."""
    return network_facts(arch, num_anchors_per_location).num_parameters


def memory_breakdown(
    arch: ArchitecturePlan,
    patch_size: Sequence[int],
    batch_size: int,
    num_anchors_per_location: int,
    amp: bool = True,
    num_boxes_per_image: int = DEFAULT_BOXES_PER_IMAGE,
) -> dict[str, int]:
    """Bytes per component of the training peak; ``total`` is what the planner compares with the budget.

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
    act = 2 if amp else 4
    b = int(batch_size)
    dim = arch.dim
    net = network_facts(arch, num_anchors_per_location)
    enc, fpn = list(net.encoder_channels), list(net.fpn_channels)
    cum = np.cumprod(np.asarray(arch.strides, dtype=np.int64), axis=0)
    vox = [int(np.prod(np.maximum(np.asarray(patch_size) // c, 1))) for c in cum]
    levels = list(arch.decoder_levels)
    a = num_anchors_per_location
    num_anchors = a * sum(vox[lv] for lv in levels)

    # fp32 image, its fp16 cast kept by the first conv, seg target
    inputs = b * vox[0] * (arch.in_channels * (4 + (2 if amp else 0)) + 4)
    # every conv of a stage keeps its output and the norm/ReLU output
    encoder = sum(b * n * 2 * c * v * act for n, c, v in zip(net.encoder_convs, enc, vox, strict=True))
    # merged map per FPN level, output map on the levels with an output conv
    decoder = sum(b * (2 if s in net.fpn_output_levels else 1) * c * v * act
                  for s, (c, v) in enumerate(zip(fpn, vox, strict=True)))
    gn = GN_HEAD_BYTES_AMP if amp else 4 + 4
    tower_convs = net.cls_head_convs + net.reg_head_convs
    heads = 0
    for lv in levels:
        heads += b * tower_convs * net.head_channels * vox[lv] * gn  # cls + reg towers
        heads += b * net.cls_out_channels * vox[lv] * act * 3  # logits, permuted copy, concatenation
        heads += b * net.reg_out_channels * vox[lv] * act * 4  # deltas, learnable scale, permuted copy, concat
    seg = b * vox[0] * (net.seg_classes * SEG_BYTES_PER_CLASS + 8)
    anchors = b * num_anchors * 2 * dim * 4  # fp32 anchors per image (MONAI generates one set per image)
    anchors += b * num_anchors * (8 + 4 * arch.num_classes)  # matched indices (int64), sampler probabilities
    # the matcher's IoU and distance matrices and anchor centres, one image at a time
    anchors += num_anchors * 4 * (2 * max(1, num_boxes_per_image) + 3 * dim)
    largest = max(b * c * v * act for c, v in zip(enc + fpn, vox + vox, strict=True))
    backward = BACKWARD_GRAD_BUFFERS * largest
    params = net.num_parameters
    param_bytes = params * (PARAM_BYTES_SGD + (PARAM_BYTES_AMP_COPY if amp else 0))

    activations = inputs + encoder + decoder + heads + seg + anchors + backward
    out = {
        "cuda_context": CUDA_CONTEXT_BYTES,
        "workspace_offset": WORKSPACE_OFFSET_BYTES,
        "parameters": int(param_bytes),
        "inputs": int(inputs),
        "encoder_activations": int(encoder),
        "decoder_activations": int(decoder),
        "head_activations": int(heads),
        "seg_head_activations": int(seg),
        "anchors_and_matching": int(anchors),
        "backward_transient": int(backward),
        "num_parameters": params,
    }
    fixed = CUDA_CONTEXT_BYTES + WORKSPACE_OFFSET_BYTES + param_bytes
    out["total"] = int(fixed + CALIBRATION_FACTOR * activations)
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
