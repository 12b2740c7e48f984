"""What `monai-deploy package` reads (app.yaml, requirements.txt) and what the installed package ships.

Packaging itself needs Docker and base-image downloads (holoscan-cli <= 4.2.0), which CI cannot do; the MAP's
start (the env vars) is tested in test_app.py.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "apps" / "detect_dicom"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DISTRIBUTION = {"monai": "monai", "yaml": "pyyaml", "ignite": "pytorch-ignite", "PIL": "pillow"}


def _requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in (APP / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            reqs[r.name.lower()] = r
    return reqs


def test_manifest_has_what_monai_deploy_package_reads():
    manifest = yaml.safe_load((APP / "app.yaml").read_text())
    app, res = manifest["application"], manifest["resources"]
    assert app["title"] and app["inputFormats"] == ["file"] and app["outputFormats"] == ["file"]
    assert str(app["version"]) == PYPROJECT["project"]["version"]
    assert isinstance(res["cpu"], int) and res["cpu"] >= 1 and isinstance(res["gpu"], int)
    for key in ("memory", "gpuMemory"):
        assert re.fullmatch(r"\d+(Mi|Gi)", res[key]), (key, res[key])


def test_requirements_pin_what_the_deploy_extra_pins():
    reqs = _requirements()
    for line in PYPROJECT["project"]["optional-dependencies"]["deploy"]:
        extra = Requirement(line)
        assert extra.name.lower() in reqs, f"requirements.txt lacks {extra.name}"
        assert reqs[extra.name.lower()].specifier == extra.specifier, extra.name
    assert "nndet-monai" in reqs  # the app imports the bundle loader and the planner's base from it


def _third_party_imports() -> set[str]:
    ours = {"apps", "planner", "workflow", "ops", "bundles", "scripts"}
    names = set()
    for f in APP.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in ours and n not in sys.stdlib_module_names and n != "__future__"}


def test_every_third_party_import_of_the_app_is_a_requirement():
    reqs = _requirements()
    base = {Requirement(d).name.lower() for d in PYPROJECT["project"]["dependencies"]}
    found = _third_party_imports()
    assert {"highdicom", "pydicom", "numpy", "monai", "matplotlib"} <= found  # the scan sees the app's imports
    for name in sorted(found):
        dist = DISTRIBUTION.get(name, name).lower()
        if name == "torch":  # from the MAP's base image, see requirements.txt
            continue
        if name == "monai" and "monai-deploy-app-sdk" in reqs:  # monai.deploy is the SDK; monai itself listed too
            assert "monai" in reqs
            continue
        assert dist in reqs or (dist in base and "nndet-monai" in reqs), f"{name} ({dist}) is not in requirements.txt"


def test_package_data_ships_the_app_files():
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["apps"]
    for name in ("rules.json", "app.yaml", "requirements.txt", "README.md"):
        assert (APP / name).is_file(), name
        assert any(Path(f"detect_dicom/{name}").match(g) for g in globs), name
