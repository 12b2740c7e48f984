"""Generate a task's MONAI bundle from ``bundles/retinaunet_template/`` and verify it.

Placeholders in the template are strings ``@@<namespace>.<path>@@`` with the namespaces

* ``plan``: ``Plan.to_dict()`` (e.g. ``@@plan.target_spacing@@``, ``@@plan.architecture.in_channels@@``),
* ``dataset``: ``DatasetInfo.to_dict()`` (e.g. ``@@dataset.labels@@``),
* ``gen``: values computed at generation (library versions, model name, class descriptions).

In JSON configs a string that is exactly one placeholder is replaced by the value itself (any JSON type:
lists, dicts, numbers); a placeholder inside a longer string is replaced by its text. Markdown files get
the text substitution. A generated bundle has no placeholder left: ``verify_bundle`` checks it, together
with the metadata (offline, against the local copy of MONAI's schema) and every config parsing with
MONAI's ``ConfigParser``.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import bundles
from planner.dataset import DatasetInfo
from planner.io import make_temp_dir, save_json
from planner.plan.plan import Plan

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(bundles.__file__).parent / "retinaunet_template"
SCHEMA_DIR = TEMPLATE_DIR / "schema"
# md5 of the published schema files we keep locally (MONAI checks the copy against it before validating)
SCHEMA_MD5 = {"meta_schema_20240725.json": "76e1add273836515d0bbb3bc71962474"}
GENERATED_PARTS = ("configs", "scripts", "docs")  # copied from the template; everything else is left alone
PREPROCESSING_CONFIG = "configs/preprocessing.json"
PREPROCESSING_ID = "preprocessing"

PLACEHOLDER = re.compile(r"@@([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)@@")
_FULL = re.compile(rf"^{PLACEHOLDER.pattern}$")
_SKIP_NAMES = {"__pycache__"}


class BundleError(ValueError):
    """A bundle problem; ``problems`` lists every (file, reason) found."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [f"  - {f}: {r}" for f, r in self.problems]
        super().__init__(f"{len(self.problems)} problem(s) in the bundle:\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------- placeholders
def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "unknown"


def placeholder_context(plan: Plan, dataset: DatasetInfo) -> dict[str, Any]:
    """The values placeholders may name: ``{"plan": ..., "dataset": ..., "gen": ...}``."""
    import monai
    import numpy
    import torch

    dim = plan.dim
    axes = ["x1", "y1", "z1", "x2", "y2", "z2"] if dim == 3 else ["x1", "y1", "x2", "y2"]
    labels = {str(k): v for k, v in dataset.labels.items()}
    modalities = {str(k): v for k, v in dataset.modalities.items()}
    gen = {
        "monai_version": monai.__version__,
        "pytorch_version": str(torch.__version__).split("+")[0],
        "numpy_version": numpy.__version__,
        "package_version": _version("nndet-monai"),
        "required_packages_version": {
            "nndet-monai": _version("nndet-monai"),
            "scipy": _version("scipy"),
            "nibabel": _version("nibabel"),
        },
        "model_name": plan.model_name,
        "label_classes": ", ".join(f"{k}: {v}" for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))),
        "image_classes": f"{len(modalities)} channel(s): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(modalities.items(), key=lambda kv: int(kv[0]))),
        "modalities_text": "+".join(modalities[k] for k in sorted(modalities, key=int)),
        "box_format": f"StandardMode ({', '.join(axes)})",
        "box_num_values": 2 * dim,
        "box_channel_def": {str(i): a for i, a in enumerate(axes)},
        "label_value_range": [0, max(0, len(labels) - 1)],
    }
    return {"plan": plan.to_dict(), "dataset": dataset.to_dict(), "gen": gen}


def lookup(context: dict[str, Any], path: str) -> Any:
    """Value at a dotted path (list items by integer index); KeyError if there is none."""
    node: Any = context
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(path)
    return node


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def fill_text(text: str, context: dict[str, Any]) -> str:
    """Replace every known placeholder in a text by its text form; unknown ones are left in place."""

    def sub(m: re.Match) -> str:
        try:
            return _as_text(lookup(context, m.group(1)))
        except KeyError:
            return m.group(0)

    return PLACEHOLDER.sub(sub, text)


def fill_json(obj: Any, context: dict[str, Any]) -> Any:
    """Walk parsed JSON: a string that is exactly one placeholder becomes the value; others get text."""
    if isinstance(obj, dict):
        return {k: fill_json(v, context) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill_json(v, context) for v in obj]
    if isinstance(obj, str):
        m = _FULL.match(obj)
        if m:
            try:
                return copy.deepcopy(lookup(context, m.group(1)))
            except KeyError:
                return obj
        return fill_text(obj, context)
    return obj


