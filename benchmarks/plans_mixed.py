"""Why the low-resolution plan and the choice by cross-validation matter: a task of small and large objects (the
large ones bigger than the cpu preset's patch), trained with ``nndet run --preset cpu --plans all`` on the
demo's schedule, fold 0. Prints, per candidate (each plan and their ensemble), the out-of-fold validation
numbers ``nndet_find_best`` chose by and the test-set metrics, pooled and per class, and the large objects'
false positives (IoU < 0.1 with every large object, score >= 0.9: the fragments).

    python benchmarks/plans_mixed.py [--root DIR] [--cases 30] [--size 96] [-np 2]

Runs for tens of minutes on two CPU cores (two plans trained). Rerunning with the same ``--root`` resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASK = "Task110D3_Mixed"
SCHEDULE = {"epochs": 20, "iterations": 50, "warmup": 50, "swa_epochs": 2}  # workflow.cli.chain.DEMO_SCHEDULE
KEYS = ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "AP_IoU_0.50_MaxDet_100", "FROC_score_IoU_0.10")


def make_task(data: Path, num_cases: int, size: int) -> None:
    """``num_cases`` cases of ``size``^3 voxels, each with one small (6-11 voxels) and one large (44-59 voxels)
    cube, classes ``small`` / ``large``; two thirds train, one third test."""
    from tests.planner.helpers import cube_case, write_task

    rng = np.random.default_rng(110)
    cases = []
    for i in range(num_cases):
        big = int(rng.integers(44, 60))
        lo = rng.integers(2, size - big - 2, size=3)
        large = (*lo, *(lo + big))
        while True:
            s = int(rng.integers(6, 12))
            slo = rng.integers(2, size - s - 2, size=3)
            small = (*slo, *(slo + s))
            if any(small[a + 3] + 2 <= large[a] or large[a + 3] + 2 <= small[a] for a in range(3)):
                break
        split = "Tr" if i < 2 * num_cases // 3 else "Ts"
        cases.append(cube_case(f"case_{i:03d}", (size,) * 3, [tuple(int(v) for v in small),
                                                            tuple(int(v) for v in large)],
                               classes=[0, 1], seed=i, split=split))
    write_task(data, TASK, cases=cases, labels={"0": "small", "1": "large"}, test_labels=True)


def large_fragments(pred_dir: Path, task_root: Path, threshold: float = 0.9) -> tuple[int, int]:
    """(predicted large boxes scoring >= threshold with IoU < 0.1 to every large object, test cases)."""
    from ops import box_iou
    from workflow.evaluate import gt_raw

    n, files = 0, sorted(pred_dir.glob("*_boxes.json"))
    for f in files:
        d = json.loads(f.read_text())
        gt = gt_raw(task_root, d["case_id"], 3)
        pb = np.asarray(d["boxes"], np.float64).reshape(-1, 6)
        keep = (np.asarray(d["labels"]) == 1) & (np.asarray(d["scores"]) >= threshold)
        gb = np.asarray(gt["boxes"], np.float64)[np.asarray(gt["labels"]) == 1]
        if keep.any():
            iou = np.asarray(box_iou(pb[keep], gb)) if len(gb) else np.zeros((int(keep.sum()), 1))
            n += int((iou.max(axis=1) < 0.1).sum())
    return n, len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("-np", "--num_processes", type=int, default=2)
    a = ap.parse_args()
    root = a.root or Path(tempfile.mkdtemp(prefix="plans_mixed_"))
    os.environ["det_data"], os.environ["det_models"] = str(root / "data"), str(root / "models")
    os.environ.setdefault("det_num_threads", str(a.num_processes))
    sys.path.insert(0, str(ROOT))
    (root / "data").mkdir(parents=True, exist_ok=True)
    if not (root / "data" / TASK).is_dir():
        make_task(root / "data", a.cases, a.size)
    from planner import paths
    from workflow import cli
    from workflow.ensemble import (
        consolidate_ensemble,
        ensemble_dir,
        evaluate_ensemble_test,
        predict_ensemble_test,
    )
    from workflow.evaluate import evaluate_test
    from workflow.predict import predict_test

    t0 = time.time()
    overrides = [x for k, v in SCHEDULE.items() for x in ("-o", f"{k}={v}")]
    cli.run_main(["110", "--preset", "cpu", "--plans", "all", "--folds", "0", "-np", str(a.num_processes), *overrides])
    minutes = (time.time() - t0) / 60
    task_root = paths.det_data() / TASK
    best = json.loads((paths.det_models() / TASK / "best_configuration.json").read_text())
    test, frag = {}, {}
    for pid in best["plans"]:
        bundle = paths.det_models() / TASK / f"RetinaUNetV001_{pid}"
        if not (bundle / "test_results" / "results_boxes.json").is_file():
            predict_test(TASK, plan=pid)
        test[pid] = evaluate_test(TASK, plan=pid, plots=False)
        frag[pid] = large_fragments(bundle / "test_predictions", task_root)
    if len(best["plans"]) > 1:
        edir = ensemble_dir(TASK, best["plans"])
        if not (edir / "consolidated").is_dir():
            consolidate_ensemble(TASK, best["plans"], best["folds"])
        predict_ensemble_test(TASK, best["plans"])
        test["ensemble"] = evaluate_ensemble_test(TASK, best["plans"], plots=False)
        frag["ensemble"] = large_fragments(edir / "test_predictions", task_root)

    print(f"\n== {TASK}: {a.cases} cases {a.size}^3 (small 6-11, large 44-59 voxel cubes), nndet run --preset cpu "
          f"--plans all, fold 0, demo schedule {SCHEDULE}; {minutes:.1f} min ==")
    print(f"chosen by out-of-fold validation: {best['best']} ({best['criterion']})\n")
    head = ["candidate", "OOF objective", "test AP@0.1", "test mAP@0.1:0.5", "test AP@0.5", "test FROC@0.1",
            "AP@0.1 small", "AP@0.1 large", "AP@0.5 large", "large FP >= 0.9, IoU < 0.1 (per case)"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, m in test.items():
        oof = best["candidates"].get(name, {}).get("objective", float("nan"))
        n, cases = frag[name]
        row = [name + (" **chosen**" if name == best["best"] else ""), f"{oof:.3f}",
               *(f"{m[k]:.3f}" for k in KEYS), f"{m.get('small_AP_IoU_0.10_MaxDet_100', float('nan')):.3f}",
               f"{m.get('large_AP_IoU_0.10_MaxDet_100', float('nan')):.3f}",
               f"{m.get('large_AP_IoU_0.50_MaxDet_100', float('nan')):.3f}", f"{n} ({n / max(cases, 1):.2f})"]
        print("| " + " | ".join(row) + " |")
    print(f"\nall numbers: {paths.det_models() / TASK / 'best_configuration.json'} and each test_results/")


if __name__ == "__main__":
    main()
