"""Whole-case inference: ours (``predict_case``) vs MONAI's way, same network and volume, one table per run.

Usage (from the repo root):

    python benchmarks/inference.py                                 # default plan, 512x512x256 (the issue's case)
    python benchmarks/inference.py --preset cpu --shape 128 128 64 # what a 2-core CPU VM can afford
    python benchmarks/inference.py --preset cpu --shape 128 128 64 --runs ours:1:1 monai:1:1

Plan: ``planner.plan.planner.plan_task`` on a synthetic CT-like fingerprint (10 cases of ``--shape`` voxels
at ``--spacing`` mm, four 5-30 mm objects each), preset ``--preset`` (``default`` = nnDetection's network,
``cpu`` = narrow network, patch <= 32^3). ``--shape`` is in raw axis order (i, j, k) at the target spacing;
the volume is transposed with the plan's ``transpose_forward`` (as preprocessing does), so 512x512x256 at
0.8x0.8x1.5 mm becomes a ``[1, 256, 512, 512]`` network input. The volume is CT-like after CT
normalisation: air outside an ellipsoidal body, noisy soft tissue inside, a few bright cubes.

Network: ``build_detector(**detector_kwargs_from_plan(plan))`` with random (seeded) weights; fold f uses
seed ``--seed + f``. Random weights score every anchor about the prior 0.01 (> 0), so every tile hands
``topk_candidates`` = 10000 dense, overlapping candidates to NMS: the worst case for NMS.

Runs (``METHOD:FOLDS:TTA``, default ``ours:1:1 ours:1:8 ours:5:1 ours:5:8 monai:1:1``), each in its own
subprocess (``--_one``), so that peak memory is per configuration:

* ``ours``: ``bundles.retinaunet_template.scripts.inference.predict_case`` (nnDetection's sliding window
  with overlap 0.5, per-tile detection with in-model NMS, per-member consolidation, WBC over all
  folds x mirrors).
* ``monai``: ``monai.inferers.SlidingWindowInferer(roi_size=patch, overlap=0.5, sw_batch_size=batch)``
  over a wrapper returning the per-level classification and regression maps (MONAI stitches outputs of
  different resolutions), then one decode over the whole volume as MONAI's ``RetinaNetDetector`` does:
  our detector's anchors and ``BoxCoder``, top-k 10000 over anchors x classes, score > 0, clip, small
  boxes, class-wise NMS with ``monai.data.box_utils.non_max_suppression``, 100 detections. MONAI has no
  TTA or fold ensembling, so only 1 fold, TTA 1.

Times: ``time.perf_counter`` around the whole call (after a one-batch warm-up forward pass of every
network, not timed); network time and NMS time are summed by hooks (forward hooks on the network;
wrappers around the detector's class-wise NMS and MONAI's NMS). Memory: CPU: ``ru_maxrss`` of the
subprocess (peak RSS) and its increase over the value just before the timed call (volume, networks and
warm-up already allocated); CUDA: ``torch.cuda.max_memory_allocated`` and its increase over the memory
allocated before the call. float16 autocast on CUDA (both methods).

Columns: members = folds x mirrors; tiles = images through the network (all members); candidates into
NMS / kept by NMS = boxes entering and leaving the class-wise NMS calls (ours: one per tile, summed;
MONAI: one over the whole volume), before the cap of 100 detections per image (ours: per tile); final
= after WBC (ours) or the cap (MONAI); network / NMS = time inside those calls; merge = ours'
per-member consolidation + WBC, MONAI's stitching (sliding window time outside the network).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundles.retinaunet_template.scripts import detector as det_mod  # noqa: E402
from bundles.retinaunet_template.scripts import inference as inf_mod  # noqa: E402
from bundles.retinaunet_template.scripts.detector import (  # noqa: E402
    _flatten_levels,
    build_detector,
    detector_kwargs_from_plan,
)

DEFAULT_RUNS = ["ours:1:1", "ours:1:8", "ours:5:1", "ours:5:8", "monai:1:1"]
MIB = 2**20


# ------------------------------------------------------------------------------------ plan and volume
def ct_fingerprint(shape, spacing, n_cases: int = 10, seed: int = 0):
    """A synthetic CT fingerprint: ``n_cases`` cases of ``shape`` voxels, four 5-30 mm objects each."""
    from planner.dataset import DatasetInfo
    from planner.fingerprint import CaseFingerprint, Fingerprint, IntensityStats

    rng = np.random.default_rng(seed)
    stats = IntensityStats(mean=40.0, std=120.0, median=35.0, min=-1024.0, max=1500.0,
                           percentile_00_5=-950.0, percentile_99_5=900.0, num_voxels=10**6)
    cases = []
    for i in range(n_cases):
        boxes = []
        for _ in range(4):
            ext = [max(1, round(rng.uniform(5, 30) / s)) for s in spacing]
            start = [int(rng.integers(0, max(1, sh - e))) for sh, e in zip(shape, ext, strict=True)]
            boxes.append([float(v) for v in (*start, *[s + e for s, e in zip(start, ext, strict=True)])])
        cases.append(CaseFingerprint(
            case_id=f"case{i:03d}", shape=list(shape), spacing=list(spacing), crop_bbox=[[0, s] for s in shape],
            shape_after_crop=list(shape), size_reduction=1.0, boxes=boxes, box_classes=[0] * 4,
            instance_ids=[1, 2, 3, 4], intensity=[stats]))
    mods, labs = {"0": "CT"}, {"0": "lesion"}
    fp = Fingerprint(task="Task999_BenchCT", dim=3, modalities=mods, labels=labs, cases=cases,
                     intensity=[stats], num_instances={"0": 4 * n_cases})
    return fp, DatasetInfo(task="Task999_BenchCT", dim=3, labels=labs, modalities=mods)


def make_plan(shape, spacing, preset: str):
    from planner.plan.planner import plan_task

    fp, ds = ct_fingerprint([int(s) for s in shape], [float(s) for s in spacing])
    return plan_task(fp, ds, preset=preset)[0]


def ct_volume(shape, seed: int = 0, n_cubes: int = 5) -> np.ndarray:
    """``[1, *shape]`` float32: air (-3) outside an ellipsoidal body, N(0, 0.3) inside, bright cubes (+3)."""
    rng = np.random.default_rng(seed)
    vol = rng.standard_normal(shape, dtype=np.float32)
    vol *= 0.3
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    r2 = sum(((g - (s - 1) / 2) / (0.45 * s)) ** 2 for g, s in zip(grids, shape, strict=True))
    vol[r2 > 1.0] = -3.0
    for _ in range(n_cubes):
        e = [max(2, int(rng.integers(s // 32 + 2, s // 12 + 4))) for s in shape]
        st = [int(rng.integers(s // 4, max(s // 4 + 1, 3 * s // 4 - ee))) for s, ee in zip(shape, e, strict=True)]
        vol[tuple(slice(a, a + b) for a, b in zip(st, e, strict=True))] += 3.0
    return vol[None]


# ------------------------------------------------------------------------------------ instrumentation
class Meter:
    """Network time / images (forward hooks) and NMS time / boxes (wrappers), summed over a run."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.net_s = self.nms_s = self.merge_s = 0.0
        self.images = self.nms_in = self.nms_kept = 0
        self._t0 = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def attach(self, net: torch.nn.Module) -> None:
        def pre(_mod, args):
            self._t0 = self._now()

        def post(_mod, args, _out):
            self.net_s += self._now() - self._t0
            self.images += int(args[0].shape[0])

        net.register_forward_pre_hook(pre)
        net.register_forward_hook(post)

    def reset(self) -> None:
        self.net_s = self.nms_s = self.merge_s = 0.0
        self.images = self.nms_in = self.nms_kept = 0

    def wrap_nms(self, fn):
        def timed(boxes, *args, **kwargs):
            t = self._now()
            keep = fn(boxes, *args, **kwargs)
            self.nms_s += self._now() - t
            self.nms_in += int(boxes.shape[0])
            self.nms_kept += int(len(keep))
            return keep

        return timed

    def wrap_merge(self, fn):
        def timed(*args, **kwargs):
            t = self._now()
            out = fn(*args, **kwargs)
            self.merge_s += self._now() - t
            return out

        return timed


