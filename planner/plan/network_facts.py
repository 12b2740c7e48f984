"""What the planner knows of the Retina U-Net, read off the template's own network definition.

The memory estimate (:mod:`planner.plan.memory`) needs facts about the network a plan will train:
the channels of every encoder stage and FPN level, the convs per encoder stage and per head tower,
which FPN levels have an output conv, the head output channels and the parameter count. Rather than
describing the network a second time (and letting the copy drift from it), this module builds the
template's ``RetinaUNet`` from the plan's architecture, exactly as ``scripts/detector.py::build_detector``
does, on PyTorch's ``meta`` device (shapes only: no memory, ~20 ms for nnDetection's 3D network), and
reads the facts from its modules. Each architecture is built once per process (an LRU cache keyed by
the architecture's network arguments), since the planner's patch-shrinking loop asks many times.

Why ``network.py`` is loaded by file path: a plan is made for the network of the template folder the
bundle is generated from, ``planner.bundle.TEMPLATE_DIR``, and that folder's location is all the
planner may know of it: ``planner`` never imports the template's scripts (the layout's import arrows
run from the scripts to the planner's shared base, see ``tests/test_layout.py``). So the file is
executed from that folder with ``importlib`` under a private module name (not registered in
``sys.modules``), which adds no import arrow. ``network.py`` imports only torch and MONAI, so it
loads on its own; ``detector.py`` uses relative imports (``.network``, ``.losses``) and could not be
loaded this way, which is why the anchors per location come from the planner's anchor
parameterisation (:func:`planner.plan.anchors.anchors_per_location`, the same per-axis product
``build_detector`` takes of the plan's anchor sizes) and the head output channels that depend on them
are read from the built network.

What the forward pass saves for the backward pass is read off the same meta network too
(:class:`SavedActivations`): one forward pass on ``meta`` tensors (shapes only) under
``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd keeps, once per storage, by the
module that saved it (encoder, decoder, heads, segmentation head) and by the pyramid level its spatial shape
belongs to. Autocast has no ``meta`` backend, so :class:`CudaAutocast` applies CUDA autocast's casting rules
at the torch-function level: the ops of :data:`CUDA_FP16_OPS` (convolutions, matmuls) get float16 copies of
their floating arguments (one cached copy per parameter, as autocast's weight cache), the ops of
:data:`CUDA_FP32_OPS` (GroupNorm, softmax, ...) float32 ones. Every saved activation has the shape
``[batch, channels, *level]`` (or a view of it), so its bytes are a fixed number per voxel of its level and
per image: one pass at a small reference patch gives the saved bytes of every patch and batch.
``benchmarks/memory_probe.py`` checks these counts against a real training step on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from planner.bundle import TEMPLATE_DIR
from planner.plan.plan import ArchitecturePlan

NETWORK_FILE = TEMPLATE_DIR / "scripts" / "network.py"
_MODULE_NAME = "_planner_template_network"  # private: never importable as ``scripts.network``
_CACHE_SIZE = 256  # architectures kept per process (a plan visits ~10 while shrinking its patch)
SAVED_COMPONENTS = ("encoder", "decoder", "heads", "seg_head")  # who saved a tensor (module of the network)

# CUDA autocast's op lists (torch.amp docs, "CUDA Ops that can autocast to float16 / float32"), by function
# name as torch.*, torch.nn.functional.* and Tensor methods carry it.
CUDA_FP16_OPS = frozenset({
    "__matmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "multi_dot", "conv1d",
    "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "matmul", "mm",
    "mv", "prelu", "scaled_dot_product_attention",
})
CUDA_FP32_OPS = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits",
    "cosh", "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist",
    "erfinv", "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log",
    "log_softmax", "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss",
    "multi_margin_loss", "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod",
    "reciprocal", "rsqrt", "sinh", "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum",
    "renorm", "tan", "triplet_margin_loss",
})


@dataclass(frozen=True)
class SavedActivations:
    """What one forward pass of the network saves for its backward pass (bytes, per image).

    Attributes:
        per_voxel: ``[component][level]`` bytes per voxel of that pyramid level (components:
            :data:`SAVED_COMPONENTS`).
        per_image: ``[component]`` bytes not tied to a level (norm statistics, repeated norm weights).
        weight_copies: bytes of the 16-bit weight copies autocast makes (and the convs save); 0 in float32.
    """

    per_voxel: tuple[tuple[int, ...], ...]
    per_image: tuple[int, ...]
    weight_copies: int

    def component_bytes(self, level_voxels: list[int], batch_size: int) -> dict[str, int]:
        """Saved bytes per component for ``batch_size`` images with ``level_voxels`` voxels per level."""
        return {c: int(batch_size * (sum(k * v for k, v in zip(self.per_voxel[i], level_voxels, strict=True))
                                     + self.per_image[i]))
                for i, c in enumerate(SAVED_COMPONENTS)}


@dataclass(frozen=True)
class NetworkFacts:
    """Facts of one built Retina U-Net (per-stage tuples are indexed by encoder stage / FPN level).

    Attributes:
        num_parameters: ``sum(p.numel() for p in net.parameters())`` (all trainable).
        encoder_channels: output channels of each encoder stage.
        encoder_convs: convs of each encoder stage (each followed by a norm and a ReLU).
        fpn_channels: channels of each FPN level (output of its lateral conv).
        fpn_output_levels: the FPN levels that have an output conv (decoder levels and P0).
        cls_head_convs: conv+norm+ReLU blocks of the classifier tower before its output conv.
        reg_head_convs: the same for the regressor tower.
        head_channels: channels of the head towers' convs.
        cls_out_channels: classifier outputs per location (anchors x foreground classes).
        reg_out_channels: regressor outputs per location (anchors x 2 * dim deltas).
        seg_classes: outputs of the segmentation head on P0.
        num_decay_parameters: parameters in the optimizer's weight-decay group (``scripts.trainer.param_groups``:
            not of a norm layer, not a bias), for which CUDA's foreach SGD makes a gradient copy.
    """

    num_parameters: int
    encoder_channels: tuple[int, ...]
    encoder_convs: tuple[int, ...]
    fpn_channels: tuple[int, ...]
    fpn_output_levels: tuple[int, ...]
    cls_head_convs: int
    reg_head_convs: int
    head_channels: int
    cls_out_channels: int
    reg_out_channels: int
    seg_classes: int
    num_decay_parameters: int


@functools.lru_cache(maxsize=8)
def network_module(path: Path = NETWORK_FILE) -> ModuleType:
    """The template's ``network.py`` executed from ``path`` under a private name (once per path).

    Raises:
        FileNotFoundError: ``path`` does not exist (a broken template folder).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the template's network definition is missing; reinstall the package")
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def network_kwargs(arch: ArchitecturePlan, num_anchors_per_location: int) -> dict[str, Any]:
    """``RetinaUNet`` arguments for a plan's architecture, as ``build_detector`` passes them."""
    return {
        "dim": int(arch.dim),
        "in_channels": int(arch.in_channels),
        "num_classes": int(arch.num_classes),
        "conv_kernels": [[int(k) for k in s] for s in arch.conv_kernels],
        "strides": [[int(k) for k in s] for s in arch.strides],
        "decoder_levels": [int(lv) for lv in arch.decoder_levels],
        "start_channels": int(arch.start_channels),
        "max_channels": int(arch.max_channels),
        "fpn_channels": int(arch.fpn_channels),
        "head_channels": int(arch.head_channels),
        "num_anchors": int(num_anchors_per_location),
        "seg_classes": int(arch.seg_classes),
    }


