"""The DICOM side of the Deploy app: load a CT series, build its volume, write SR + SEG + JSON; side by side
with the MONAI Deploy SDK's own ``DICOMSeriesToVolumeOperator`` on the same series, in one run.

Usage (from the repo root, ``ulimit -s 32768`` as for the app):

    python benchmarks/dicom.py                          # 512x512x300 CT (the issue's case), 3 repeats
    python benchmarks/dicom.py --size 256 --slices 60   # quick look
    python benchmarks/dicom.py --app                    # + the whole app on the series (toy cpu-preset bundle,
                                                        #   1 fold, no TTA): the DICOM share of the run

The series is written once into a temporary folder by the tests' DICOM factory
(``tests/apps/dicom_factory.py``): int16 CT-like values (air, body, lungs, a few nodules), 0.7 x 0.7 mm
pixels, 1.5 mm slices, one file per slice, ascending; writing it is not timed.

Stages (median of ``--repeats`` runs each, files in the page cache after the first write):

* ``load``: the SDK's ``DICOMDataLoaderOperator.load_data_to_studies`` (pydicom reads every file; the app
  uses this loader);
* ``volume ours``: :func:`apps.detect_dicom.volume.build_volume` on the loaded series (geometry checks,
  highdicom ``get_volume_from_series``, rescale, UIDs by position);
* ``volume SDK``: ``DICOMSeriesToVolumeOperator.convert_to_image`` on the same loaded series (the SDK's
  volume: sorts, stacks, rescales; no regularity checks);
* ``write``: SR (TID 1500, ``write_sr``) + SEG (``write_seg``, boxes filled) + JSON for ``--findings``
  findings of 10-40 mm, all above the operating point.

``ours total`` = load + volume ours + write: the target is <= 10 s on a 2-core CPU. ``--app`` then runs the
app itself (``apps.detect_dicom.app.run_app``) on the series with a consolidated bundle of the toy task
(cpu preset, one fold with random weights, ``--num_tta 1``), and reports the app's wall time, the time of
its DICOM stages measured above and their share.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ct_phantom(size: int, slices: int, seed: int = 0) -> np.ndarray:
    """int-valued float32 ``[i, j, k]`` CT-like volume in HU: air, elliptic body, two lungs, nodules."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    c = size / 2
    plane = np.full((size, size), -1000.0, np.float32)
    plane[((i - c) / (0.45 * size)) ** 2 + ((j - c) / (0.33 * size)) ** 2 <= 1] = 40
    for ci in (c - 0.2 * size, c + 0.2 * size):
        plane[((i - ci) / (0.15 * size)) ** 2 + ((j - c) / (0.22 * size)) ** 2 <= 1] = -850
    vol = np.repeat(plane[:, :, None], slices, axis=2)
    vol += rng.normal(0, 20, vol.shape).astype(np.float32)
    return np.round(np.clip(vol, -1024, 3000)).astype(np.float32)


def fake_findings(volume, n: int, seed: int = 0):
    """``n`` findings of 10-40 mm boxes inside the volume, scores 0.95 down to 0.6."""
    from apps.detect_dicom.findings import findings_from_prediction

    rng = np.random.default_rng(seed)
    s, r, c = volume.array.shape
    ds, dr, dc = volume.spacing
    boxes = []
    for _ in range(n):
        mm = rng.uniform(10, 40)
        ext = np.array([mm / dc, mm / dr, mm / ds])  # (i, j, k) = (column, row, slice)
        lo = rng.uniform(0, 1, 3) * (np.array([c, r, s]) - ext - 1)
        boxes.append([*lo, *(lo + ext)])
    pred = {"boxes": boxes, "scores": np.linspace(0.95, 0.6, n).tolist(), "labels": [0] * n}
    return findings_from_prediction(pred, volume, {"0": "nodule"})


def write_series(folder: Path, size: int, slices: int) -> None:
    from tests.apps.dicom_factory import make_affine
    from tests.apps.dicom_factory import write_series as factory_write

    factory_write(folder, ct_phantom(size, slices), make_affine((0.7, 0.7, 1.5), origin=(-180.0, -180.0, -200.0)),
                  modality="CT", description="Benchmark CT", signed=True)