def find_placeholders(root: Path) -> list[tuple[str, str]]:
    """(file, placeholder) for every ``@@...@@`` left in the text files of configs/ and docs/."""
    found = []
    for part in ("configs", "docs"):
        for f in sorted((root / part).rglob("*")) if (root / part).is_dir() else []:
            if not f.is_file():
                continue
            try:
                text = f.read_text()
            except UnicodeDecodeError:
                continue
            found += [(str(f), m.group(0)) for m in PLACEHOLDER.finditer(text)]
    return found


# -------------------------------------------------------------------------------------- generation
def _render_template(template: Path, out: Path, context: dict[str, Any]) -> None:
    for part in GENERATED_PARTS:
        src_root = template / part
        if not src_root.is_dir():
            continue
        for src in sorted(src_root.rglob("*")):
            rel = src.relative_to(template)
            if any(p in _SKIP_NAMES for p in rel.parts) or src.suffix == ".pyc":
                continue
            dst = out / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".json":
                try:
                    raw = json.loads(src.read_text())
                except json.JSONDecodeError as e:
                    raise BundleError([(str(src), f"template is not valid JSON ({e}); fix the template")]) from e
                dst.write_text(json.dumps(fill_json(raw, context), indent=4) + "\n")
            elif src.suffix == ".md":
                dst.write_text(fill_text(src.read_text(), context))
            else:
                shutil.copy2(src, dst)


def generate_bundle(
    plan: Plan, dataset: DatasetInfo, out_dir: str | os.PathLike, overwrite: bool = False,
    template_dir: str | os.PathLike | None = None, overwrite_trained: bool = False,
) -> Path:
    """Write the MONAI bundle of ``plan`` to ``out_dir`` (e.g. ``det_models/<task>/RetinaUNetV001_D3V001_3d``).

    The template's configs/, scripts/ and docs/ are copied with placeholders filled, ``configs/plan.json``
    holds the plan, and the result is verified (``verify_bundle``) in a temporary folder next to
    ``out_dir`` before it is renamed into place, so a failure leaves no half-written bundle. With
    ``overwrite`` an existing bundle's configs/, scripts/ and docs/ are replaced; a bundle holding trained
    folds (or a consolidated model) is refused unless ``overwrite_trained``, and then it is kept whole,
    renamed to ``<name>.old-<date>``, and a fresh bundle is written (weights never meet a plan they were
    not trained with).

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or it holds trained folds and
            ``overwrite_trained`` is False.
        BundleError: a placeholder could not be filled, or the result does not verify.
    """
    out_dir = Path(out_dir)
    template = Path(template_dir) if template_dir is not None else TEMPLATE_DIR
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"bundle folder {out_dir} exists; pass overwrite=True (nndet_prep ... -o overwrite=True) to regenerate it"
        )
    trained = trained_parts(out_dir) if out_dir.exists() else []
    if trained and not overwrite_trained:
        raise FileExistsError(
            f"bundle folder {out_dir} holds trained models {trained}; regenerating it would pair them with a new "
            "plan. Pass --overwrite_trained (nndet_prep) to keep that bundle as <name>.old-<date> and write a "
            "fresh one, or use another model folder"
        )
    if not (template / "configs").is_dir():
        raise BundleError([(str(template), "bundle template has no configs/ folder; reinstall nndet-monai")])
    context = placeholder_context(plan, dataset)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent)
    try:
        _render_template(template, tmp, context)
        save_json(plan.to_dict(), tmp / "configs" / "plan.json")
        left = find_placeholders(tmp)
        if left:
            raise BundleError(
                [(f.replace(str(tmp), str(template)), f"placeholder {p} has no value in the plan/dataset; fix the "
                  "template or the plan") for f, p in left]
            )
        verify_bundle(tmp)
        if trained:  # the old bundle stays whole beside the new one, renamed only once the new one verified
            old = out_dir.with_name(f"{out_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            logger.warning("bundle %s held trained models %s: kept as %s", out_dir, trained, old)
        else:
            _move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("bundle for %s written to %s", plan.plan_id, out_dir)
    return out_dir


def trained_parts(bundle: Path) -> list[str]:
    """The folds with weights (``fold<X>/model_*.pt``) and a consolidated model in a bundle folder."""
    parts = sorted({p.parent.name for p in bundle.glob("fold*/model_*.pt")})
    if any((bundle / "consolidated" / "models").glob("*.pt")):
        parts.append("consolidated")
    return parts


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    trash.mkdir()
    try:
        for entry in sorted(tmp.iterdir()):
            target = out_dir / entry.name
            if target.exists():
                os.replace(target, trash / entry.name)
            os.replace(entry, target)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    kept = sorted(p.name for p in out_dir.iterdir() if p.name not in GENERATED_PARTS)
    if kept:
        logger.warning("bundle %s regenerated; kept %s (trained with the previous plan?)", out_dir, kept)


# ---------------------------------------------------------------------------------------- checking
def local_schema(url: str) -> Path:
    """Local copy of the MONAI metadata schema named by ``url`` (we validate offline)."""
    path = SCHEMA_DIR / Path(url).name
    if not path.is_file():
        raise BundleError(
            [(url, f"no local copy of this schema in {SCHEMA_DIR}; put the file there (validation is offline)")]
        )
    return path


def verify_metadata_offline(meta_file: Path) -> None:
    """Validate metadata.json with ``monai.bundle.verify_metadata`` against the local schema copy.

    MONAI downloads the schema only when the given schema path does not exist; we pass our copy.
    """
    from monai.bundle import verify_metadata

    meta = json.loads(Path(meta_file).read_text())
    if "schema" not in meta:
        raise BundleError([(str(meta_file), "no 'schema' key (the URL of MONAI's metadata schema)")])
    schema = local_schema(str(meta["schema"]))
    quiet = [logging.getLogger(n) for n in ("monai.bundle.scripts", "monai.apps")]  # its per-call input summary
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema), hash_val=SCHEMA_MD5.get(schema.name))
    except ValueError as e:
        raise BundleError([(str(meta_file), f"does not match MONAI's schema {schema.name}: {e}")]) from e
    except Exception as e:  # e.g. monai's HashCheckError for a damaged local schema copy
        raise BundleError([(str(schema), f"cannot validate with this schema copy ({e}); restore the file")]) from e
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    logger.debug("%s is valid against %s", meta_file, schema.name)


