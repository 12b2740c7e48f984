"""CLI behaviour that does not depend on the later pipeline stages."""

from __future__ import annotations

import pytest

from planner import paths
from workflow import cli


def test_missing_det_data_names_variable_and_export_line(monkeypatch, capsys):
    monkeypatch.delenv("det_data", raising=False)
    monkeypatch.setenv("det_models", "/tmp/unused_models")
    with pytest.raises(SystemExit) as exc:
        cli.prep_main(["000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "det_data" in err and "export det_data=" in err


def test_env_report_lists_versions_and_variables(monkeypatch):
    monkeypatch.setenv("det_data", "/some/where")
    monkeypatch.delenv("det_verbose", raising=False)
    report = cli.environment_report()
    assert "torch" in report and "monai" in report
    assert "/some/where" in report
    assert "det_verbose" in report and "(not set)" in report


def test_overrides_parse_and_reject_garbage():
    assert cli.parse_overrides(["overwrite=True", "memory_budget_gb = 24"]) == {
        "overwrite": "True",
        "memory_budget_gb": "24",
    }
    with pytest.raises(SystemExit):
        cli.parse_overrides(["overwrite"])
    with pytest.raises(SystemExit):
        cli.as_bool("maybe")


def test_unknown_override_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("det_data", str(tmp_path))
    monkeypatch.setenv("det_models", str(tmp_path))
    with pytest.raises(SystemExit, match="unknown override"):
        cli.prep_main(["000", "-o", "learning_rate=3"])


def test_unknown_task_id_lists_existing_tasks(monkeypatch, tmp_path, capsys):
    (tmp_path / "Task007_Other").mkdir()
    monkeypatch.setenv("det_data", str(tmp_path))
    monkeypatch.setenv("det_models", str(tmp_path / "models"))
    with pytest.raises(SystemExit):
        cli.prep_main(["123"])
    err = capsys.readouterr().err
    assert "123" in err and "Task007_Other" in err


def test_umbrella_forwards_to_argparse_commands(capsys):
    cli.main(["env"])
    assert "monai" in capsys.readouterr().out
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert "prep" in out and "demo" in out


def test_num_threads_rejects_non_integer(monkeypatch):
    monkeypatch.setenv("det_num_threads", "many")
    with pytest.raises(paths.EnvironmentError_, match="det_num_threads"):
        paths.num_threads()


def test_cpu_network_process_uses_det_torch_threads(monkeypatch):
    """OMP_NUM_THREADS=1 (set for workers) must not leave the network process on one core."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("det_torch_threads", "2")
        assert paths.use_cpu_threads(torch.device("cpu")) == 2
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert paths.use_cpu_threads(torch.device("cuda")) == 1  # GPU: left alone
        monkeypatch.delenv("det_torch_threads")
        assert paths.torch_threads() == max(1, __import__("os").cpu_count() or 1)
        monkeypatch.setenv("det_torch_threads", "two")
        with pytest.raises(paths.EnvironmentError_, match="export det_torch_threads=2"):
            paths.use_cpu_threads(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
