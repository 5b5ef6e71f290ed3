"""zeroconf between two namespaces on a bridge (tests/lab.py, LAB.md "mDNS"): a gateway in
one advertises `_dicom._tcp` (instance = AE title, TXT AET and AETitle), `_http._tcp` and
`_dicomesh._tcp`; a workstation-like browser in the other finds them, and the firmware's own
Discovery there lists the gateway as a mesh candidate. And a gateway managing a real uplink
(a veth in the lab) shows its state and counters on the dashboard and in /metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest
from gateway import REPO, Gateway
from lab import Lab

pytestmark = pytest.mark.lab


def test_dicom_http_and_mesh_services_found_across_namespaces(
    gateway_factory: Callable[..., Gateway],
) -> None:
    with Lab(k=1, up_bps=None, down_bps=None) as lab:
        site, other = lab.sources[0], lab.downloader
        gw = gateway_factory(
            start=False, ae_title="ZC_NODE",
            dicom={"listen": site.addr},
            mesh={"name": "clinic-zc"},
            web={"listen": [site.addr], "zeroconf": True},
        )  # fmt: skip
        gw.start(netns=site.ns)
        probe = lab.popen(
            other,
            [sys.executable, str(REPO / "tests" / "zeroconf_probe.py"), other.addr, "15"],
            stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"},
        )  # fmt: skip
        out, _ = probe.communicate(timeout=40)
        assert probe.returncode == 0
        seen = json.loads(out)
        [dicom] = seen["dicom"]
        assert dicom["name"] == "ZC_NODE._dicom._tcp.local."  # PS3.15 H.2: instance = AE
        assert dicom["txt"]["AETitle"] == "ZC_NODE" and dicom["port"] == gw.port
        # PS3.15 Annex H.2 TXT keys, next to the OsiriX/Horos ones.
        assert dicom["txt"]["AET"] == "ZC_NODE" and dicom["txt"]["PrimaryDeviceType"] == "ARCHIVE"
        assert dicom["txt"]["txtvers"] == "1" and dicom["txt"]["CGET"] == "YES"
        assert dicom["addresses"] == [site.addr]
        [page] = seen["http"]
        assert page["port"] == gw.web_port and page["txt"]["path"] == "/"
        [candidate] = seen["candidates"]
        assert candidate["name"] == "clinic-zc"
        assert candidate["overlay_address"] == "127.0.0.1"
        assert candidate["lan_addresses"] == [site.addr]
        gw.stop()


# Run inside the gateway's namespace: /metrics (open to the lab subnet), then the dashboard's
# status twice, logged in with the setup code. Prints one JSON object.
_UPLINK_CLIENT = """
import json, sys, time
from prometheus_client.parser import text_string_to_metric_families
from webkit import WebClient
base, code_file = sys.argv[1], sys.argv[2]
client = WebClient(base)
deadline = time.monotonic() + 15
while True:
    text = client.get("/metrics").body.decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    if samples.get(("dicomesh_uplink_state", (("state", "up"), ("uplink", "adsl1")))) == 1:
        break
    if time.monotonic() > deadline:
        break
    time.sleep(0.3)
client.setup(open(code_file).read().strip())
client.get("/api/status")
time.sleep(1.0)
status = client.get("/api/status").json()
print(json.dumps({"metrics": [[k[0], dict(k[1]), v] for k, v in samples.items()
                              if k[0].startswith("dicomesh_uplink")],
                  "uplinks": status["uplinks"]}))
"""


def test_uplink_state_and_counters_on_dashboard_and_metrics(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """A gateway managing one real uplink (a veth to the lab's hub, next hop = the other
    namespace): its health, probe RTT and interface counters in /metrics and the status."""
    with Lab(k=1, up_bps=None, down_bps=None) as lab:
        site, hop = lab.sources[0], lab.downloader
        gw = gateway_factory(
            start=False, dicom={"listen": site.addr},
            web={"listen": [site.addr], "metrics_allow": ["10.77.0.0/24"]},
            net={
                "uplinks": [{"name": "adsl1", "interface": site.iface, "gateway": hop.addr,
                             "up_kbps": 8000, "down_kbps": 30000}],
                "health": {"interval_s": 0.3, "timeout_s": 0.25, "up_after": 1},
            },
        )  # fmt: skip
        gw.start(netns=site.ns)
        client = lab.popen(
            site,
            [sys.executable, "-c", _UPLINK_CLIENT, f"http://{site.addr}:{gw.web_port}",
             str(gw.state_dir / "setup-code")],
            stdout=subprocess.PIPE, text=True,
            env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "PATH": "/usr/bin"},
        )  # fmt: skip
        out, _ = client.communicate(timeout=60)
        assert client.returncode == 0
        seen = json.loads(out)
        metrics = {(name, tuple(sorted(labels.items()))): value
                   for name, labels, value in seen["metrics"]}  # fmt: skip
        one = (("uplink", "adsl1"),)
        assert metrics[("dicomesh_uplink_state", (("state", "up"), *one))] == 1
        assert metrics[("dicomesh_uplink_up", one)] == 1
        assert 0 < metrics[("dicomesh_uplink_rtt_seconds", one)] < 0.25
        assert metrics[("dicomesh_uplink_received_bytes_total", one)] > 0
        assert metrics[("dicomesh_uplink_sent_bytes_total", one)] > 0
        [uplink] = seen["uplinks"]["uplinks"]
        assert uplink["name"] == "adsl1" and uplink["state"] == "up"
        assert uplink["rx_bytes"] > 0 and uplink["tx_bytes"] > 0
        # Probes every 0.3 s flow both ways: the rates over the last second are not zero.
        assert uplink["down_bps"] > 0 and uplink["up_bps"] > 0
        gw.stop()
