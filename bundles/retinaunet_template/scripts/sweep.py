"""Empirical postprocessing sweep: coordinate search over the box-merging parameters.

nnDetection's ``BoxSweeper``: start from the defaults; for each parameter in a fixed order, evaluate every
value of its range with the other parameters at their current best, keep the argmax, go to the next
parameter. On ties we keep the current value (nnDetection's ``argmax`` takes the first value of the range,
so a fold where every setting scores the same moves e.g. ``model_iou`` from 0.1 to 1e-5 for nothing); among
other tied values the earliest wins. One pass, no restarts. The objective is
``mAP_IoU_0.10_0.50_0.05_MaxDet_100`` on the fold's validation cases, computed from raw per-member
predictions stored once, so the network never runs again during the sweep.

The search itself (:func:`coordinate_search`) knows nothing about boxes: it takes an ``evaluate(params)``
callable, which the caller builds from the stored predictions. Results are plain JSON
(``sweep/params.json``) with one curve per parameter, plotted by :func:`plot_sweep`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.io import atomic_path, save_json

logger = logging.getLogger(__name__)

SWEEP_METRIC = "mAP_IoU_0.10_0.50_0.05_MaxDet_100"

# nnDetection's defaults of the per-member and ensemble stages (``BoxEnsemblerSelective``)
DEFAULT_PARAMS: dict[str, Any] = {
    "model_iou": 0.1,
    "model_nms": "weighted",
    "ensemble_iou": 0.5,
    "model_score_thresh": 0.0,
    "remove_small_boxes": 0.01,
}

# nnDetection's ranges, in its search order (``BoxEnsemblerSelective.sweep_parameters``)
SWEEP_SPACE: dict[str, list[Any]] = {
    "model_iou": [1e-5, 0.1, 0.2, 0.3, 0.4, 0.5],
    "model_nms": ["weighted", "plain"],
    "ensemble_iou": [1e-5, 0.1, 0.2, 0.3, 0.4, 0.5],
    "model_score_thresh": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    "remove_small_boxes": [0.01, 2, 3, 4, 5, 6, 7],
}


@dataclass
class SweepResult:
    """Outcome of a coordinate search.

    Attributes:
        params: the best value of every parameter.
        score: the objective at ``params``.
        default_score: the objective at the starting parameters.
        curves: per parameter, ``[(value, score), ...]`` in evaluation order (other parameters at their best
            values at that point of the search).
        metric: name of the objective.
    """

    params: dict[str, Any]
    score: float
    default_score: float
    curves: dict[str, list[tuple[Any, float]]] = field(default_factory=dict)
    metric: str = SWEEP_METRIC

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "score": self.score, "default_score": self.default_score,
                "params": self.params, "curves": {k: [[v, s] for v, s in c] for k, c in self.curves.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepResult:
        return cls(params=dict(d["params"]), score=float(d["score"]), default_score=float(d["default_score"]),
                   curves={k: [(v, float(s)) for v, s in c] for k, c in d.get("curves", {}).items()},
                   metric=str(d.get("metric", SWEEP_METRIC)))


def coordinate_search(
    evaluate: Callable[[dict[str, Any]], float],
    space: Mapping[str, Sequence[Any]] | None = None,
    start: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> SweepResult:
    """One pass of coordinate-wise search, maximising ``evaluate``.

    Args:
        evaluate: parameters -> score (higher is better; NaN counts as -inf). Called once per distinct
            parameter set (results are cached).
        space: parameter -> candidate values, in search order (default :data:`SWEEP_SPACE`).
        start: starting values (default :data:`DEFAULT_PARAMS`); parameters not in ``space`` stay fixed.
        progress: show a tqdm bar over the evaluations.

    Returns:
        :class:`SweepResult`; ties keep the current value, else the earliest value in the range.
    """
    space = dict(SWEEP_SPACE if space is None else space)
    current = dict(DEFAULT_PARAMS if start is None else start)
    for name, values in space.items():
        if not values:
            raise ValueError(f"sweep range of {name!r} is empty")
        current.setdefault(name, values[0])
    cache: dict[tuple, float] = {}

    def score_of(params: dict[str, Any]) -> float:
        key = tuple(sorted((k, repr(v)) for k, v in params.items()))
        if key not in cache:
            value = float(evaluate(dict(params)))
            cache[key] = -math.inf if math.isnan(value) else value
        return cache[key]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=1 + sum(len(v) for v in space.values()), desc="sweep", unit="eval")
    default_score = score_of(current)
    if bar is not None:
        bar.update(1)
    curves: dict[str, list[tuple[Any, float]]] = {}
    for name, values in space.items():
        curve = []
        for value in values:
            curve.append((value, score_of({**current, name: value})))
            if bar is not None:
                bar.update(1)
        # ties keep the current value (then the earliest): a parameter moves only for a real gain
        best_value = current[name]
        best = dict((repr(v), sc) for v, sc in curve).get(repr(best_value), -math.inf)
        for value, score in curve:
            if score > best:
                best_value, best = value, score
        current[name] = best_value
        curves[name] = curve
        logger.info("sweep %s: best %r (%s %.4f)", name, best_value, SWEEP_METRIC, best)
    if bar is not None:
        bar.close()
    return SweepResult(params=current, score=score_of(current), default_score=default_score, curves=curves)


def save_sweep(result: SweepResult, out_dir: str | os.PathLike, plot: bool = True) -> Path:
    """Write ``<out_dir>/params.json`` (atomic) and, with ``plot``, ``<out_dir>/sweep.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = save_json(result.to_dict(), out / "params.json")
    if plot:
        plot_sweep(result, out / "sweep.png")
    return Path(path)


def plot_sweep(result: SweepResult, path: str | os.PathLike) -> Path:
    """One panel per parameter: the objective over its range, the chosen value marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.curves)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.2 * max(1, len(names)), 3), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        curve = result.curves[name]
        labels = [str(v) for v, _ in curve]
        scores = [s if math.isfinite(s) else float("nan") for _, s in curve]
        ax.plot(range(len(curve)), scores, marker="o")
        chosen = labels.index(str(result.params[name])) if str(result.params[name]) in labels else None
        if chosen is not None:
            ax.plot([chosen], [scores[chosen]], marker="*", markersize=14, color="tab:red")
        ax.set_xticks(range(len(curve)), labels, rotation=45, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(result.metric, fontsize=7)
    fig.suptitle(f"sweep: {result.metric} {result.default_score:.4f} (defaults) -> {result.score:.4f}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)
