"""The DICOM node under load, against a real Orthanc: N studies sent back to back, all answered once?

Usage (from the repo root, as root: it makes a network namespace, like the Orthanc test):

    ulimit -s 32768; python benchmarks/dicom_node.py              # 20 studies
    python benchmarks/dicom_node.py --studies 5                   # quick look

The script re-runs itself inside ``unshare --net`` (Orthanc 1.10 listens on every interface), builds the toy
cpu-preset consolidated bundle (1 fold, random weights, no TTA), starts Orthanc and the node (series complete
at association release), then:

1. one study alone: its peak node RSS is the reference;
2. ``--studies`` toy CT studies (24 x 20 x 12 voxels each) uploaded to Orthanc, then pushed to the node one
   ``/modalities/nndet/store`` call after the other, without waiting for results.

Reported: studies answered / lost / answered twice (SR series per study in Orthanc), peak node RSS vs the
single-study peak (``VmRSS`` of the node process, sampled every 0.1 s), and per series the time from the
release of the association that brought its last instance to the SR + SEG stored in Orthanc (the node's
audit log: ``association_released`` -> ``results_sent``, which is logged after Orthanc's C-STORE success),
median and max, with the share of it spent outside the networks' forward passes (``forward_seconds`` of
``series_answered``, measured by forward hooks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
INSIDE = "NNDET_BENCH_IN_NETNS"


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RSSSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_event = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            self.peak = max(self.peak, rss_mib(self.pid))

    def reset(self) -> float:
        p, self.peak = self.peak, rss_mib(self.pid)
        return p


def _t(record: dict) -> float:
    return datetime.fromisoformat(record["time"]).timestamp()


def run(studies: int, work: Path) -> None:
    from tests.apps import node_tools as nt
    from tests.apps.orthanc_scenario import rest, start_orthanc, stop_orthanc

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    t = time.perf_counter()
    bundle = nt.build_bundle(work / "bundle")
    print(f"toy cpu-preset bundle built in {time.perf_counter() - t:.0f} s (not timed)", flush=True)
    http_port, dicom_port, node_port = nt.free_port(), nt.free_port(), nt.free_port()
    orthanc, log = start_orthanc(work, http_port, dicom_port, node_port, None)
    node = None
    try:
        cfg = nt.node_config(work / "node.yaml", port=node_port, model=bundle, spool=work / "spool",
                             peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}],
                             series={"idle_seconds": 5.0, "complete_on_release": True},
                             queue={"max_series": studies + 5})
        node = nt.NodeProcess(cfg, work / "node.log", node_port).start()
        sampler = RSSSampler(node.proc.pid)
        sampler.start()

        def upload(seed: int) -> tuple[str, str]:
            s = nt.write_toy_study(work / f"study{seed}", seed=seed)
            ids = [rest(http_port, "/instances", f.read_bytes(), "POST") for f in s["files"]]
            return ids[0]["ParentStudy"], s["study"]

        def srs(orthanc_study: str) -> int:
            series = rest(http_port, f"/studies/{orthanc_study}/series")
            return sum(x["MainDicomTags"].get("Modality") == "SR" for x in series)

        def push(orthanc_study: str) -> None:
            rest(http_port, "/modalities/nndet/store",
                 json.dumps({"Resources": [orthanc_study], "Synchronous": True}).encode(), "POST")

        first, _ = upload(1000)
        sampler.reset()
        push(first)
        nt.wait_for(lambda: srs(first) >= 1, 300, "the first study's SR")
        time.sleep(1.0)
        single_peak = sampler.reset()
        ids = [upload(seed) for seed in range(studies)]
        t0 = time.perf_counter()
        for orthanc_study, _ in ids:
            push(orthanc_study)
        pushed_s = time.perf_counter() - t0
        nt.wait_for(lambda: all(srs(o) >= 1 for o, _ in ids), 60 + 60 * studies, f"SRs of {studies} studies",
                    interval=1.0)
        wall = time.perf_counter() - t0
        time.sleep(5.0)  # a duplicate answer, if any, would arrive now
        peak = sampler.reset()
        counts = [srs(o) for o, _ in ids]
    finally:
        if node is not None:
            node.stop()
        stop_orthanc(orthanc, log)
    audit = nt.audit(work / "spool")
    released = {}
    for r in audit:
        if r["event"] == "association_released":
            for s in r.get("series", []):
                released[s] = _t(r)
    answered = {r["series"]: r for r in audit if r["event"] == "series_answered"}
    sent = {r["series"]: _t(r) for r in audit if r["event"] == "results_sent"}
    wanted = {study for _, study in ids}
    lat, outside = [], []
    for series, rec in answered.items():
        if rec["study"] not in wanted or series not in sent or series not in released:
            continue
        total = sent[series] - released[series]
        lat.append(total)
        outside.append(1 - rec.get("forward_seconds", 0.0) / total if total > 0 else 0.0)
    print()
    print(f"DICOM node, {studies} toy CT studies back to back through Orthanc {date.today()} "
          f"({platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    print("| measure | value |")
    print("|---|---|")
    print(f"| studies answered (one SR each) | {sum(c == 1 for c in counts)} / {studies} |")
    print(f"| lost (no SR) / answered twice | {sum(c == 0 for c in counts)} / {sum(c > 1 for c in counts)} |")
    print(f"| pushes (Orthanc store calls) took | {pushed_s:.1f} s |")
    print(f"| all {studies} answered after | {wall:.1f} s |")
    print(f"| node peak RSS, 1 study / {studies} studies | {single_peak:.0f} MiB / {peak:.0f} MiB "
          f"({peak / single_peak:.2f}x) |")
    if lat:
        print(f"| last instance -> SR stored, median / max | {statistics.median(lat):.2f} s / {max(lat):.2f} s |")
        print(f"| share outside the forward pass, median | {100 * statistics.median(outside):.0f} % |")
        print(f"| forward pass per series, median | {statistics.median(answered[s]['forward_seconds'] for s in answered if answered[s]['study'] in wanted):.2f} s |")
    print(f"(latencies over {len(lat)} series; queueing behind earlier studies is part of them)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", type=int, default=20)
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args(argv)
    if os.environ.get(INSIDE) != "1":
        env = {**os.environ, INSIDE: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        return subprocess.call(["unshare", "--net", sys.executable, __file__, *(argv or sys.argv[1:])], env=env)
    work = a.work or Path(tempfile.mkdtemp(prefix="nndet_node_bench_"))
    run(a.studies, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
