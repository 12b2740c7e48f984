"""Command line: ``nndet_*`` console scripts (argparse, nnDetection's flags) and the ``nndet`` umbrella (fire).

Each entry point only parses arguments and calls an API function of the stage modules, which tests call
directly. ``nndet <command> ...`` takes the same flags as ``nndet_<command>``.
"""

from __future__ import annotations

import sys

from workflow.cli.chain import demo, find_best_main, run_chain, run_main
from workflow.cli.common import as_bool, parse_overrides, print_metrics, print_sweep, run_api, setup_logging
from workflow.cli.setup import env_main, environment_report, example_main, prep, prep_main, unpack_main
from workflow.cli.stages import (
    boxes2nii_main,
    consolidate_main,
    eval_main,
    predict_main,
    sweep_main,
    train,
    train_main,
)

__all__ = ["as_bool", "boxes2nii_main", "consolidate_main", "demo", "env_main", "environment_report", "eval_main",
           "example_main", "find_best_main", "main", "parse_overrides", "predict_main", "prep", "prep_main", "print_metrics",
           "print_sweep", "run_api", "run_chain", "run_main", "setup_logging", "sweep_main", "train", "train_main",
           "unpack_main"]

# nndet <command> [args]: commands with nnDetection's flags (-np, -o key=value) go to their argparse
# entry point; everything else (demo, API-style calls) goes through fire.
ARGPARSE_COMMANDS = {"run": run_main, "env": env_main, "example": example_main, "prep": prep_main, "unpack": unpack_main,
                     "train": train_main, "sweep": sweep_main, "eval": eval_main, "predict": predict_main,
                     "consolidate": consolidate_main, "boxes2nii": boxes2nii_main, "find_best": find_best_main}

# commands of the apps (workflow imports no app): run as their console scripts, found through the installed
# package's entry points
APP_COMMANDS = {"dicom-node": "nndet_dicom_node", "predict-dicom": "nndet_predict_dicom"}


def _run_app_command(name: str, argv: list[str]) -> None:
    from importlib.metadata import entry_points

    script = APP_COMMANDS[name]
    found = list(entry_points(group="console_scripts", name=script))
    if not found:
        raise SystemExit(f"nndet {name}: the console script {script} is not installed (pip install -e \".[deploy]\")")
    sys.argv = [f"nndet {name}", *argv]
    found[0].load()()


class _Umbrella:
    """nndet <command>: run, env, example, prep, unpack, train, ... (same flags as nndet_<command>) and demo."""

    def demo(self, preset: str = "cpu", num_processes: int | None = None, train: bool = True):
        """Run the main job on the toy data (what `make demo` runs); --notrain stops after prep."""
        demo(preset=preset, num_processes=num_processes, train_fold=train)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ARGPARSE_COMMANDS:
        ARGPARSE_COMMANDS[argv[0]](argv[1:])
        return
    if argv and argv[0] in APP_COMMANDS:
        _run_app_command(argv[0], argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: nndet <command> [args]\n\ncommands:\n  " + "\n  ".join([*ARGPARSE_COMMANDS, *APP_COMMANDS, "demo"])
              + "\n\n`nndet <command> -h` shows the flags of each (same as nndet_<command>).")
        return
    import fire

    fire.Fire(_Umbrella, command=argv, name="nndet")