def verify_bundle(bundle_dir: str | os.PathLike, preprocessing: bool = True) -> None:
    """Check a generated bundle; raise ``BundleError`` listing every problem.

    Checks: no placeholder left in configs/ and docs/; every configs/*.json is JSON and parses with
    ``monai.bundle.ConfigParser`` (all references resolvable); metadata.json validates against MONAI's
    schema (offline); the preprocessing config instantiates into a callable transform chain (unless
    ``preprocessing`` is False: a plan ensemble's top level, whose members each hold their own).
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_dir)
    configs = root / "configs"
    if not configs.is_dir():
        raise BundleError([(str(root), "no configs/ folder: not a bundle; generate it with nndet_prep")])
    problems = [(f, f"placeholder {p} was not filled; regenerate the bundle") for f, p in find_placeholders(root)]
    files = sorted(configs.glob("*.json"))
    for name in ("metadata.json", Path(PREPROCESSING_CONFIG).name)[: 2 if preprocessing else 1]:
        if not (configs / name).is_file():
            problems.append((str(configs / name), "missing; regenerate the bundle with nndet_prep -o overwrite=True"))
    contents: dict[Path, Any] = {}
    for f in files:
        try:
            contents[f] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            problems.append((str(f), f"not valid JSON ({e})"))
            continue
        if any(p[0] == str(f) for p in problems):
            continue
        try:
            ConfigParser(contents[f]).parse()
        except Exception as e:  # ConfigParser raises several types for bad syntax
            problems.append((str(f), f"does not parse with monai.bundle.ConfigParser: {e}"))
    if problems:
        raise BundleError(problems)
    # references are resolved over the configs layered as `monai.bundle run` layers them (later files
    # override earlier ones, ids with '#' reach into them, metadata available as `_meta_`); plan.json is data,
    # not a layer; multi_gpu_*.json are overlays of train.json (the model-zoo convention), so they come last
    layered = sorted((f for f in files if f.name not in ("metadata.json", "plan.json") and isinstance(contents[f], dict)),
                     key=lambda f: (f.name.startswith("multi_gpu_"), f.name))
    parser = ConfigParser({"_meta_": contents.get(configs / "metadata.json", {})})
    for f in layered:
        for key, value in contents[f].items():
            parser[key] = value
    for f in layered:
        for key in contents[f]:
            try:
                parser.get_parsed_content(key, instantiate=False, eval_expr=False)
            except Exception as e:  # a missing reference raises ValueError/KeyError inside MONAI
                problems.append((str(f), f"'{key}' does not resolve with monai.bundle.ConfigParser: {e}"))
    if problems:
        raise BundleError(problems)
    meta = configs / "metadata.json"
    try:
        verify_metadata_offline(meta)
    except BundleError as e:
        problems += e.problems
    pre = root / PREPROCESSING_CONFIG
    try:
        chain = ConfigParser(json.loads(pre.read_text())).get_parsed_content(PREPROCESSING_ID) if preprocessing else None
        if preprocessing and not callable(chain):
            problems.append((str(pre), f"'{PREPROCESSING_ID}' is not a callable transform"))
    except Exception as e:
        problems.append((str(pre), f"'{PREPROCESSING_ID}' does not instantiate: {e}"))
    if problems:
        raise BundleError(problems)
