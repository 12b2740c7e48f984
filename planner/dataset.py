"""Dataset layer: reads a task in nnDetection's raw layout (dataset.json / .yaml, instance maps + json).

```
$det_data/Task000D3_Example/
    dataset.json | dataset.yaml
    raw_splitted/imagesTr/<case>_<XXXX>.nii.gz   (one file per modality, XXXX = 4-digit index)
    raw_splitted/labelsTr/<case>.nii.gz          (instance map: 0 background, 1..N instances)
    raw_splitted/labelsTr/<case>.json            ({"instances": {"1": <class index>}})
                                                 (or, with "annotation": "boxes" in dataset.json, the
                                                 case's boxes and no .nii.gz: see planner.box_labels)
    raw_splitted/imagesTs, labelsTs              (optional, same structure)
```

Arrays are read with nibabel in voxel index order (i, j, k); that order is the axis order of every
array, spacing and box in this project (see ``ops`` for the box convention).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

IMAGE_SUFFIX = ".nii.gz"
ANNOTATIONS = ("masks", "boxes")  # dataset.json "annotation": instance maps (default) or box jsons


class DatasetError(ValueError):
    """A dataset problem; ``problems`` lists every (file, reason) found."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [f"  - {f}: {r}" for f, r in self.problems]
        super().__init__(f"{len(self.problems)} problem(s) in the dataset:\n" + "\n".join(lines))


@dataclass(frozen=True)
class DatasetInfo:
    """Typed view of dataset.json / dataset.yaml."""

    task: str
    dim: int
    labels: dict[str, str]
    modalities: dict[str, str]
    name: str = ""
    target_class: int | None = None
    test_labels: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def annotation(self) -> str:
        """``"masks"`` (instance maps + instance jsons, nnDetection's layout) or ``"boxes"`` (box jsons)."""
        return str(self.extra.get("annotation", "masks"))

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def class_names(self) -> list[str]:
        return [self.labels[str(i)] for i in range(self.num_classes)]

    @property
    def modality_names(self) -> list[str]:
        return [self.modalities[str(i)] for i in range(self.num_modalities)]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "task": self.task,
            "name": self.name,
            "dim": self.dim,
            "labels": dict(self.labels),
            "modalities": dict(self.modalities),
            "target_class": self.target_class,
            "test_labels": self.test_labels,
        }
        d.update(self.extra)
        d["annotation"] = self.annotation
        return d


def dataset_file(task_root: Path) -> Path:
    for name in ("dataset.json", "dataset.yaml", "dataset.yml"):
        if (task_root / name).is_file():
            return task_root / name
    raise DatasetError(
        [(str(task_root / "dataset.json"), "missing: write dataset.json (or dataset.yaml) with task, dim, labels, modalities")]
    )


def validate_dataset_dict(raw: Any, source: str) -> list[tuple[str, str]]:
    """Return every problem of a dataset.json content (empty list when valid)."""
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, dict):
        return [(source, "top level must be a mapping with keys task, dim, labels, modalities")]
    for key, typ in (("task", str), ("dim", int), ("labels", dict), ("modalities", dict)):
        if key not in raw:
            problems.append((source, f"required key '{key}' is missing"))
        elif not isinstance(raw[key], typ) or isinstance(raw[key], bool):
            problems.append((source, f"'{key}' must be {typ.__name__}, got {type(raw[key]).__name__}"))
    if isinstance(raw.get("dim"), int) and raw["dim"] not in (2, 3):
        problems.append((source, f"'dim' must be 2 or 3, got {raw['dim']}"))
    for key in ("labels", "modalities"):
        d = raw.get(key)
        if not isinstance(d, dict):
            continue
        if not d:
            problems.append((source, f"'{key}' is empty: give at least one entry, e.g. {{\"0\": \"name\"}}"))
            continue
        if not all(isinstance(k, str) for k in d):
            problems.append((source, f"'{key}' keys must be strings"))
        if not all(isinstance(v, str) for v in d.values()):
            problems.append((source, f"'{key}' values (names) must be strings"))
        expected = [str(i) for i in range(len(d))]
        if sorted(map(str, d), key=lambda s: (len(s), s)) != expected:
            problems.append(
                (source, f"'{key}' keys must be consecutive indices starting at 0 ({expected}), got {list(d)}")
            )
    tc = raw.get("target_class")
    if tc is not None and (not isinstance(tc, int) or isinstance(tc, bool)):
        problems.append((source, f"'target_class' must be an integer class index or null, got {tc!r}"))
    ann = raw.get("annotation", "masks")
    if ann not in ANNOTATIONS:
        problems.append((source, f"'annotation' must be one of {list(ANNOTATIONS)} (instance maps or box jsons), "
                         f"got {ann!r}"))
    return problems


