"""Fingerprint + plan + preprocessing: ours (`nndet_prep`) vs nnU-Net v2, same data, same processes.

Usage (from the repo root; `make bench-prep` sets up both environments and runs this):

    python benchmarks/prep.py --np 2 --toy_cases 20 --toy_size 128 --ct_cases 12
    python benchmarks/prep.py --nnunet_bin .venv-bench/bin --ours_bin .venv/bin

Datasets, both written by our toy generator (planner.toy) and converted to nnU-Net's raw format:
* ``toy``: nnDetection's example generator (cubes / square tunnels in noise), isotropic 1 mm.
* ``ct``: CT-like anisotropic cases whose spacing varies per case (in-plane 0.6-0.9 mm, slices
  2.5-5 mm), so both tools really resample (a median target spacing differs from every case).

nnU-Net runs ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np N -npfp N`` (fingerprint
extraction, planning and 3d_fullres preprocessing); ours runs ``nndet_prep TASK -np N -npp N``
(checks, fingerprint, planning, bundle generation and preprocessing). Wall time and the peak of the
summed resident memory of the whole process tree (sampled every 50 ms) are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    """Run a command; return (wall seconds, peak summed RSS of its process tree in bytes)."""
    import psutil

    t0 = time.perf_counter()
    with open(log, "w") as fh:
        popen = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        proc = psutil.Process(popen.pid)
        peak = 0
        while popen.poll() is None:
            peak = max(peak, _tree_rss(proc))
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    if popen.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {popen.returncode}); see {log}")
    return wall, peak


def make_datasets(work: Path, toy_cases: int, toy_size: int, ct_cases: int, np_: int) -> dict[str, Path]:
    from planner.toy import generate_example

    det_data = work / "ours" / "det_data"
    toy = generate_example(det_data, preset="nndet", num_train=toy_cases, num_test=0, size=toy_size,
                           num_processes=np_)
    ct = generate_example(det_data, preset="cpu", num_train=ct_cases, num_test=0, size=toy_size * 2,
                          spacing=(0.8, 0.8, 3.0), modality="CT", task_name="Task001D3_CTLike",
                          num_processes=np_)
    # vary the spacing per case so that resampling to the median target really happens
    rng = np.random.default_rng(0)
    for img in sorted((ct / "raw_splitted" / "imagesTr").glob("*.nii.gz")):
        case = img.name[: -len("_0000.nii.gz")]
        sp = (float(rng.uniform(0.6, 0.9)),) * 2 + (float(rng.uniform(2.5, 5.0)),)
        for f in (img, ct / "raw_splitted" / "labelsTr" / f"{case}.nii.gz"):
            nii = nib.load(str(f))
            arr = np.asanyarray(nii.dataobj)
            nib.save(nib.Nifti1Image(arr, np.diag([*sp, 1.0])), str(f))
    return {"toy": toy, "ct": ct}


def to_nnunet(task_root: Path, raw_root: Path, dataset_id: int) -> str:
    """Convert one of our raw tasks to nnU-Net v2 raw format (semantic labels = class + 1)."""
    ds = json.loads((task_root / "dataset.json").read_text())
    name = f"Dataset{dataset_id:03d}_{task_root.name.split('_', 1)[1]}"
    out = raw_root / name
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    labels_dir = task_root / "raw_splitted" / "labelsTr"
    cases = sorted(p.name[: -len(".nii.gz")] for p in labels_dir.glob("*.nii.gz"))
    for case in cases:
        for img in sorted((task_root / "raw_splitted" / "imagesTr").glob(f"{case}_*.nii.gz")):
            shutil.copy(img, out / "imagesTr" / img.name)
        nii = nib.load(str(labels_dir / f"{case}.nii.gz"))
        inst = np.asanyarray(nii.dataobj).astype(np.int32)
        mapping = json.loads((labels_dir / f"{case}.json").read_text())["instances"]
        sem = np.zeros(inst.shape, np.uint8)
        for iid, cls in mapping.items():
            sem[inst == int(iid)] = int(cls) + 1
        nib.save(nib.Nifti1Image(sem, nii.affine), str(out / "labelsTr" / f"{case}.nii.gz"))
    labels = {"background": 0, **{n: int(k) + 1 for k, n in ds["labels"].items()}}
    channels = dict(ds["modalities"])
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": channels, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz",
    }, indent=2))
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--np", type=int, default=2, help="processes for both tools")
    ap.add_argument("--toy_cases", type=int, default=20)
    ap.add_argument("--toy_size", type=int, default=128)
    ap.add_argument("--ct_cases", type=int, default=12)
    ap.add_argument("--ours_bin", default=str(Path(sys.executable).parent), help="folder with nndet_prep")
    ap.add_argument("--nnunet_bin", default=str(REPO / ".venv-bench" / "bin"),
                    help="folder with nnUNetv2_plan_and_preprocess")
    ap.add_argument("--workdir", default=None, help="keep data here (default: a temp folder, removed)")
    a = ap.parse_args()

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        datasets = make_datasets(work, a.toy_cases, a.toy_size, a.ct_cases, a.np)
        nn_raw = work / "nnunet" / "raw"
        base_env = {**os.environ, "OMP_NUM_THREADS": "1", "det_num_threads": str(a.np)}
        rows = []
        for i, (key, task_root) in enumerate(datasets.items()):
            name = to_nnunet(task_root, nn_raw, 500 + i)
            ours_env = {**base_env, "det_data": str(task_root.parent), "det_models": str(work / "ours" / "models")}
            t_ours, m_ours = run_measured(
                [str(Path(a.ours_bin) / "nndet_prep"), task_root.name, "-np", str(a.np), "-npp", str(a.np)],
                ours_env, work / f"ours_{key}.log")
            nn_env = {**base_env, "nnUNet_raw": str(nn_raw), "nnUNet_preprocessed": str(work / "nnunet" / "pre"),
                      "nnUNet_results": str(work / "nnunet" / "results")}
            t_nn, m_nn = run_measured(
                [str(Path(a.nnunet_bin) / "nnUNetv2_plan_and_preprocess"), "-d", str(500 + i), "-c", "3d_fullres",
                 "-np", str(a.np), "-npfp", str(a.np)], nn_env, work / f"nnunet_{key}.log")
            n = len(list((task_root / "raw_splitted" / "imagesTr").glob("*_0000.nii.gz")))
            rows.append((key, name, n, t_ours, t_nn, m_ours, m_nn))
        print(f"\nprep benchmark: {a.np} processes, {os.cpu_count()} CPUs; ours = nndet_prep, "
              "peer = nnUNetv2_plan_and_preprocess -c 3d_fullres")
        print(f"| data | cases | ours s | nnU-Net v2 s | speed-up | ours peak MiB | nnU-Net peak MiB | memory ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for key, _name, n, t_o, t_n, m_o, m_n in rows:
            print(f"| {key} | {n} | {t_o:.1f} | {t_n:.1f} | {t_n / t_o:.2f}x | {m_o / 2**20:.0f} | "
                  f"{m_n / 2**20:.0f} | {m_o / m_n:.2f} |")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
