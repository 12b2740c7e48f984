"""What every command shares: logging set-up, ``-o key=value`` parsing, user errors as exit code 2, tables."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from planner import paths

logger = logging.getLogger("planner")


def setup_logging() -> None:
    """Logging for a command; also the default SIGPIPE action, so ``nndet_prep ... | head`` ends quietly
    instead of with a BrokenPipeError traceback (Python ignores SIGPIPE unless told)."""
    import signal

    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    level = logging.DEBUG if paths.verbose() else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`-o key=value` pairs (nnDetection's override habit) into a dict."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"override '{item}' must look like key=value (e.g. -o overwrite=True)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def as_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise SystemExit(f"expected a boolean, got {value!r}")


def run_api(fn, *args, **kwargs):
    """Call an API function; turn expected user errors into a clean message and exit code 2."""
    from planner.dataset import DatasetError

    try:
        return fn(*args, **kwargs)
    except (DatasetError, paths.EnvironmentError_, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    except RuntimeError as e:
        # a bundle's scripts.predict.CasesFailed (the rest was written), workflow.train's FoldsFailed (the other
        # folds ran) and TorchrunFailed (torchrun's own report is above): the message is the whole story
        if type(e).__name__ not in ("CasesFailed", "FoldsFailed", "TorchrunFailed"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from e


def print_sweep(res, fold: int) -> None:
    print(f"sweep fold {fold}: {res.metric} {res.default_score:.4f} (defaults) -> {res.score:.4f}\nparams {res.params}")


def print_metrics(metrics: dict[str, float], out: Path) -> None:
    keys = ["AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "AP_IoU_0.50_MaxDet_100",
            "FROC_score_IoU_0.10", "AR_IoU_0.10_MaxDet_100"]
    print("\n| metric | value |\n|---|---|")
    for k in keys:
        if k in metrics:
            print(f"| {k} | {metrics[k]:.4f} |")
    per_class = {k: v for k, v in metrics.items() if k.endswith("_AP_IoU_0.10_MaxDet_100")}
    for k, v in per_class.items():
        print(f"| {k} | {v:.4f} |")
    absent = [k[: -len("_AP_IoU_0.10_MaxDet_100")] for k, v in per_class.items() if v == -1]
    if absent:
        print(f"\nno object of class {', '.join(absent)} in these cases: as in nnDetection it enters the class "
              "means (AP, mAP) as -1; read the per-class rows")
    print(f"\nall metrics: {out / 'results_boxes.json'}\nplots:       {out}/*.png, {out}/examples/")


