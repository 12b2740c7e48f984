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

Peak memory of one preprocessing worker (``--rss_case``, no nnU-Net needed):

    python benchmarks/prep.py --rss_case 512x512x600 --rss_spacing 0.7,0.7,1.25 \
        --rss_targets "0.7,0.7,2.5;0.8,0.8,1.0" --rss_old_ref HEAD

writes one synthetic CT-like case (int16 HU, air about -1000 so nothing is cropped, a label map with a few
instances unless ``--rss_label no``) and preprocesses it with ``planner.preprocess.run.preprocess_case``
(the bundle template's chain, CT normalisation, ``transpose_forward`` putting the slice axis first) in a
fresh subprocess per target spacing (given per raw axis), once with this working tree and once with the
``planner``/``bundles`` of git revision ``--rss_old_ref`` (``git archive`` into a temp folder; nothing in
the repository changes). The peak is the worker's ``VmHWM`` (kernel high-water mark of its resident
memory, imports included; "base" is the resident memory after the imports and the chain). The old and
new outputs are compared voxel by voxel (image in float32 ulps, instance map exactly) and their
properties json as a whole.
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


# ------------------------------------------------------------------------- one worker's peak memory
def _vm(field: str) -> int:
    """``/proc/self/status`` field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def write_rss_case(root: Path, shape: tuple[int, ...], spacing: tuple[float, ...], label: bool) -> dict[str, str]:
    """A CT-like int16 case (body ellipse of soft tissue and bone in air) + an instance map; file paths."""
    root.mkdir(parents=True, exist_ok=True)
    tag = "x".join(map(str, shape)) + "_" + "_".join(f"{v:g}" for v in spacing)
    img_path, seg_path, json_path = (root / f"rss_{tag}_0000.nii.gz", root / f"rss_{tag}.nii.gz",
                                     root / f"rss_{tag}.json")
    affine = np.diag([*spacing, 1.0])
    if not img_path.is_file():
        rng = np.random.default_rng(0)
        x, y = np.ogrid[: shape[0], : shape[1]]
        r2 = ((x - shape[0] / 2) / (0.4 * shape[0])) ** 2 + ((y - shape[1] / 2) / (0.3 * shape[1])) ** 2
        body, bone = r2 <= 1.0, (r2 > 0.8) & (r2 <= 0.9)
        img = np.empty(shape, dtype=np.int16, order="F")
        for z0 in range(0, shape[2], 32):
            z1 = min(shape[2], z0 + 32)
            n = rng.normal(0.0, 1.0, (*shape[:2], z1 - z0)).astype(np.float32)
            sl = np.where(body[..., None], 40.0 + 30.0 * n, -1000.0 + 20.0 * n)
            sl[bone] = 700.0 + 100.0 * n[bone]
            img[..., z0:z1] = np.rint(sl).astype(np.int16)
        nib.save(nib.Nifti1Image(img, affine), str(img_path))
        del img
    if label and not seg_path.is_file():
        seg = np.zeros(shape, dtype=np.uint8, order="F")
        c = np.asarray(shape) // 2
        for i, off in enumerate(((-40, 0, -60), (30, 20, 0), (0, -30, 80)), start=1):
            lo = np.maximum(c + np.asarray(off) - 12, 0)
            seg[lo[0]:lo[0] + 24, lo[1]:lo[1] + 24, lo[2]:lo[2] + 16] = i
        nib.save(nib.Nifti1Image(seg, affine), str(seg_path))
        json_path.write_text(json.dumps({"instances": {"1": 0, "2": 0, "3": 0}}))
    return {"case_id": f"rss_{tag}", "image": str(img_path), "label": str(seg_path) if label else "",
            "instances_json": str(json_path) if label else ""}


def _rss_bundle(src: Path, out: Path, target_raw: list[float], spacing: list[float]) -> Path:
    """The template's preprocessing config of ``src`` filled for a CT plan (slice axis first)."""
    from planner.bundle import fill_json

    fwd = [int(a) for a in np.argsort(-np.asarray(spacing), kind="stable")]  # lowest resolution axis first
    plan = {"plan_id": "RSS", "dim": 3, "target_spacing_transposed": [target_raw[a] for a in fwd],
            "transpose_forward": fwd, "transpose_backward": [int(a) for a in np.argsort(fwd)],
            "normalization_schemes": ["CT"], "use_mask_for_norm": [False],
            "intensity_properties": [{"mean": 40.0, "std": 30.0, "percentile_00_5": -100.0,
                                      "percentile_99_5": 900.0}]}
    template = json.loads((src / "bundles" / "retinaunet_template" / "configs" / "preprocessing.json").read_text())
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / "preprocessing.json").write_text(json.dumps(fill_json(template, {"plan": plan}), indent=2))
    return out


