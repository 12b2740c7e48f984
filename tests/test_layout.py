"""The layout's import arrows, read from the source (ast, nothing executed), so the layout stays true.

Arrows run one way: ``workflow -> planner, bundles, ops``; the bundle template's ``scripts`` -> ``planner``'s
shared base (io, paths, the dataset layer, NIfTI reading, the preprocessing transforms) and ``ops``;
``planner`` never imports the template's scripts, the workflow or the apps (it may import the ``bundles``
package itself, to know where the template folder is); ``apps`` -> the consolidated bundle's predictor
(through ``workflow.bundle_code``), ``planner``'s base and ``ops``; ``ops`` imports nothing of ours; no
import circles, counting imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("planner", "workflow", "ops", "bundles", "apps", "scripts")
TEMPLATE_SCRIPTS = "bundles.retinaunet_template.scripts"
# what the template's scripts may use of the planner: the shared base and the one preprocessing definition
PLANNER_BASE = ("planner", "planner.io", "planner.paths", "planner.dataset", "planner.nifti", "planner.crop",
                "planner.preprocess.transforms")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative imports resolved, function bodies
    included. ``from a import b`` yields ``a.b`` when ``a/b.py`` (or ``a/b/``) exists, else ``a``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            for a in node.names:
                sub = root.joinpath(*f"{mod}.{a.name}".split("."))
                full = f"{mod}.{a.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else mod
                out.append((node.lineno, full))
    return [(ln, m) for ln, m in out if m.split(".")[0] in OURS]


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def forbidden(src: str, dst: str) -> str | None:
    """Why the arrow ``src -> dst`` breaks the layout (None if it is allowed)."""
    if _under(src, "ops"):
        return None if _under(dst, "ops") else "ops imports nothing of ours"
    if _under(src, TEMPLATE_SCRIPTS):
        if _under(dst, TEMPLATE_SCRIPTS) or _under(dst, "ops") or dst in PLANNER_BASE:
            return None
        return "template scripts use only planner's shared base and ops"
    if _under(dst, "scripts") or _under(dst, TEMPLATE_SCRIPTS):
        return "a bundle's code is loaded through workflow.bundle_code, not imported"
    if _under(src, "planner"):
        if _under(dst, "planner") or _under(dst, "ops") or dst in ("bundles", "bundles.retinaunet_template"):
            return None
        return "planner imports only planner, ops and the template's location"
    if _under(src, "workflow"):
        return "workflow imports no app" if _under(dst, "apps") else None
    if _under(src, "apps"):
        if _under(dst, "apps") or _under(dst, "planner") or _under(dst, "ops") or dst == "workflow.bundle_code":
            return None
        return "apps use the consolidated bundle (through workflow.bundle_code), planner's base and ops"
    return None


def python_files(root: Path) -> list[Path]:
    return sorted(p for pkg in OURS if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py"))


def layout_violations(root: Path = ROOT) -> list[str]:
    """Every forbidden arrow and every import circle under ``root``, as readable lines."""
    problems, graph = [], {}
    files = python_files(root)
    known = {module_name(p, root) for p in files}
    for path in files:
        src = module_name(path, root)
        for line, dst in imports_of(path, root):
            why = forbidden(src, dst)
            if why:
                problems.append(f"{path.relative_to(root)}:{line}: {src} -> {dst} ({why})")
            while dst and dst not in known:
                dst = dst.rpartition(".")[0]
            if dst and dst != src:
                graph.setdefault(src, set()).add(dst)
    # a package's __init__ importing its own submodules is not a circle of two rooms
    edges = {s: {d for d in ds if not _under(d, s)} for s, ds in graph.items()}
    problems += [f"import circle: {' -> '.join(c)}" for c in _cycles(edges)]
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One representative circle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return comps


def test_the_tree_keeps_the_layout():
    problems = layout_violations()
    assert not problems, "layout broken:\n" + "\n".join(problems)


@pytest.mark.parametrize("src, dst, allowed", [
    ("ops.api", "planner.io", False),
    ("ops.api", "ops.boxes", True),
    ("planner.prep", "bundles.retinaunet_template.scripts.network", False),
    ("planner.bundle", "bundles", True),
    ("planner.prep", "workflow.train", False),
    ("planner.prep", "scripts.trainer", False),
    ("bundles.retinaunet_template.scripts.data", "planner.io", True),
    ("bundles.retinaunet_template.scripts.data", "planner.prep", False),
    ("bundles.retinaunet_template.scripts.trainer", "workflow.models", False),
    ("workflow.sweep", "bundles.retinaunet_template.scripts.sweep", False),
    ("workflow.sweep", "planner.io", True),
    ("workflow.cli", "apps.detect", False),
    ("apps.detect_dicom.pipeline", "workflow.bundle_code", True),
    ("apps.detect_dicom.pipeline", "workflow.predict", False),
    ("apps.detect_dicom.pipeline", "scripts.predict", False),
])
def test_arrow_rules(src, dst, allowed):
    assert (forbidden(src, dst) is None) == allowed


def test_checker_finds_a_forbidden_arrow_and_a_circle(tmp_path):
    for pkg, body in {"planner": "from workflow import run\n", "workflow": "", "ops": ""}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "mod.py").write_text(body)
    (tmp_path / "workflow" / "run.py").write_text("def f():\n    from workflow.cli import x\n")
    (tmp_path / "workflow" / "cli.py").write_text("from . import run\n")
    (tmp_path / "ops" / "mod.py").write_text("import numpy\nfrom planner.mod import y\n")
    problems = layout_violations(tmp_path)
    assert any(p.startswith("planner/mod.py:1: planner.mod -> workflow.run") for p in problems), problems
    assert any(p.startswith("ops/mod.py:2: ops.mod -> planner.mod") for p in problems), problems
    assert "import circle: workflow.cli -> workflow.run -> workflow.cli" in problems, problems
    assert len(problems) == 3
