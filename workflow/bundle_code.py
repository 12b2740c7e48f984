"""The one loader of a bundle's own code: every stage runs the ``scripts`` package of the bundle it works on.

A MONAI bundle is self-contained: ``python -m monai.bundle run`` puts the bundle root on ``sys.path`` and its
configs name ``scripts.<module>.<object>``. The workflow does the same through :func:`load_scripts`, so a
generated (or consolidated) bundle whose ``scripts/`` were edited trains, sweeps, evaluates and predicts
with the edited code, never with the template's copy in this repository.

Only one ``scripts`` package can be imported at a time (the configs need that top-level name): loading another
bundle's code drops the modules of the previous one from ``sys.modules`` and its root from ``sys.path``.
Objects built from the previous bundle's modules stay valid (they keep their module alive).
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

PACKAGE = "scripts"
_roots: list[str] = []  # bundle roots this loader put on sys.path


def _origin(mod: ModuleType) -> Path | None:
    f = getattr(mod, "__file__", None)
    return Path(f).resolve() if f else None


def loaded_root() -> Path | None:
    """The bundle whose ``scripts`` package is imported now (None if none is)."""
    mod = sys.modules.get(PACKAGE)
    origin = _origin(mod) if mod is not None else None
    return origin.parent.parent if origin is not None else None


def load_scripts(bundle: str | Path) -> ModuleType:
    """Import ``<bundle>/scripts`` as the top-level package ``scripts`` and return it.

    Args:
        bundle: a bundle folder (``configs/`` + ``scripts/``), generated or consolidated.

    Raises:
        FileNotFoundError: the folder has no ``scripts/__init__.py``.
    """
    root = Path(bundle).resolve()
    if not (root / PACKAGE / "__init__.py").is_file():
        raise FileNotFoundError(f"{root / PACKAGE}: not a bundle's code folder (no __init__.py); regenerate the "
                                f"bundle with `nndet_prep TASK -o overwrite=True`")
    if loaded_root() != root:
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        for old in _roots:
            while old in sys.path:
                sys.path.remove(old)
        _roots.clear()
        importlib.invalidate_caches()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
        _roots.append(str(root))
    pkg = importlib.import_module(PACKAGE)
    if loaded_root() != root:  # a `scripts` package earlier on sys.path than ours (e.g. the working directory)
        raise ImportError(f"`import scripts` resolves to {_origin(pkg)}, not to {root / PACKAGE}: run from another "
                          "folder or remove the other package from PYTHONPATH")
    logger.debug("bundle code: %s", root / PACKAGE)
    return pkg


def bundle_module(bundle: str | Path, name: str) -> ModuleType:
    """``<bundle>/scripts/<name>.py`` (e.g. ``inference``, ``sweep``, ``evaluation``) through :func:`load_scripts`."""
    load_scripts(bundle)
    return importlib.import_module(f"{PACKAGE}.{name}")