def _rss_worker(spec: dict) -> None:
    """One preprocessing worker on one case (run in a fresh interpreter); prints a JSON line."""
    src = str(spec["src"])
    sys.path.insert(0, src)
    for name in [m for m in sys.modules if m == "planner" or m.startswith("planner.")]:
        del sys.modules[name]
    import planner
    from planner.dataset import CaseFiles
    from planner.preprocess.run import load_preprocessing, preprocess_case

    if not str(Path(planner.__file__).resolve()).startswith(str(Path(src).resolve())):
        raise RuntimeError(f"planner imported from {planner.__file__}, not {src}")
    chain = load_preprocessing(spec["bundle"])
    base = _vm("VmRSS")
    files = CaseFiles(spec["case_id"], (Path(spec["image"]),), Path(spec["label"]) if spec["label"] else None,
                      Path(spec["instances_json"]) if spec["instances_json"] else None)
    t0 = time.perf_counter()
    props = preprocess_case(files, 3, chain, Path(spec["out"]), "RSS")
    wall = time.perf_counter() - t0
    print(json.dumps({"peak": _vm("VmHWM"), "base": base, "case_s": wall,
                      "shape": props["shape_after_resampling"]}), flush=True)


def _compare_npy(a: Path, b: Path) -> str:
    """'identical', or the share of equal voxels and the largest difference in float32 ulps (chunked)."""
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    if x.shape != y.shape:
        return f"shapes differ {x.shape} vs {y.shape}"
    diff, max_ulp = 0, 0
    for i in range(0, x.shape[1], 16):
        u, v = np.asarray(x[:, i:i + 16]), np.asarray(y[:, i:i + 16])
        ne = u != v
        diff += int(ne.sum())
        if ne.any():
            ui, vi = u[ne].view(np.int32).astype(np.int64), v[ne].view(np.int32).astype(np.int64)
            ui = np.where(ui < 0, np.int64(-2**31) - ui, ui)  # ordered integer line of float32 values
            vi = np.where(vi < 0, np.int64(-2**31) - vi, vi)
            max_ulp = max(max_ulp, int(np.abs(ui - vi).max()))
    return "identical" if diff == 0 else f"{diff} of {x.size} differ (max {max_ulp} ulp)"


def _compare_outputs(old: Path, new: Path, label: bool) -> str:
    """Image (``_compare_npy``), instance map (exact) and properties json of one case, old vs new."""
    parts = [_compare_npy(old, new)]
    if label:
        seg = [np.load(p.with_name(p.stem + "_seg.npy"), mmap_mode="r") for p in (old, new)]
        same = seg[0].shape == seg[1].shape and all(
            np.array_equal(seg[0][i:i + 32], seg[1][i:i + 32]) for i in range(0, seg[0].shape[0], 32))
        parts.append("seg identical" if same else "seg differs")
    props = [json.loads(p.with_suffix(".json").read_text()) for p in (old, new)]
    parts.append("json identical" if props[0] == props[1] else "json differs")
    return ", ".join(parts)