# ------------------------------------------------------------------------------------ MONAI's way
class LevelMaps(torch.nn.Module):
    """Our network as MONAI's sliding window wants it: a tuple of per-level cls maps, then reg maps."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network(x)
        return (*out["cls_logits"], *out["box_regression"])


def monai_postprocess(detector, cls_logits, box_regression, anchors, image_size, nms, meter: Meter):
    """``RetinaUNetDetector.postprocess`` with MONAI's ``non_max_suppression`` per class (one image)."""
    dim, c = detector.dim, detector.num_classes
    scores = torch.sigmoid(cls_logits.float()).flatten()
    scores, idx = scores.topk(min(detector.topk_candidates, scores.numel()))
    keep = scores > detector.score_thresh
    scores, idx = scores[keep], idx[keep]
    anchor_idx, labels = idx // c, idx % c
    boxes = detector.coder.decode_single(box_regression[anchor_idx].float(), anchors[anchor_idx])
    for a in range(dim):
        boxes[:, a].clamp_(0, image_size[a])
        boxes[:, a + dim].clamp_(0, image_size[a])
    keep = ((boxes[:, dim:] - boxes[:, :dim]) >= detector.min_box_size).all(dim=1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    kept = []
    for k in torch.unique(labels):
        cls_idx = torch.where(labels == k)[0]
        kept.append(cls_idx[meter.wrap_nms(nms)(boxes[cls_idx], scores[cls_idx], detector.nms_thresh)])
    if kept:
        keep = torch.cat(kept)
        keep = keep[torch.argsort(scores[keep], descending=True, stable=True)][: detector.detections_per_img]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    return {"boxes": boxes, "scores": scores, "labels": labels}


def monai_predict(detector, vol: np.ndarray, patch, batch: int, device: torch.device, meter: Meter) -> dict:
    from monai.data.box_utils import non_max_suppression
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=list(patch), sw_batch_size=batch, overlap=0.5, mode="constant",
                                   sw_device=device, device=device, progress=False)
    wrapper = LevelMaps(detector.network).eval()
    image = torch.from_numpy(vol)[None]
    n = len(detector.network.decoder_levels)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        t = meter._now()
        maps = inferer(image, wrapper)
        sw_s = meter._now() - t
        meter.merge_s += sw_s - meter.net_s  # stitching = sliding window time outside the network
        cls, reg = list(maps[:n]), list(maps[n:])
        anchors, _ = detector.anchor_generator.anchors_for(tuple(vol.shape[1:]), [m.shape[2:] for m in cls],
                                                           device)
        out = monai_postprocess(detector, _flatten_levels(cls, detector.num_classes)[0],
                                _flatten_levels(reg, 2 * detector.dim)[0], anchors, vol.shape[1:],
                                non_max_suppression, meter)
    return {"final": int(out["boxes"].shape[0]), "anchors": int(anchors.shape[0])}