def _skip_init_mode():
    """A torch-function mode that skips ``torch.nn.init`` calls (meta tensors hold no values).

    Besides saving time, it avoids ``normal_`` on meta tensors, which runs a Python decomposition that
    imports ``torch._dynamo`` (~2 s once per process). Without the mode the result is the same, only
    slower: skipping initialisation changes no shape.
    """
    from torch.overrides import TorchFunctionMode

    class SkipInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__module__", None) == "torch.nn.init":
                return args[0] if args else kwargs["tensor"]
            return func(*args, **kwargs)

    return SkipInit()


def _construct(kwargs: dict[str, Any], device: str, network_file: Path):
    """``RetinaUNet(**kwargs)`` from ``network_file`` on ``device`` (uninitialised on ``meta``)."""
    import torch

    net_cls = network_module(Path(network_file)).RetinaUNet
    if torch.device(device).type != "meta":
        with torch.device(device):
            return net_cls(**kwargs)
    with torch.device("meta"), _skip_init_mode():
        return net_cls(**kwargs)


def build_network(
    arch: ArchitecturePlan, num_anchors_per_location: int, device: str = "meta", network_file: Path = NETWORK_FILE
):
    """The template's ``RetinaUNet`` for ``arch`` on ``device`` (``meta``: shapes only, not initialised).

    Args:
        arch: the plan's architecture.
        num_anchors_per_location: A, as ``build_detector`` derives it from the plan's anchor sizes.
        device: ``"meta"`` (default) or a real device (then initialised as in training).
        network_file: the ``network.py`` to build from (the template's by default).
    """
    return _construct(network_kwargs(arch, num_anchors_per_location), device, network_file)


