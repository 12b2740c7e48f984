"""One loader of a bundle's code: every stage runs the ``scripts`` of the bundle it works on."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from planner.bundle import TEMPLATE_DIR
from workflow.bundle_code import bundle_module, load_scripts, loaded_root


def _bundle(root, name, value):
    d = root / name
    (d / "scripts").mkdir(parents=True)
    (d / "scripts" / "__init__.py").write_text("")
    (d / "scripts" / "facts.py").write_text(f"VALUE = {value!r}\n")
    return d


def test_switches_between_bundles_and_sees_edits(tmp_path):
    a, b = _bundle(tmp_path, "a", 1), _bundle(tmp_path, "b", 2)
    assert bundle_module(a, "facts").VALUE == 1
    assert loaded_root() == a.resolve()
    assert bundle_module(b, "facts").VALUE == 2
    assert str(a.resolve()) not in sys.path
    (a / "scripts" / "facts.py").write_text("VALUE = 'edited'\n")
    assert bundle_module(a, "facts").VALUE == "edited"
    import scripts.facts  # what a config's `scripts.facts.VALUE` target resolves to now

    assert scripts.facts.VALUE == "edited"


def test_not_a_bundle_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"scripts: not a bundle's code folder.*nndet_prep"):
        load_scripts(tmp_path)


def test_evaluation_runs_the_edited_bundle_code(tmp_path):
    """Edit a generated bundle's scripts/evaluation.py: the evaluation stage reports what the edit computes
    (before the layout change, sweep and eval ran the repository template's code whatever the bundle held)."""
    from workflow.evaluate import evaluate_and_plot

    bundle, edited_bundle = (tmp_path / "Task000D3_Example" / m for m in ("RetinaUNetV001_D3V001_3d", "Edited"))
    for b in (bundle, edited_bundle):
        shutil.copytree(TEMPLATE_DIR / "scripts", b / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    preds = [{"boxes": np.array([[0, 0, 0, 4, 4, 4]], float), "scores": np.array([0.9]), "labels": np.array([0])}]
    gts = [{"boxes": np.array([[0, 0, 0, 4, 4, 4]], float), "labels": np.array([0])}]
    plain = evaluate_and_plot(bundle, preds, gts, ["c0"], ["a"], tmp_path / "out1", plots=False, image_of=None)
    assert plain["AP_IoU_0.10_MaxDet_100"] == pytest.approx(1.0)
    ev = edited_bundle / "scripts" / "evaluation.py"
    ev.write_text(ev.read_text() + "\n\n_orig = evaluate_boxes_detailed\n\n\ndef evaluate_boxes_detailed(*a, **k):\n"
                  "    m, c = _orig(*a, **k)\n    return {**m, 'edited_bundle': 1.0}, c\n")
    edited = evaluate_and_plot(edited_bundle, preds, gts, ["c0"], ["a"], tmp_path / "out2", plots=False, image_of=None)
    assert edited["edited_bundle"] == 1.0 and "edited_bundle" not in plain
    again = evaluate_and_plot(bundle, preds, gts, ["c0"], ["a"], tmp_path / "out3", plots=False, image_of=None)
    assert "edited_bundle" not in again
