"""Preset names shared by the toy generator (`nndet_example`) and the planner (`nndet_prep`, `nndet run`).

A preset has one meaning in both commands:

* ``default``: nnDetection's sizes (the toy task's 256^3 volumes; the planner's ``BoxC002`` network and
  memory-bound patches);
* ``cpu``: sized for a few CPU cores (64^3 toy volumes; a quarter of the network's channels and patches
  of at most 32^3 / 128^2 voxels).

The CLIs take ``--preset`` with ``choices=PRESET_NAMES``.
"""

from __future__ import annotations

PRESET_NAMES: tuple[str, ...] = ("default", "cpu")
DEFAULT_PRESET = "default"