def _cuda_autocast_mode():
    """:class:`CudaAutocast` (built on first use: ``torch`` is imported lazily by this module)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class CudaAutocast(TorchFunctionMode):
        """CUDA autocast's casts (float16 for :data:`CUDA_FP16_OPS`, float32 for :data:`CUDA_FP32_OPS`) applied
        to the arguments of torch functions, for tensors of any device (``meta`` has no autocast backend).

        As ``torch.autocast``, a float32 leaf that requires grad (a parameter) is cast once and the copy reused
        for the rest of the pass; other ops run as called (type promotion).
        """

        def __init__(self) -> None:
            super().__init__()
            self.weight_cache: dict[int, torch.Tensor] = {}

        def _half(self, a):
            if not (isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype == torch.float32):
                return a
            if a.is_leaf and a.requires_grad:
                if id(a) not in self.weight_cache:
                    self.weight_cache[id(a)] = a.to(torch.float16)
                return self.weight_cache[id(a)]
            return a.to(torch.float16)

        @staticmethod
        def _float(a):
            return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", None)
            cast = self._half if name in CUDA_FP16_OPS else self._float if name in CUDA_FP32_OPS else None
            if cast is not None:
                args = tuple(cast(a) for a in args)
                kwargs = {k: cast(v) for k, v in kwargs.items()}
            return func(*args, **kwargs)

    return CudaAutocast()


def _is_weight_copy(t) -> bool:
    """A cast of a parameter: ``ToCopyBackward0`` straight from a leaf's ``AccumulateGrad``."""
    fn = t.grad_fn
    return (fn is not None and type(fn).__name__ == "ToCopyBackward0"
            and any(n is not None and type(n).__name__ == "AccumulateGrad" for n, _ in fn.next_functions))