# ------------------------------------------------------------------------------------ one configuration
def run_one(cfg: dict) -> dict:
    method, folds, tta = cfg["method"], int(cfg["folds"]), int(cfg["tta"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    plan = make_plan(cfg["shape"], cfg["spacing"], cfg["preset"])
    shape_t = [int((cfg.get("volume") or cfg["shape"])[a]) for a in plan.transpose_forward]
    vol = ct_volume(shape_t, seed=cfg["seed"])
    patch, batch = list(plan.patch_size), int(plan.batch_size)
    meter = Meter(cuda)
    detectors = []
    for f in range(folds):
        torch.manual_seed(cfg["seed"] + f)
        d = build_detector(**detector_kwargs_from_plan(plan)).to(device).eval()
        meter.attach(d.network)
        detectors.append(d)
    warm = torch.zeros(batch, 1, *patch, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
        for d in detectors:
            d.network(warm)
    del warm
    det_mod.class_wise_nms = meter.wrap_nms(det_mod.class_wise_nms)  # ours: per-tile NMS in the detector
    inf_mod.postprocess_members = meter.wrap_merge(inf_mod.postprocess_members)  # consolidation + WBC
    meter.reset()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    if method == "ours":
        pred = inf_mod.predict_case(detectors, vol, patch, batch, num_tta=tta, device=device, amp=True)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        extra = {"final": len(pred.detections), "raw": sum(len(m) for m in pred.members),
                 "members": len(pred.members)}
    elif method == "monai":
        if folds != 1 or tta != 1:
            raise ValueError("MONAI's way has no TTA or fold ensembling: use monai:1:1")
        extra = monai_predict(detectors[0], vol, patch, batch, device, meter)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        extra["members"] = 1
    else:
        raise ValueError(f"unknown method {method!r}")
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**cfg, **extra, "wall": wall, "net_s": meter.net_s, "nms_s": meter.nms_s, "merge_s": meter.merge_s,
            "tiles": meter.images, "nms_in": meter.nms_in, "nms_kept": meter.nms_kept, "peak": peak,
            "peak_inc": peak - base, "patch": patch, "batch": batch, "vol_shape": shape_t,
            "transpose": list(plan.transpose_forward),
            "params_per_net": sum(p.numel() for p in detectors[0].parameters())}


# ------------------------------------------------------------------------------------ driver
def full_grid_tiles(shape_t, patch) -> dict[str, int]:
    """Network passes per member for a whole ``shape_t`` volume: nnDetection's grid (ours) and MONAI's."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    ours = len(inf_mod.tile_starts(shape_t, patch, 0.5))
    interval = _get_scan_interval(shape_t, patch, len(patch), (0.5,) * len(patch))
    return {"ours": ours, "monai": len(dense_patch_slices(shape_t, patch, interval))}


def print_extrapolation(results: list[dict], shape, r0: dict) -> None:
    """Measured time per network pass x the passes a whole ``shape`` volume needs (labelled as such)."""
    plan_t = [int(shape[a]) for a in r0["transpose"]]
    tiles = full_grid_tiles(plan_t, r0["patch"])
    print(f"\nExtrapolated to the whole volume [1, {', '.join(map(str, plan_t))}] (raw {'x'.join(map(str, shape))}; "
          f"not measured): tiles per member {tiles['ours']} (ours, nnDetection's grid) / {tiles['monai']} (MONAI's); "
          "wall = measured wall per network pass x passes\n")
    print("| method | folds x TTA | network passes | measured s per pass | extrapolated wall |\n|---|---|---|---|---|")
    for r in results:
        passes = tiles[r["method"]] * r["members"]
        per = r["wall"] / max(1, r["tiles"])
        print(f"| {r['method']} | {r['folds']} x {r['tta']} | {passes} | {per:.2f} | {passes * per / 60:.1f} min |")



def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["default", "cpu"], default="default")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 256], help="raw axis order (i, j, k)")
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5], help="mm, raw axis order")
    p.add_argument("--volume", type=int, nargs=3, default=None,
                   help="predict a volume of this raw (i, j, k) shape with the plan made for --shape (default: --shape); "
                        "the table then adds a per-network-pass extrapolation to the --shape volume")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="METHOD:FOLDS:TTA, METHOD ours|monai")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    p.add_argument("--_one", dest="one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    base = {"preset": args.preset, "shape": args.shape, "spacing": args.spacing, "device": device,
            "seed": args.seed, "volume": args.volume}
    results = []
    for spec in args.runs:
        method, folds, tta = spec.split(":")
        cfg = {**base, "method": method, "folds": int(folds), "tta": int(tta)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_one", json.dumps(cfg)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ.copy())
        sys.stderr.write(proc.stderr)  # warnings of the child (e.g. MONAI's about non-integer output windows)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"configuration {spec} failed (exit {proc.returncode})")
        res = json.loads(lines[-1][len("RESULT "):])
        results.append(res)
        print(f"# {spec}: {res['wall']:.2f} s ({time.perf_counter() - t:.1f} s with process start and setup)",
              file=sys.stderr, flush=True)

    r0 = results[0]
    gpu = device == "cuda"
    dev_name = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})"
    print(f"# inference benchmark, {date.today()}, {platform.node()}, {dev_name}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), AMP {'float16' if gpu else 'off (CPU)'}")
    print(f"# plan preset {args.preset}: patch {r0['patch']}, batch {r0['batch']}, "
          f"{r0['params_per_net'] / 1e6:.2f} M parameters per network; volume [1, {', '.join(map(str, r0['vol_shape']))}] "
          f"(raw {'x'.join(map(str, args.shape))} transposed); random weights, seed {args.seed} + fold\n")
    monai_wall = next((r["wall"] for r in results if r["method"] == "monai"), None)
    mem = "CUDA max allocated" if gpu else "peak RSS"
    head = ["method", "folds x TTA", "members", "tiles (network passes)", "candidates into NMS",
            "kept by NMS", "after the 100/image cap", "final", "wall", "network", "NMS", "merge", f"{mem} increase", mem,
            "wall vs MONAI 1x1"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        merge = "consolidation + WBC" if r["method"] == "ours" else "stitching"
        name = "ours (`predict_case`)" if r["method"] == "ours" else "MONAI (`SlidingWindowInferer` + decode)"
        ratio = "-" if monai_wall is None else f"{r['wall'] / monai_wall:.2f}"
        print("| " + " | ".join([
            name, f"{r['folds']} x {r['tta']}" + ("" if r["method"] == "ours" else " (no TTA / ensembling)"),
            str(r["members"]), str(r["tiles"]), str(r["nms_in"]), str(r["nms_kept"]), str(r.get("raw", r["final"])), str(r["final"]),
            _fmt_s(r["wall"]), _fmt_s(r["net_s"]), _fmt_s(r["nms_s"]), f"{_fmt_s(r['merge_s'])} ({merge})",
            f"{r['peak_inc'] / MIB:.0f} MiB", f"{r['peak'] / MIB:.0f} MiB", ratio]) + " |")
    if args.volume is not None and list(args.volume) != list(args.shape):
        print_extrapolation(results, args.shape, r0)
    if not gpu:
        print("\nGPU goal (issue 6; H100, default plan, 512x512x256): 5 folds x 8 TTA <= 30 s end to end, "
              "1 fold no TTA <= 3 s: **not measured: no GPU lent**.")


if __name__ == "__main__":
    main()