def load_dataset_info(task_root: Path) -> DatasetInfo:
    """Load and validate dataset.json/yaml of a task folder; raises DatasetError with every problem."""
    path = dataset_file(task_root)
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise DatasetError([(str(path), f"cannot be parsed ({e}); fix the syntax")]) from e
    problems = validate_dataset_dict(raw, str(path))
    if problems:
        raise DatasetError(problems)
    known = {"task", "dim", "labels", "modalities", "name", "target_class", "test_labels"}
    return DatasetInfo(
        task=raw["task"],
        dim=int(raw["dim"]),
        labels={str(k): v for k, v in raw["labels"].items()},
        modalities={str(k): v for k, v in raw["modalities"].items()},
        name=str(raw.get("name", "")),
        target_class=raw.get("target_class"),
        test_labels=bool(raw.get("test_labels", False)),
        extra={k: v for k, v in raw.items() if k not in known},
    )


@dataclass(frozen=True)
class CaseFiles:
    """Files of one case: images (one per modality, in modality order), label map and instance json.

    With ``annotation == "boxes"`` there is no label map (``label`` is None) and ``instances_json`` is the
    case's box json (``planner.box_labels``).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    instances_json: Path | None
    annotation: str = "masks"

    @property
    def boxes(self) -> bool:
        return self.annotation == "boxes"

    @property
    def label_source(self) -> Path | None:
        """The file the case's objects come from (label map, or box json)."""
        return self.instances_json if self.boxes else self.label


def case_and_modality(name: str) -> tuple[str, int] | None:
    """``(case id, modality index)`` of an image file named ``<case>_<XXXX>.nii.gz``; None for any other name."""
    if not name.endswith(IMAGE_SUFFIX):
        return None
    stem = name[: -len(IMAGE_SUFFIX)]
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        return stem[:-5], int(stem[-4:])
    return None


def list_case_ids(images_dir: Path) -> list[str]:
    """Case ids from ``<case>_<XXXX>.nii.gz`` names in an images folder (sorted, unique)."""
    found = (case_and_modality(p.name) for p in images_dir.glob(f"*{IMAGE_SUFFIX}"))
    return sorted({f[0] for f in found if f is not None})


def case_files(raw_root: Path, case_id: str, num_modalities: int, split: str = "Tr",
               annotation: str = "masks") -> CaseFiles:
    """Expected file paths of one case (existence is checked by ``planner.checks``)."""
    images = tuple(raw_root / f"images{split}" / f"{case_id}_{m:04d}{IMAGE_SUFFIX}" for m in range(num_modalities))
    labels_dir = raw_root / f"labels{split}"
    return CaseFiles(
        case_id=case_id,
        images=images,
        label=None if annotation == "boxes" else labels_dir / f"{case_id}{IMAGE_SUFFIX}",
        instances_json=labels_dir / f"{case_id}.json",
        annotation=annotation,
    )


def list_cases(raw_root: Path, num_modalities: int, split: str = "Tr", annotation: str = "masks") -> list[CaseFiles]:
    images_dir = raw_root / f"images{split}"
    if not images_dir.is_dir():
        return []
    return [case_files(raw_root, c, num_modalities, split, annotation) for c in list_case_ids(images_dir)]
