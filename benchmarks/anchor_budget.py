"""Anchor search budget: ours (one run, <= 500 boxes, 40 generations) vs nnDetection's (3 runs x ~5000 evaluations
on all boxes, best kept), scored on every box (issue 17, item 9).

nnDetection optimises its anchor sizes with nevergrad's TwoPointsDE, budget 5000, three times, over all GT boxes.
Ours runs scipy's differential evolution once on a seeded subsample of at most ``MAX_BOXES`` boxes for
``DE_MAXITER`` generations. This script plans anchors both ways for several simulated box populations (the
search is a pure function of the box sizes, so no images are needed) and prints the mean best IoU of the
planned anchors over all boxes (the value the plan reports), the evaluations and the time of each, in one run.

    python benchmarks/anchor_budget.py            # ~2-4 min on one core
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from planner.plan import anchors as A

STRIDES_3D = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
LEVELS_3D = [2, 3, 4, 5]
STRIDES_2D = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]]
LEVELS_2D = [2, 3, 4, 5]
NNDET_BUDGET = 5000  # evaluations per run (nevergrad budget)
NNDET_RUNS = 3


def populations(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list, list]]:
    """Box sizes [N, dim] (voxels, transposed order) of a few typical tasks, with strides and levels."""
    def lognormal(n, mean_mm, sigma, spacing):
        d = np.exp(rng.normal(np.log(mean_mm), sigma, n))[:, None] * rng.uniform(0.8, 1.25, (n, len(spacing)))
        return d / np.asarray(spacing)

    small = lognormal(3000, 8.0, 0.45, [1.5, 0.8, 0.8])  # lung nodules, CT 0.8 x 0.8 x 1.5 mm
    mixed = np.concatenate([lognormal(1500, 8.0, 0.4, [1.5, 0.8, 0.8]),
                            lognormal(500, 45.0, 0.3, [1.5, 0.8, 0.8])])  # nodules and large masses
    aniso = lognormal(2000, 20.0, 0.5, [5.0, 0.7, 0.7])  # thick-slice MR lesions
    two_d = lognormal(4000, 12.0, 0.5, [0.5, 0.5])  # 2D lesions, 0.5 mm pixels
    return {"small lesions (3D, 3000)": (small, STRIDES_3D, LEVELS_3D),
            "small + large (3D, 2000)": (mixed, STRIDES_3D, LEVELS_3D),
            "anisotropic (3D, 2000)": (aniso, STRIDES_3D, LEVELS_3D),
            "2D lesions (4000)": (two_d, STRIDES_2D, LEVELS_2D)}


def nndet_like(sizes, strides, levels) -> tuple[float, int, float]:
    """Best of ``NNDET_RUNS`` searches on all boxes, ``NNDET_BUDGET`` evaluations each: (IoU, evaluations, s)."""
    dim = len(strides[0])
    maxiter = max(1, NNDET_BUDGET // (A.DE_POPSIZE * dim * A.SIZES_PER_AXIS) - 1)
    t0, best, evals = time.perf_counter(), -1.0, 0
    for run in range(NNDET_RUNS):
        plan = A.plan_anchors(sizes, strides, levels, seed=run, max_boxes=len(sizes), maxiter=maxiter)
        best = max(best, plan.mean_best_iou)
        evals += (maxiter + 1) * A.DE_POPSIZE * dim * A.SIZES_PER_AXIS
    return best, evals, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print("| boxes | ours: mean best IoU | ours: evaluations, boxes | ours s | nnDetection budget: IoU | "
          "its evaluations, boxes | its s | difference |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (sizes, strides, levels) in populations(rng).items():
        dim = len(strides[0])
        t0 = time.perf_counter()
        ours = A.plan_anchors(sizes, strides, levels).mean_best_iou
        t_ours = time.perf_counter() - t0
        ours_evals = (A.DE_MAXITER + 1) * A.DE_POPSIZE * dim * A.SIZES_PER_AXIS
        theirs, evals, t_theirs = nndet_like(sizes, strides, levels)
        print(f"| {name} | {ours:.4f} | <= {ours_evals}, {min(len(sizes), A.MAX_BOXES)} | {t_ours:.1f} | "
              f"{theirs:.4f} | {evals}, {len(sizes)} | {t_theirs:.1f} | {ours - theirs:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
