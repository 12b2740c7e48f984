"""Peak memory of a mask per finding (``nndet_predict --masks``) on a 512x512x256 case, next to boxes only.

The network is replaced by a detector that returns fixed boxes and the tile itself as foreground probability,
so the table shows what the mask path adds (the tile average of one float32 case array, the masks cropped to
their boxes, the mask file) on top of the image, not the network's activations (which are the same for both).
Each variant runs in its own process; peak RSS is that process's ``ru_maxrss``.

    python benchmarks/masks_memory.py [--shape 512 512 256] [--boxes 100]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(shape: list[int], num_boxes: int, masks: bool, out: str) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from bundles.retinaunet_template.scripts import inference
    from bundles.retinaunet_template.scripts.masks import finding_masks, save_masks

    rng = np.random.default_rng(0)
    image = rng.random((1, *shape), dtype=np.float32)
    patch = (128, 128, 64)
    lo = rng.integers(0, np.asarray(shape) - 40, size=(num_boxes, 3))
    boxes = np.concatenate([lo, lo + rng.integers(8, 40, size=(num_boxes, 3))], 1).astype(np.float32)

    def detector(batch, return_seg=False):
        res = []
        for tile in batch:
            d = {"boxes": torch.from_numpy(boxes[:5] % 60), "scores": torch.rand(5), "labels": torch.zeros(5, dtype=torch.long)}
            if return_seg:
                d["seg_probs"] = tile[0]
            res.append(d)
        return res

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    pred = inference.predict_case([detector], image, patch, 4, num_tta=1, masks=masks, amp=False)
    if masks:
        props = {"crop_bbox": [[0, s] for s in shape], "shape_after_crop": shape, "transpose_forward": [0, 1, 2],
                 "shape_after_resampling": shape}
        m = finding_masks(pred.seg_prob, boxes.astype(np.float64), props, shape)
        with tempfile.TemporaryDirectory() as d:
            save_masks(m, Path(d) / "c_masks.npz", shape)
            size = (Path(d) / "c_masks.npz").stat().st_size
    else:
        size = 0
    Path(out).write_text(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                     "before_mib": base / 1024, "seconds": time.perf_counter() - t0,
                                     "file_kib": size / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 256])
    p.add_argument("--boxes", type=int, default=100)
    p.add_argument("--child", default=None)
    p.add_argument("--masks", action="store_true")
    a = p.parse_args()
    if a.child:
        return child(a.shape, a.boxes, a.masks, a.child)
    rows = {}
    for masks in (False, True):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--child", f.name, "--shape", *map(str, a.shape), "--boxes", str(a.boxes)]
            subprocess.run(cmd + (["--masks"] if masks else []), check=True)
            rows[masks] = json.loads(Path(f.name).read_text())
    image_mib = 4 * a.shape[0] * a.shape[1] * a.shape[2] / 2**20
    print(f"case {a.shape} float32 ({image_mib:.0f} MiB), {a.boxes} findings, one member (TTA 1)\n")
    print("| variant | peak RSS MiB | above boxes only | time s | mask file KiB |\n|---|---|---|---|---|")
    for masks, r in rows.items():
        print(f"| {'boxes + masks' if masks else 'boxes only'} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] - rows[False]['peak_mib']:+.0f} | {r['seconds']:.1f} | {r['file_kib']:.0f} |")


if __name__ == "__main__":
    main()
