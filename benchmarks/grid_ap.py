"""Test-set detection quality with nnDetection's tile grid vs the even grid (fewer tiles, same overlap), issue 19
item 2. Runs on a task that ``benchmarks/plans_mixed.py`` trained (its ``--root``), for each of its plans:
``nndet_predict`` of the test set with each grid (fold 0, ``--num_tta`` mirrors), then ``nndet_eval``'s
metrics, and the tiles per case. Nothing is trained; the existing ``test_predictions`` are kept
(each grid writes its own copy beside them).

At the task's 96^3 both grids place the same tiles; ``--crop 90`` first crops the test images and labels
(off-centre, offsets 3, 2, 5) to 90^3, where they differ (the originals go to ``DIR/grid_ap_originals``
once, and the plans' preprocessed test images are moved there so they are made again).

    python benchmarks/grid_ap.py --root DIR [--crop 90] [--num_tta 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = "Task110D3_Mixed"
CROP_OFFSET = (3, 2, 5)
KEYS = ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "AP_IoU_0.50_MaxDet_100", "FROC_score_IoU_0.10")


def crop_test_set(root: Path, size: int) -> None:
    """Crop ``imagesTs`` / ``labelsTs`` to ``size`` per axis (once; originals kept under grid_ap_originals)."""
    import nibabel as nib
    import numpy as np

    task, keep = root / "data" / TASK, root / "grid_ap_originals"
    if keep.is_dir():
        return
    keep.mkdir()
    for sub in ("imagesTs", "labelsTs"):
        shutil.copytree(task / "raw_splitted" / sub, keep / sub)
        for f in sorted((task / "raw_splitted" / sub).glob("*.nii.gz")):
            img = nib.load(str(f))
            a = np.asarray(img.dataobj)
            b = a[tuple(slice(o, o + size) for o in CROP_OFFSET)]
            nib.save(nib.Nifti1Image(b.astype(a.dtype), img.affine, img.header), str(f))
    for pre in (task / "preprocessed").glob("*/imagesTs"):
        pre.rename(keep / f"preprocessed_{pre.parent.name}_imagesTs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="the --root of benchmarks/plans_mixed.py")
    p.add_argument("--num_tta", type=int, default=1)
    p.add_argument("--crop", type=int, default=None, help="crop the test cases to this size per axis first")
    args = p.parse_args()
    if args.crop:
        crop_test_set(args.root, args.crop)
    os.environ["det_data"], os.environ["det_models"] = str(args.root / "data"), str(args.root / "models")
    sys.path.insert(0, str(ROOT))
    from bundles.retinaunet_template.scripts import inference as template
    from workflow.bundle_code import bundle_module
    from workflow.evaluate import evaluate_test_predictions
    from workflow.models import bundle_for, task_plans
    from workflow.predict import predict_test

    rows = []
    for plan in task_plans(TASK):
        bundle = bundle_for(TASK, plan=plan.plan_id)
        if not (bundle / "fold0" / "model_last.pt").is_file():
            continue
        keep = bundle / "test_predictions"
        backup = bundle / "test_predictions.kept"
        if keep.is_dir() and not backup.exists():
            shutil.copytree(keep, backup)
        for grid in template.GRIDS:
            inference = bundle_module(bundle, "inference")
            tiles = []

            def counted(shape, patch, overlap=0.5, _grid=grid, tiles=tiles):
                starts = template.tile_starts(shape, patch, overlap, _grid)
                tiles.append(len(starts))
                return starts

            inference.tile_starts = counted  # the bundle's own sliding window, with this grid
            t0 = time.perf_counter()
            out = predict_test(TASK, plan=plan.plan_id, folds=[0], num_tta=args.num_tta, overwrite=True)
            wall = time.perf_counter() - t0
            dest = bundle / f"test_predictions_{grid}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(out, dest)
            m = evaluate_test_predictions(TASK, bundle, dest, bundle / f"test_results_{grid}", plots=False)
            rows.append((plan.plan_id, grid, sum(tiles) / max(1, len(tiles)) * args.num_tta, wall,
                         *[float(m[k]) for k in KEYS]))
            print(rows[-1], flush=True)
        if backup.is_dir():
            shutil.rmtree(keep)
            backup.rename(keep)
    print(f"\n{TASK}, fold 0, {args.num_tta} TTA, test set\n")
    print("| plan | grid | tiles per case | predict s | AP@0.1 | mAP@0.1:0.5 | AP@0.5 | FROC@0.1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | " + " | ".join(f"{v:.3f}" for v in r[4:]) + " |")


if __name__ == "__main__":
    main()
