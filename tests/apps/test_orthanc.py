"""The DICOM node against a real PACS: Debian's Orthanc 1.10, plain and over TLS.

Orthanc and the node run in a network namespace the test makes (``unshare --net``, loopback only; see
``orthanc_scenario.py``). Needs Orthanc and permission to create a namespace (root on CI): without Orthanc
the test skips on a developer machine and fails on CI; without namespaces it skips with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("monai.deploy")

from tests.apps import node_tools as nt  # noqa: E402
from tests.apps.tools import require  # noqa: E402

SCENARIO = nt.ROOT / "tests" / "apps" / "orthanc_scenario.py"


def _namespace_skip_reason() -> str | None:
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        return "unshare or ip (util-linux, iproute2) not on PATH"
    p = subprocess.run([unshare, "--net", "ip", "link", "set", "lo", "up"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return f"cannot create a network namespace here ({p.stderr.strip() or p.returncode}); Orthanc listens on " \
               "every interface, so it only runs inside one"
    return None


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    require("Orthanc")
    reason = _namespace_skip_reason()
    if reason:
        pytest.skip(reason)
    return nt.build_bundle(tmp_path_factory.mktemp("orthanc_bundle"))


def _scenario(bundle, work, tls: bool) -> dict:
    cmd = ["unshare", "--net", sys.executable, str(SCENARIO), "--bundle", str(bundle), "--work", str(work)]
    if tls:
        cmd.append("--tls")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=nt.ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_orthanc_round_trip(bundle, tmp_path, tls):
    out = _scenario(bundle, tmp_path / "work", tls)
    logs = f"\nnode:\n{out['node_log_tail']}\northanc:\n{out['orthanc_log_tail']}"
    assert out["orthanc"].startswith("1."), logs
    assert out.get("error") is None, out.get("error", "") + logs
    assert out["store"] == {"InstancesCount": out["uploaded"], "FailedInstancesCount": 0}, logs
    assert out["orthanc_series_modalities"] == ["CT", "SEG", "SR"]
    found = {f["modality"] for f in out["cfind"]}
    assert {"CT", "SR", "SEG"} <= found, out["cfind"]
    assert out["intruder"] == {"rejected": True, "result": [1, 1, 3]}
    assert out["audit"].count("series_answered") == 1 and out["audit"].count("results_sent") == 1
    if tls:
        assert out["no_client_cert"]["established"] is False
