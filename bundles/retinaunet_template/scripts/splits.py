"""Cross-validation splits: created once, saved as JSON, reused (5 folds, as nnDetection).

The splits file is a JSON list with one entry per fold::

    [{"train": ["case_0", ...], "val": ["case_3", ...]}, ...]

nnDetection creates its folds with sklearn ``KFold(n_splits=5, shuffle=True, random_state=12345)`` over the
sorted case ids and pickles them. We write JSON and do not depend on sklearn, but make **the same folds**:
KFold's shuffle is ``numpy.random.RandomState(random_state).shuffle`` of ``arange(n)``, cut into contiguous
chunks, the first ``n % k`` one larger. A user moving from nnDetection compares fold by fold. A
user-provided file is accepted after validation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planner.io import load_json, save_json

logger = logging.getLogger(__name__)

DEFAULT_NUM_FOLDS = 5
DEFAULT_SEED = 12345


class SplitsError(ValueError):
    """A splits file is invalid; the message names the file and what to fix."""


def make_splits(
    case_ids: Sequence[str], num_folds: int = DEFAULT_NUM_FOLDS, seed: int = DEFAULT_SEED
) -> list[dict[str, list[str]]]:
    """Deterministic K-fold splits.

    Case ids are sorted, their indices shuffled once with ``numpy.random.RandomState(seed)`` and cut into
    ``num_folds`` contiguous chunks (the first ``n % num_folds`` chunks get one extra case): sklearn's
    ``KFold(num_folds, shuffle=True, random_state=seed)``, so with the default seed the folds are
    nnDetection's. Fold ``k`` validates on chunk ``k`` and trains on the rest. The result does not depend
    on the input order of ``case_ids``.

    Args:
        case_ids: unique case identifiers.
        num_folds: number of folds (>= 2, <= number of cases).
        seed: permutation seed.

    Returns:
        ``num_folds`` dicts ``{"train": [...], "val": [...]}``, each list sorted.
    """
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("make_splits: case ids are not unique")
    if num_folds < 2:
        raise ValueError(f"make_splits: num_folds must be >= 2, got {num_folds}")
    if len(ids) < num_folds:
        raise ValueError(
            f"make_splits: {len(ids)} case(s) cannot be split into {num_folds} folds; "
            "use fewer folds (-o num_folds=...) or add cases"
        )
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)  # legacy generator on purpose: sklearn's KFold uses it
    sizes = np.full(num_folds, len(ids) // num_folds)
    sizes[: len(ids) % num_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    splits = []
    for k in range(num_folds):
        val = {ids[i] for i in order[bounds[k] : bounds[k + 1]]}
        splits.append({"train": sorted(set(ids) - val), "val": sorted(val)})
    return splits


def validate_splits(splits: Any, case_ids: Sequence[str], path: str | os.PathLike = "<splits>") -> None:
    """Check a splits structure against the dataset's cases.

    Rules: a non-empty list of ``{"train": [...], "val": [...]}``; no unknown case id; no case in both
    train and val of a fold; validation folds pairwise disjoint; every case of ``case_ids`` in some
    validation fold.

    Raises:
        SplitsError: every problem found, naming ``path`` and how to fix it.
    """
    known = set(case_ids)
    problems: list[str] = []
    if not isinstance(splits, list) or not splits:
        raise SplitsError(f"{path}: expected a non-empty JSON list of {{'train': [...], 'val': [...]}} folds")
    seen_val: dict[str, int] = {}
    for k, fold in enumerate(splits):
        if (
            not isinstance(fold, dict)
            or not isinstance(fold.get("train"), list)
            or not isinstance(fold.get("val"), list)
        ):
            problems.append(f"fold {k}: must be an object with lists 'train' and 'val'")
            continue
        train, val = set(map(str, fold["train"])), set(map(str, fold["val"]))
        unknown = sorted((train | val) - known)
        if unknown:
            problems.append(f"fold {k}: unknown case id(s) {unknown[:10]} (not in the preprocessed data)")
        both = sorted(train & val)
        if both:
            problems.append(f"fold {k}: case(s) {both[:10]} are in both train and val")
        for case in sorted(val):
            if case in seen_val:
                problems.append(f"fold {k}: case '{case}' is also in the val set of fold {seen_val[case]}")
            else:
                seen_val[case] = k
    missing = sorted(known - set(seen_val))
    if missing:
        problems.append(f"case(s) {missing[:10]} ({len(missing)} in all) are in no validation fold")
    if problems:
        raise SplitsError(
            f"{path}: invalid splits file:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nFix the file, or delete it to have deterministic splits created again."
        )


def load_or_create_splits(
    path: str | os.PathLike,
    case_ids: Sequence[str],
    num_folds: int = DEFAULT_NUM_FOLDS,
    seed: int = DEFAULT_SEED,
) -> list[dict[str, list[str]]]:
    """Load the splits file at ``path``, or create it once with :func:`make_splits`.

    An existing file (ours or user-provided) is validated against ``case_ids`` and reused as is, even if
    its number of folds differs from ``num_folds`` (logged). A new file is written atomically.

    Returns:
        The list of folds ``{"train": [...], "val": [...]}``.
    """
    path = Path(path)
    if path.exists():
        splits = load_json(path)
        validate_splits(splits, case_ids, path)
        if len(splits) != num_folds:
            logger.info("%s holds %d folds (requested %d): using the file", path, len(splits), num_folds)
        return [{"train": list(map(str, f["train"])), "val": list(map(str, f["val"]))} for f in splits]
    splits = make_splits(case_ids, num_folds=num_folds, seed=seed)
    save_json(splits, path)
    logger.info("created %d-fold splits for %d cases: %s", num_folds, len(case_ids), path)
    return splits


def fold_cases(splits: list[dict[str, list[str]]], fold: int, path: str | os.PathLike = "<splits>") -> dict:
    """Return ``splits[fold]`` with a clear error for an out-of-range fold."""
    if not 0 <= fold < len(splits):
        raise SplitsError(f"{path}: fold {fold} requested but the file has folds 0..{len(splits) - 1}")
    return splits[fold]
