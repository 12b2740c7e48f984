"""Small faults of issue 18.8: a wrong full task name, output into a closed pipe, a modality of another
shape named by its own file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from planner.dataset import DatasetError
from planner.nifti import load_case
from planner.paths import resolve_task
from tests.planner.helpers import cube_case, write_nifti, write_task

ROOT = Path(__file__).resolve().parents[2]


def test_a_wrong_full_task_name_is_refused_not_mapped_to_the_id(tmp_path):
    (tmp_path / "Task000D3_Example").mkdir()
    assert resolve_task("000", tmp_path) == "Task000D3_Example"
    assert resolve_task("Task000", tmp_path) == "Task000D3_Example"
    assert resolve_task("Task000D3_Example", tmp_path) == "Task000D3_Example"
    with pytest.raises(FileNotFoundError, match="No task folder Task000D3_Wrong.*Task000D3_Example"):
        resolve_task("Task000D3_Wrong", tmp_path)


def test_output_into_a_closed_pipe_ends_quietly():
    code = ("import sys; from workflow.cli.common import setup_logging; setup_logging()\n"
            "for i in range(200000): print('line', i)")
    p = subprocess.run(f"{sys.executable} -c \"{code}\" | head -n 1", shell=True, capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.stdout == "line 0\n"
    assert "BrokenPipeError" not in p.stderr and "Traceback" not in p.stderr


def test_a_modality_of_another_shape_is_named_by_its_own_file(tmp_path):
    c = cube_case("case_0", num_modalities=2)
    task = write_task(tmp_path, cases=[c], modalities={"0": "CT", "1": "MRI"})
    odd = task / "raw_splitted" / "imagesTr" / "case_0_0001.nii.gz"
    write_nifti(odd, np.zeros((16, 16, 15), np.float32))
    from planner.dataset import case_files

    with pytest.raises(DatasetError) as e:
        load_case(case_files(task / "raw_splitted", "case_0", 2), 3)
    (f, why), = e.value.problems
    assert f == str(odd) and "(16, 16, 15)" in why and "case_0_0000" in why
