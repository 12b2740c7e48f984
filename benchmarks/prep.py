"""Fingerprint + plan + preprocessing: ours (`nndet_prep`) vs nnU-Net v2, same data, same processes.

Usage (from the repo root; `make bench-prep` sets up both environments and runs this):

    python benchmarks/prep.py --np 2 --toy_cases 30 --toy_size 128 --ct_cases 12 --ct_size 256 --repeats 3
    python benchmarks/prep.py --nnunet_bin .venv-bench/bin --ours_bin .venv/bin

Datasets, both written by our toy generator (planner.toy) and converted to nnU-Net's raw format:
* ``toy``: nnDetection's example generator (cubes / square tunnels in noise), isotropic 1 mm.
* ``ct``: CT-like anisotropic cases whose spacing varies per case (in-plane 0.6-0.9 mm, slices
  2.5-5 mm), so both tools really resample (a median target spacing differs from every case).

nnU-Net runs ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np N -npfp N`` (fingerprint
extraction, planning and 3d_fullres preprocessing); ours runs ``nndet_prep TASK -np N -npp N``
(checks, fingerprint, planning, bundle generation and preprocessing). Wall time and the peak of the
summed resident memory of the whole process tree (sampled every 50 ms) are reported: the median over
``--repeats`` cold runs (all outputs of both tools removed before each round; the tool that goes first
alternates), so a noisy shared machine biases neither side.
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


def make_datasets(work: Path, toy_cases: int, toy_size: int, ct_cases: int, ct_size: int, np_: int) -> dict[str, Path]:
    from planner.toy import generate_example

    det_data = work / "ours" / "det_data"
    toy = generate_example(det_data, preset="nndet", num_train=toy_cases, num_test=0, size=toy_size,
                           num_processes=np_)
    ct = generate_example(det_data, preset="cpu", num_train=ct_cases, num_test=0, size=ct_size,
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


def _shape_label(task_root: Path) -> str:
    """Voxel shape 'XxYxZ' of the first training image (all cases of a dataset share it)."""
    img = nib.load(str(sorted((task_root / "raw_splitted" / "imagesTr").glob("*_0000.nii.gz"))[0]))
    return "x".join(str(s) for s in img.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--np", type=int, default=2, help="processes for both tools")
    ap.add_argument("--toy_cases", type=int, default=20)
    ap.add_argument("--toy_size", type=int, default=128)
    ap.add_argument("--ct_cases", type=int, default=12)
    ap.add_argument("--ct_size", type=int, default=None, help="CT-like volume edge (default 2 * toy_size)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="cold runs per tool and dataset, alternating which tool goes first; medians are reported")
    ap.add_argument("--ours_bin", default=str(Path(sys.executable).parent), help="folder with nndet_prep")
    ap.add_argument("--nnunet_bin", default=str(REPO / ".venv-bench" / "bin"),
                    help="folder with nnUNetv2_plan_and_preprocess")
    ap.add_argument("--workdir", default=None, help="keep data here (default: a temp folder, removed)")
    a = ap.parse_args()

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        datasets = make_datasets(work, a.toy_cases, a.toy_size, a.ct_cases, a.ct_size or 2 * a.toy_size, a.np)
        nn_raw, nn_pre = work / "nnunet" / "raw", work / "nnunet" / "pre"
        models = work / "ours" / "models"
        base_env = {**os.environ, "OMP_NUM_THREADS": "1", "det_num_threads": str(a.np)}
        rows = []
        for i, (key, task_root) in enumerate(datasets.items()):
            name = to_nnunet(task_root, nn_raw, 500 + i)
            ours_env = {**base_env, "det_data": str(task_root.parent), "det_models": str(models)}
            nn_env = {**base_env, "nnUNet_raw": str(nn_raw), "nnUNet_preprocessed": str(nn_pre),
                      "nnUNet_results": str(work / "nnunet" / "results")}
            ours_cmd = [str(Path(a.ours_bin) / "nndet_prep"), task_root.name, "-np", str(a.np), "-npp", str(a.np)]
            nn_cmd = [str(Path(a.nnunet_bin) / "nnUNetv2_plan_and_preprocess"), "-d", str(500 + i), "-c",
                      "3d_fullres", "-np", str(a.np), "-npfp", str(a.np)]
            runs: dict[str, list[tuple[float, int]]] = {"ours": [], "nnunet": []}
            for r in range(a.repeats):
                # cold runs: every output of the previous run is removed first
                shutil.rmtree(task_root / "preprocessed", ignore_errors=True)
                shutil.rmtree(models / task_root.name, ignore_errors=True)
                shutil.rmtree(nn_pre / name, ignore_errors=True)
                order = ["ours", "nnunet"] if r % 2 == 0 else ["nnunet", "ours"]
                for tool in order:
                    cmd, env = (ours_cmd, ours_env) if tool == "ours" else (nn_cmd, nn_env)
                    runs[tool].append(run_measured(cmd, env, work / f"{tool}_{key}_{r}.log"))
                    print(f"{key} run {r} {tool}: {runs[tool][-1][0]:.1f} s, {runs[tool][-1][1] / 2**20:.0f} MiB "
                          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
            n = len(list((task_root / "raw_splitted" / "imagesTr").glob("*_0000.nii.gz")))
            med = {t: (float(np.median([w for w, _ in v])), int(np.median([m for _, m in v]))) for t, v in runs.items()}
            rows.append((key, n, _shape_label(task_root), *med["ours"], *med["nnunet"]))
        print(f"\nprep benchmark: {a.np} processes, {os.cpu_count()} CPUs, median of {a.repeats} cold run(s); "
              "ours = nndet_prep, peer = nnUNetv2_plan_and_preprocess -c 3d_fullres")
        print("| data | cases | shape | ours s | nnU-Net v2 s | speed-up | ours peak RSS MiB | nnU-Net peak RSS MiB "
              "| memory ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for key, n, shape, t_o, m_o, t_n, m_n in rows:
            print(f"| {key} | {n} | {shape} | {t_o:.1f} | {t_n:.1f} | {t_n / t_o:.2f}x | {m_o / 2**20:.0f} | "
                  f"{m_n / 2**20:.0f} | {m_o / m_n:.2f} |")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
