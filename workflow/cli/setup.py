"""Commands before training: ``nndet_env``, ``nndet_example``, ``nndet_prep``, ``nndet_unpack``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from planner import paths
from planner.presets import DEFAULT_PRESET, PRESET_NAMES
from workflow.cli.common import as_bool, parse_overrides, run_api, setup_logging


# ----------------------------------------------------------------------------------------- env
def environment_report() -> str:
    """Versions, devices, paths and variables, as `nndet_env` prints them."""
    import importlib.metadata as md

    lines = [f"python               {platform.python_version()} ({sys.executable})", f"platform             {platform.platform()}"]
    for pkg in ("nndet-monai", "torch", "monai", "numpy", "scipy", "nibabel", "pydicom", "cupy-cuda13x",
                "monai-deploy-app-sdk", "highdicom", "pynetdicom", "torchvision"):
        try:
            lines.append(f"{pkg:<20} {md.version(pkg)}")
        except md.PackageNotFoundError:
            lines.append(f"{pkg:<20} not installed")
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                lines.append(f"device {i}             {p.name}, {p.total_memory / 2**30:.1f} GiB")
        else:
            lines.append("device               CPU only (no CUDA device visible)")
        lines.append(f"cpu threads          {torch.get_num_threads()} (os.cpu_count {os.cpu_count()})")
    except ImportError:
        lines.append("device               torch missing")
    for var in (*paths.REQUIRED_VARS, *paths.OPTIONAL_VARS):
        val = os.environ.get(var)
        lines.append(f"{var:<20} {val if val else '(not set)'}")
    return "\n".join(lines)


def env_main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="nndet_env", description="Print versions, devices, paths and variables.").parse_args(argv)
    print(environment_report())


# ------------------------------------------------------------------------------------- example
def example_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nndet_example", description="Write the toy task Task000D3_Example to $det_data.")
    p.add_argument("--full", action="store_true", help="1000 train + 1000 test cases (nnDetection's --full)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=[*PRESET_NAMES, "nndet"],
                   help="default: nnDetection's 256^3 cases (nndet: the same, old name); cpu: small cases a 2-core CPU trains on in minutes")
    p.add_argument("--size", type=int, default=None, help="volume edge in voxels (overrides the preset)")
    p.add_argument("--num_train", type=int, default=None)
    p.add_argument("--num_test", type=int, default=None)
    p.add_argument("--dim", type=int, default=3, choices=[2, 3])
    p.add_argument("--num_processes", "-np", type=int, default=0)
    p.add_argument("--spacing", type=float, nargs="+", default=None, help="voxel size per i j k axis (mm)")
    p.add_argument("--modality", default="MRI", choices=["MRI", "CT"], help="CT writes HU-like intensities")
    p.add_argument("--task_name", default=None, help="another task folder name (e.g. Task101D3_CTLike)")
    p.add_argument("--seed_offset", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing toy task folder")
    p.add_argument("--boxes", action="store_true", help="annotate with boxes (labelsTr/<case>.json \"boxes\", "
                   "no label NIfTI; dataset.json \"annotation\": \"boxes\") instead of instance masks")
    a = p.parse_args(argv)
    setup_logging()
    from planner.toy import generate_example

    out = run_api(generate_example, paths.det_data(), preset=a.preset, full=a.full, num_train=a.num_train,
               num_test=a.num_test, size=a.size, dim=a.dim, num_processes=a.num_processes, overwrite=a.overwrite,
               spacing=tuple(a.spacing) if a.spacing else None, modality=a.modality, task_name=a.task_name,
               seed_offset=a.seed_offset, boxes=a.boxes)
    print(f"toy task written to {out}")


# ---------------------------------------------------------------------------------------- prep
def prep(task: str, full_check: bool = False, no_check: bool = False, num_processes: int = 0,
         num_processes_preprocessing: int = 0, overwrite: bool = False, memory_budget_gb: float | None = None,
         no_preprocess: bool = False, preset: str = "default", overwrite_trained: bool = False):
    """Checks, fingerprint, plans, bundle generation and preprocessing of one task; prints the plans."""
    from planner.prep import DEFAULT_MEMORY_BUDGET_GB, run_prep

    result = run_api(run_prep, task, full_check=full_check, no_check=no_check, num_processes=num_processes,
                  num_processes_preprocessing=num_processes_preprocessing, overwrite=overwrite,
                  memory_budget_gb=memory_budget_gb or DEFAULT_MEMORY_BUDGET_GB, preprocess=not no_preprocess,
                  preset=preset, overwrite_trained=overwrite_trained)
    print_prep(result)
    return result


def print_prep(result) -> None:
    """The fingerprint, plans, plan files, bundles and plots of a :class:`planner.prep.PrepResult`."""
    print(f"\n== {result.task} ==")
    print(f"fingerprint   {result.fingerprint}")
    for plan, pf, b in zip(result.plans, result.plan_files, result.bundles, strict=True):
        print(plan.summary())
        print(f"  plan file        {pf}")
        print(f"  bundle           {b}")
    for png in result.plots:
        print(f"plot          {png}")


def prep_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nndet_prep", description="Check, fingerprint, plan and preprocess a task.")
    p.add_argument("task", help="task id or name: 000, Task000 or Task000D3_Example")
    p.add_argument("--full_check", action="store_true", help="load every case: geometry and instance/json checks")
    p.add_argument("--no_check", action="store_true", help="skip the dataset checks")
    p.add_argument("-np", "--num_processes", type=int, default=None, help="workers for checks/fingerprint")
    p.add_argument("-npp", "--num_processes_preprocessing", type=int, default=None, help="workers for resampling")
    p.add_argument("--overwrite", action="store_true", help="recompute stages whose outputs exist")
    p.add_argument("--overwrite_trained", action="store_true", help="with --overwrite: a bundle that holds trained "
                   "folds is kept as <name>.old-<date> and a fresh one written (refused otherwise)")
    p.add_argument("--memory_budget_gb", type=float, default=None, help="GPU memory budget (default 11 GB)")
    p.add_argument("--no_preprocess", action="store_true", help="stop after planning and bundle generation")
    p.add_argument("--preset", default=None, choices=list(PRESET_NAMES),
                   help="default: nnDetection's network (plans D3V001_*); cpu: narrow network on small patches "
                        "that trains on a few CPU cores (plans D3V001CPU_*)")
    p.add_argument("-o", "--overrides", action="append", help="key=value, e.g. -o overwrite=True -o memory_budget_gb=24")
    a = p.parse_args(argv)
    setup_logging()
    ov = parse_overrides(a.overrides)
    unknown = set(ov) - {"overwrite", "memory_budget_gb", "full_check", "num_processes", "num_processes_preprocessing",
                         "preset"}
    if unknown:
        raise SystemExit(f"unknown override(s) {sorted(unknown)}")
    default_np = paths.num_threads()
    prep(
        a.task,
        full_check=a.full_check or as_bool(ov.get("full_check", False)),
        no_check=a.no_check,
        num_processes=int(ov.get("num_processes", a.num_processes if a.num_processes is not None else default_np)),
        num_processes_preprocessing=int(ov.get("num_processes_preprocessing", a.num_processes_preprocessing
                                               if a.num_processes_preprocessing is not None else default_np)),
        overwrite=a.overwrite or as_bool(ov.get("overwrite", False)),
        memory_budget_gb=float(ov["memory_budget_gb"]) if "memory_budget_gb" in ov else a.memory_budget_gb,
        no_preprocess=a.no_preprocess,
        preset=ov.get("preset", a.preset or "default"),
        overwrite_trained=a.overwrite_trained,
    )


# -------------------------------------------------------------------------------------- unpack
def unpack_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nndet_unpack", description="Kept for nnDetection habits: our preprocessed "
                                "arrays are already uncompressed .npy (memory-mapped), so there is nothing to unpack.")
    p.add_argument("path", nargs="?", help="preprocessed folder (checked only)")
    p.add_argument("num_processes", nargs="?", type=int, default=0)
    a = p.parse_args(argv)
    setup_logging()
    from planner.preprocess.run import unpack

    run_api(unpack, Path(a.path) if a.path else None)