def rss_benchmark(a) -> None:
    shape = tuple(int(v) for v in a.rss_case.lower().split("x"))
    spacing = [float(v) for v in a.rss_spacing.split(",")]
    targets = [[float(v) for v in t.split(",")] for t in a.rss_targets.split(";") if t.strip()]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_rss_"))
    work.mkdir(parents=True, exist_ok=True)
    labels = {"yes": [True], "no": [False], "both": [True, False]}[a.rss_label]
    sides = {"new": REPO}
    try:
        if a.rss_old_ref:
            old = work / f"src_{a.rss_old_ref.replace('/', '_')}"
            if not (old / "planner").is_dir():
                old.mkdir(parents=True, exist_ok=True)
                tar = subprocess.run(["git", "-C", str(REPO), "archive", a.rss_old_ref, "planner", "bundles"],
                                     check=True, capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(old)], input=tar, check=True)
            sides = {"old": old, "new": REPO}
        rows = []
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for label in labels:
            case = write_rss_case(work / "case", shape, tuple(spacing), label)
            for target in targets:
                res, outs = {}, {}
                for side, src in sides.items():
                    tag = f"{side}_{'lab' if label else 'nolab'}_{'_'.join(f'{v:g}' for v in target)}"
                    bundle = _rss_bundle(src, work / f"bundle_{tag}", target, spacing)
                    out = work / f"out_{tag}"
                    shutil.rmtree(out, ignore_errors=True)
                    spec = {**case, "src": str(src), "bundle": str(bundle), "out": str(out)}
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--_rss_worker", json.dumps(spec)]
                    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if p.returncode != 0:
                        raise RuntimeError(f"{side} worker failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
                    res[side] = json.loads(p.stdout.strip().splitlines()[-1])
                    outs[side] = out / f"{case['case_id']}.npy"
                    r = res[side]
                    print(f"{side} label={label} target={target}: peak {r['peak'] / 2**20:.0f} MiB (base "
                          f"{r['base'] / 2**20:.0f} MiB), {r['case_s']:.1f} s, output {r['shape']}", flush=True)
                same = _compare_outputs(outs["old"], outs["new"], label) if "old" in res else "-"
                rows.append((label, target, res, same))
                for side in sides:
                    if not a.workdir:
                        shutil.rmtree(outs[side].parent, ignore_errors=True)
        print(f"\nworker peak RSS (VmHWM), {'x'.join(map(str, shape))} at {spacing} mm, "
              f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs; old = {a.rss_old_ref or '-'}")
        print("| case | label | target mm | output shape | old peak MiB | new peak MiB | base MiB | old s | new s "
              "| old vs new |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, target, res, same in rows:
            o, n = res.get("old"), res["new"]
            print(f"| {'x'.join(map(str, shape))} | {'yes' if label else 'no'} | {','.join(f'{v:g}' for v in target)} "
                  f"| {'x'.join(map(str, n['shape']))} | {o['peak'] / 2**20:.0f} | {n['peak'] / 2**20:.0f} "
                  f"| {n['base'] / 2**20:.0f} | {o['case_s']:.1f} | {n['case_s']:.1f} | {same} |" if o else
                  f"| {'x'.join(map(str, shape))} | {'yes' if label else 'no'} | {','.join(f'{v:g}' for v in target)} "
                  f"| {'x'.join(map(str, n['shape']))} | - | {n['peak'] / 2**20:.0f} | {n['base'] / 2**20:.0f} "
                  f"| - | {n['case_s']:.1f} | - |")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


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
    ap.add_argument("--rss_case", default=None, metavar="XxYxZ",
                    help="instead: peak RSS of one preprocessing worker on a synthetic case of this shape")
    ap.add_argument("--rss_spacing", default="0.7,0.7,1.25", help="voxel size of the --rss_case case (mm)")
    ap.add_argument("--rss_targets", default="0.7,0.7,2.5;0.8,0.8,1.0",
                    help="target spacings per raw axis, ';'-separated, one worker run each")
    ap.add_argument("--rss_label", choices=("yes", "no", "both"), default="both",
                    help="with a label map (training case), without (test case), or both")
    ap.add_argument("--rss_old_ref", default="HEAD",
                    help="git revision whose planner/ is the 'old' side ('' to measure this tree only)")
    ap.add_argument("--_rss_worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._rss_worker:
        _rss_worker(json.loads(a._rss_worker))
        return
    if a.rss_case:
        rss_benchmark(a)
        return

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