def saved_activations(net, amp: bool) -> SavedActivations:
    """Run ``net`` (a ``RetinaUNet``, any device) once on ``meta`` inputs and count what autograd saves.

    The input is batch 1 at a reference patch of twice the network's total stride per axis, where every
    pyramid level has its own spatial shape; each saved tensor (once per storage, parameters and the input
    batch excluded) is attributed to the module running when it was saved and to the level of its trailing
    spatial shape (tensors of no level shape, such as norm statistics, count per image).

    Raises:
        RuntimeError: a tensor saved outside the known modules, or a level's bytes that are no whole number
            per voxel (the attribution no longer fits the network).
    """
    import copy

    import torch

    if any(p.device.type != "meta" for p in net.parameters()):
        net = copy.deepcopy(net).to("meta")
    dim = int(net.dim)
    strides = np.asarray(net.strides, dtype=np.int64)
    cum = np.cumprod(strides, axis=0)
    ref = 2 * cum[-1]
    level_shapes = {tuple(int(v) for v in ref // c): lv for lv, c in enumerate(cum)}
    num_levels = len(cum)
    vox = [int(np.prod(ref // c)) for c in cum]
    parts = {"encoder": [net.encoder], "decoder": [net.decoder],
             "heads": [net.cls_head, net.reg_head, *net.reg_scales], "seg_head": [net.seg_head]}
    tag: list[str] = []
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    seen: set[int] = set()
    per_level = {c: [0] * num_levels for c in SAVED_COMPONENTS}
    per_image = dict.fromkeys(SAVED_COMPONENTS, 0)
    copies = [0]

    def pack(t):
        key = t.untyped_storage()._cdata
        if key in seen or key in params:
            return t
        seen.add(key)
        nbytes = int(t.untyped_storage().nbytes())
        if _is_weight_copy(t):
            copies[0] += nbytes
            return t
        if not tag:
            raise RuntimeError(f"a tensor {tuple(t.shape)} saved outside the known modules of RetinaUNet")
        level = level_shapes.get(tuple(t.shape[-dim:])) if t.dim() >= dim + 1 else None
        if level is None:
            per_image[tag[-1]] += nbytes
        else:
            per_level[tag[-1]][level] += nbytes
        return t

    def enter(name):
        def hook(*_):
            tag.append(name)

        return hook

    def leave(*_):
        tag.pop()

    handles = [h for name, modules in parts.items() for m in modules
               for h in (m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave))]
    x = torch.empty(1, int(net.in_channels), *(int(v) for v in ref), device="meta")
    params.add(x.untyped_storage()._cdata)  # the batch itself is the estimate's ``inputs``, not an activation
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                (_cuda_autocast_mode() if amp else contextlib.nullcontext()):
            net(x)
    finally:
        for h in handles:
            h.remove()
    for c in SAVED_COMPONENTS:
        for lv in range(num_levels):
            if per_level[c][lv] % vox[lv]:
                raise RuntimeError(f"{c}: {per_level[c][lv]} bytes saved at level {lv} are no whole number per voxel")
    return SavedActivations(
        per_voxel=tuple(tuple(per_level[c][lv] // vox[lv] for lv in range(num_levels)) for c in SAVED_COMPONENTS),
        per_image=tuple(per_image[c] for c in SAVED_COMPONENTS),
        weight_copies=int(copies[0]),
    )


def _convs(module) -> list:
    """The convolution layers (plain and transposed) inside ``module``, in registration order."""
    from torch import nn

    return [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]


def measure(net) -> NetworkFacts:
    """Read the facts off a built ``RetinaUNet`` (see :class:`NetworkFacts`).

    Raises:
        RuntimeError: the network's layout is not the one this reader knows (``network.py`` changed
            its attribute names); update :func:`measure` together with it.
    """
    from torch import nn

    try:
        stages = [_convs(stage) for stage in net.encoder.stages]
        lateral = [_convs(conv)[-1] for conv in net.decoder.lateral]
        output_levels = tuple(sorted(int(k) for k in net.decoder.out.keys()))
        cls_convs, reg_convs = _convs(net.cls_head.convs), _convs(net.reg_head.convs)
        cls_out, reg_out = net.cls_head.out_conv, net.reg_head.out_conv
        seg = _convs(net.seg_head)[-1]
    except (AttributeError, IndexError, TypeError) as e:
        raise RuntimeError(
            f"the template's RetinaUNet no longer has the layout planner/plan/network_facts.py reads ({e}); "
            "update network_facts.measure with network.py"
        ) from e
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
                  nn.LayerNorm, nn.LocalResponseNorm)  # scripts.trainer.NORM_TYPES: their parameters do not decay
    decay = sum(p.numel() for m in net.modules() if not isinstance(m, norm_types)
                for name, p in m.named_parameters(recurse=False) if name != "bias")
    head_channels = {c.out_channels for c in cls_convs + reg_convs}
    if len(head_channels) > 1:
        raise RuntimeError(f"head towers with different widths {sorted(head_channels)}: the memory model "
                           "assumes one head width")
    return NetworkFacts(
        num_parameters=int(sum(p.numel() for p in net.parameters())),
        encoder_channels=tuple(int(c[-1].out_channels) for c in stages),
        encoder_convs=tuple(len(c) for c in stages),
        fpn_channels=tuple(int(c.out_channels) for c in lateral),
        fpn_output_levels=output_levels,
        cls_head_convs=len(cls_convs),
        reg_head_convs=len(reg_convs),
        head_channels=int(head_channels.pop()) if head_channels else 0,
        cls_out_channels=int(cls_out.out_channels),
        reg_out_channels=int(reg_out.out_channels),
        seg_classes=int(seg.out_channels),
        num_decay_parameters=int(decay),
    )


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _listed(value: Any) -> Any:
    return [_listed(v) for v in value] if isinstance(value, tuple) else value


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _facts(key: tuple[tuple[str, Any], ...], network_file: Path) -> NetworkFacts:
    """Facts for the network arguments ``key`` (hashable ``(name, value)`` pairs; lists as tuples)."""
    return measure(_construct({k: _listed(v) for k, v in key}, "meta", network_file))


def _key(arch: ArchitecturePlan, num_anchors_per_location: int) -> tuple[tuple[str, Any], ...]:
    return tuple((k, _hashable(v)) for k, v in network_kwargs(arch, num_anchors_per_location).items())


def network_facts(arch: ArchitecturePlan, num_anchors_per_location: int) -> NetworkFacts:
    """Facts of the template's network for ``arch`` (built on ``meta`` once per architecture).

    Args:
        arch: the plan's architecture.
        num_anchors_per_location: A (:func:`planner.plan.anchors.anchors_per_location`).
    """
    return _facts(_key(arch, num_anchors_per_location), Path(NETWORK_FILE))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _saved(key: tuple[tuple[str, Any], ...], network_file: Path, amp: bool) -> SavedActivations:
    return saved_activations(_construct({k: _listed(v) for k, v in key}, "meta", network_file), amp)


def network_saved_activations(arch: ArchitecturePlan, num_anchors_per_location: int,
                              amp: bool = True) -> SavedActivations:
    """What the template's network for ``arch`` saves for backward (one meta pass per architecture and
    precision, ~70 ms for nnDetection's 3D network; see :func:`saved_activations`).

    Args:
        arch: the plan's architecture.
        num_anchors_per_location: A.
        amp: under CUDA's float16 autocast (True) or in float32.
    """
    return _saved(_key(arch, num_anchors_per_location), Path(NETWORK_FILE), bool(amp))
