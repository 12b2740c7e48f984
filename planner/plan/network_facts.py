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
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from planner.bundle import TEMPLATE_DIR
from planner.plan.plan import ArchitecturePlan

NETWORK_FILE = TEMPLATE_DIR / "scripts" / "network.py"
_MODULE_NAME = "_planner_template_network"  # private: never importable as ``scripts.network``
_CACHE_SIZE = 256  # architectures kept per process (a plan visits ~10 while shrinking its patch)


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
    )


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _listed(value: Any) -> Any:
    return [_listed(v) for v in value] if isinstance(value, tuple) else value


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _facts(key: tuple[tuple[str, Any], ...], network_file: Path) -> NetworkFacts:
    """Facts for the network arguments ``key`` (hashable ``(name, value)`` pairs; lists as tuples)."""
    return measure(_construct({k: _listed(v) for k, v in key}, "meta", network_file))


def network_facts(arch: ArchitecturePlan, num_anchors_per_location: int) -> NetworkFacts:
    """Facts of the template's network for ``arch`` (built on ``meta`` once per architecture).

    Args:
        arch: the plan's architecture.
        num_anchors_per_location: A (:func:`planner.plan.anchors.anchors_per_location`).
    """
    key = tuple((k, _hashable(v)) for k, v in network_kwargs(arch, num_anchors_per_location).items())
    return _facts(key, Path(NETWORK_FILE))