def _median(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    p.add_argument("--slices", type=int, default=300, help="slices (default 300)")
    p.add_argument("--findings", type=int, default=5, help="findings written to SR/SEG (default 5)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--app", action="store_true", help="also run the whole app on the series (toy cpu bundle)")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the series (default: a temp dir)")
    a = p.parse_args(argv)

    from monai.deploy.core import Fragment
    from monai.deploy.core.domain import SelectedSeries, StudySelectedSeries
    from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesToVolumeOperator

    from apps.detect_dicom import pipeline
    from apps.detect_dicom.operators import native_datasets
    from apps.detect_dicom.seg import write_seg
    from apps.detect_dicom.sr import write_sr
    from apps.detect_dicom.volume import build_volume

    work = Path(tempfile.mkdtemp(prefix="nndet_dicom_bench_", dir=a.workdir))
    try:
        series_dir = work / "study"
        t = time.perf_counter()
        write_series(series_dir, a.size, a.slices)
        print(f"series: {a.size}x{a.size}x{a.slices} int16 CT, {sum(f.stat().st_size for f in series_dir.iterdir()) / 2**20:.0f} "
              f"MiB, written in {time.perf_counter() - t:.1f} s (not timed below)", flush=True)
        fragment = Fragment()
        loader = DICOMDataLoaderOperator(fragment, input_folder=series_dir, name="loader")
        sdk_volume = DICOMSeriesToVolumeOperator(fragment, name="sdk_volume")

        t_load, studies = _median(lambda: loader.load_data_to_studies(series_dir), a.repeats)
        series = studies[0].get_all_series()[0]
        datasets = native_datasets(series)
        t_ours, vol = _median(lambda: build_volume(datasets), a.repeats)

        def sdk():
            sel = StudySelectedSeries(studies[0])
            sel.add_selected_series(SelectedSeries("all", series))
            return sdk_volume.convert_to_image([sel])

        t_sdk, image = _median(sdk, a.repeats)
        sdk_arr = np.asarray(image.asnumpy())
        # the SDK's axis order and slice direction differ from ours: compare the multiset of values cheaply
        same = (sorted(sdk_arr.shape) == sorted(vol.array.shape) and float(sdk_arr.min()) == float(vol.array.min())
                and float(sdk_arr.max()) == float(vol.array.max())
                and abs(float(sdk_arr.sum(dtype=np.float64)) - float(vol.array.sum(dtype=np.float64))) < 1e-6 * sdk_arr.size)
        print(f"SDK volume shape {sdk_arr.shape} {sdk_arr.dtype}, ours {vol.array.shape} {vol.array.dtype}")
        findings = fake_findings(vol, a.findings)
        model = pipeline.Model(bundle=work, predictor=None, name="benchmark", version="1", task="bench",
                               classes={"0": "nodule"}, modalities={"0": "CT"}, operating_point=0.5,
                               operating_point_source="benchmark")
        out = work / "out"
        out.mkdir()

        def write():
            sr = write_sr(vol, findings, out / "sr.dcm", operating_point=0.5, model_name="benchmark",
                          model_version="1", algorithm_name="nndet-monai benchmark")
            seg = write_seg(vol, findings, out / "seg.dcm", operating_point=0.5)
            pipeline.save_json(pipeline.findings_json(vol, findings, model), out / "findings.json")
            return sr, seg

        t_write, (sr, seg) = _median(write, a.repeats)
        ours = t_load + t_ours + t_write
        print()
        print(f"DICOM side of the app, {a.size}x{a.size}x{a.slices} CT, {a.findings} findings, median of {a.repeats} "
              f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')})")
        print(f"| {'stage':<34} | {'ours s':>7} | {'SDK s':>7} | {'ours/SDK':>8} |")
        print(f"|{'-' * 36}|{'-' * 9}|{'-' * 9}|{'-' * 10}|")
        print(f"| {'load (SDK DICOMDataLoaderOperator)':<34} | {t_load:7.2f} | {t_load:7.2f} | {'same':>8} |")
        print(f"| {'volume (ours: checks + highdicom)':<34} | {t_ours:7.2f} | {t_sdk:7.2f} | {t_ours / t_sdk:8.2f} |")
        print(f"| {'write SR + SEG + JSON':<34} | {t_write:7.2f} | {'-':>7} | {'-':>8} |")
        print(f"| {'ours total (target <= 10 s)':<34} | {ours:7.2f} | {'':>7} | {'':>8} |")
        print(f"SDK volume has the same values as ours (shape, min, max, sum): {same}; SR {sr.stat().st_size / 2**10:.0f} KiB, "
              f"SEG {seg.stat().st_size / 2**20:.1f} MiB" if seg else "no SEG")
        if a.app:
            run_whole_app(work, series_dir, ours)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def run_whole_app(work: Path, series_dir: Path, dicom_s: float) -> None:
    """The app on the series with a toy cpu-preset consolidated bundle (1 fold, random weights, no TTA)."""
    from apps.detect_dicom import pipeline
    from apps.detect_dicom.app import run_app
    from apps.detect_dicom.selection import load_rules
    from tests.apps.node_tools import build_bundle

    t = time.perf_counter()
    cons = build_bundle(work / "bundle")
    print(f"\ntoy cpu-preset bundle consolidated in {time.perf_counter() - t:.0f} s (not timed)", flush=True)
    model = pipeline.load_model(cons, num_tta=1, device="cpu", operating_point=0.5)
    t = time.perf_counter()
    results = run_app(series_dir, work / "app_out", model, load_rules(None))
    total = time.perf_counter() - t
    r = results[0]
    print(f"| {'whole app run (1 fold, no TTA)':<34} | {total:7.1f} s | status {r.status}, {r.num_boxes} boxes |")
    print(f"| {'DICOM stages (load+volume+write)':<34} | {dicom_s:7.1f} s | {100 * dicom_s / total:.1f}% of the run |")


if __name__ == "__main__":
    sys.exit(main())
