"""Small task makers shared by the tests (tiny arrays written to a tmp folder)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from planner.toy import generate_example


@dataclass
class Case:
    """One case to write.

    Attributes:
        case_id: e.g. ``case_0``.
        images: one array per modality, [*spatial] in (i, j, k) order.
        seg: instance map [*spatial] (0 background) or None (no label files).
        instances: instance json content ``{"1": 0}``; None derives ``{id: 0}`` from ``seg``.
        split: ``"Tr"`` or ``"Ts"``.
        spacing: voxel size per axis (affine diag(spacing)).
    """

    case_id: str
    images: list[np.ndarray]
    seg: np.ndarray | None = None
    instances: dict[str, Any] | None = None
    split: str = "Tr"
    spacing: tuple[float, ...] | None = None


def write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, ...] | None = None,
                affine: np.ndarray | None = None) -> Path:
    """Write ``array`` (2D arrays stay 2D) with ``affine`` or diag(spacing)."""
    if affine is None:
        sp = list(spacing or (1.0,) * array.ndim)
        sp = (sp + [1.0, 1.0, 1.0])[:3]
        affine = np.diag([*sp, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def cube_case(case_id: str, shape: tuple[int, ...] = (16, 16, 16), boxes: list[tuple[int, ...]] | None = None,
              classes: list[int] | None = None, num_modalities: int = 1, seed: int = 0, split: str = "Tr",
              spacing: tuple[float, ...] | None = None) -> Case:
    """A noise image with one instance per box (StandardMode, half-open) and class per instance."""
    dim = len(shape)
    boxes = boxes if boxes is not None else [tuple([2] * dim + [6] * dim)]
    classes = classes if classes is not None else [0] * len(boxes)
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, dtype=np.uint8)
    for i, b in enumerate(boxes, start=1):
        seg[tuple(slice(b[a], b[a + dim]) for a in range(dim))] = i
    images = [(rng.random(shape) + 0.5 * (seg > 0)).astype(np.float32) for _ in range(num_modalities)]
    return Case(case_id, images, seg, {str(i): c for i, c in enumerate(classes, start=1)}, split, spacing)


def write_task(root: Path, name: str = "Task100D3_Test", dim: int = 3, cases: list[Case] | None = None,
               modalities: dict[str, str] | None = None, labels: dict[str, str] | None = None,
               test_labels: bool = False, dataset: dict[str, Any] | None = None) -> Path:
    """Write a task folder ``root/name`` (dataset.json + raw_splitted) and return it.

    ``dataset`` replaces the generated dataset.json content entirely (to write bad ones).
    """
    task = Path(root) / name
    modalities = modalities or {"0": "MRI"}
    labels = labels or {"0": "A", "1": "B"}
    if cases is None:
        shape = (16,) * dim
        cases = [cube_case(f"case_{i}", shape, seed=i, num_modalities=len(modalities)) for i in range(3)]
    meta = dataset if dataset is not None else {
        "task": name, "name": name.split("_", 1)[-1], "dim": dim, "labels": labels, "modalities": modalities,
        "target_class": None, "test_labels": test_labels,
    }
    task.mkdir(parents=True, exist_ok=True)
    (task / "dataset.json").write_text(json.dumps(meta, indent=2))
    raw = task / "raw_splitted"
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    for c in cases:
        for m, img in enumerate(c.images):
            write_nifti(raw / f"images{c.split}" / f"{c.case_id}_{m:04d}.nii.gz", img, c.spacing)
        if c.seg is not None:
            write_nifti(raw / f"labels{c.split}" / f"{c.case_id}.nii.gz", c.seg, c.spacing)
            inst = c.instances
            if inst is None:
                inst = {str(int(i)): 0 for i in np.unique(c.seg) if i > 0}
            (raw / f"labels{c.split}" / f"{c.case_id}.json").write_text(json.dumps({"instances": inst}))
    return task


def toy_task(root: Path, dim: int = 3, size: int | None = None, **kwargs: Any) -> Path:
    """A tiny toy task (cpu preset, 4 train + 2 test cases unless told otherwise)."""
    size = size or (32 if dim == 3 else 48)
    kwargs.setdefault("num_train", 4)
    kwargs.setdefault("num_test", 2)
    return generate_example(Path(root), preset="cpu", size=size, dim=dim, **kwargs)


def copy_task(src: Path, dst_root: Path) -> Path:
    """Copy a (session-scoped, read-only) task so a test may modify it."""
    dst = Path(dst_root) / Path(src).name
    shutil.copytree(src, dst)
    return dst


# Training schedule of the smoke tests: two iterations, one SWA epoch, no loader workers.
SMOKE_SCHEDULE = {"epochs": 1, "iterations": 2, "warmup": 1, "swa_epochs": 1, "num_workers": 0}


def det_env(mp: Any, root: Path, num_threads: int | None = None) -> Path:
    """Point ``det_data`` / ``det_models`` at ``root/data`` (created) and ``root/models`` through ``mp`` (a
    ``pytest.MonkeyPatch``), optionally ``det_num_threads``; returns ``root/data``."""
    mp.setenv("det_data", str(root / "data"))
    mp.setenv("det_models", str(root / "models"))
    if num_threads is not None:
        mp.setenv("det_num_threads", str(num_threads))
    (root / "data").mkdir(parents=True, exist_ok=True)
    return root / "data"
