"""zeroconf between two namespaces on a bridge (tests/lab.py, LAB.md "mDNS"): a gateway in
one advertises `_dicom._tcp` (instance = AE title, TXT AET and AETitle), `_http._tcp` and
`_dicomesh._tcp`; a workstation-like browser in the other finds them, and the firmware's own
Discovery there lists the gateway as a mesh candidate; the gateway's page offers a gateway
announcing itself there for admission; a new AE title set on the page is re-announced.
And a gateway managing a real uplink (a veth in the lab) shows its state and counters on
the dashboard and in /metrics, and keeps the page off that uplink's address."""

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
        # Another gateway on the LAN is offered for admission by the page; then a new AE
        # title set on the page: the DICOM advert follows it, no restart.
        rename = lab.popen(
            other,
            [sys.executable, "-c", _RENAME_CLIENT, f"http://{site.addr}:{gw.web_port}",
             str(gw.state_dir / "setup-code"), "ZC_RENAMED", other.addr],
            stdout=subprocess.PIPE, text=True,
            env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "PATH": "/usr/bin"},
        )  # fmt: skip
        renamed = json.loads(rename.communicate(timeout=40)[0])
        [offered] = renamed["candidates"]
        assert (offered["role"], offered["overlay_address"], offered["mesh_port"]) == (
            "replica", "10.90.7.1", 7480)  # fmt: skip
        assert offered["public_keys"] == ["A" * 43 + "="]
        assert offered["lan_addresses"] == [other.addr]
        assert renamed["status"] == 200
        probe = lab.popen(
            other,
            [sys.executable, str(REPO / "tests" / "zeroconf_probe.py"), other.addr, "15"],
            stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"},
        )  # fmt: skip
        out, _ = probe.communicate(timeout=40)
        assert probe.returncode == 0
        [dicom] = json.loads(out)["dicom"]
        assert dicom["name"] == "ZC_RENAMED._dicom._tcp.local."
        assert dicom["txt"]["AET"] == dicom["txt"]["AETitle"] == "ZC_RENAMED"
        gw.stop()


# Run in another namespace, as a second gateway "site-new" announcing itself: log in to the
# page, wait until it offers site-new for admission (GET /api/peers candidates), then set a
# new AE title. Prints the candidate found and the PUT's status.
_RENAME_CLIENT = """
import asyncio, json, sys, time
from webkit import WebClient
from appliance.web.discovery import Advert, Discovery
base, code_file, ae_title, address = sys.argv[1:5]

async def main():
    new = Discovery(Advert("NEW_AE", 104, 8080, "site-new", "replica", "10.90.7.1", 7480,
                           ("A" * 43 + "=",)), [address])
    await new.start()
    client = WebClient(base)
    await asyncio.to_thread(client.setup, open(code_file).read().strip())
    found, deadline = [], time.monotonic() + 15
    while not found and time.monotonic() < deadline:
        peers = (await asyncio.to_thread(client.get, "/api/peers")).json()
        found = [c for c in peers["candidates"] if c["name"] == "site-new"]
        await asyncio.sleep(0.3)
    await new.stop()
    settings = (await asyncio.to_thread(client.get, "/api/settings/dicom")).json()["settings"]
    put = await asyncio.to_thread(client.request, "PUT", "/api/settings/dicom",
                                  {**settings, "ae_title": ae_title})
    print(json.dumps({"candidates": found, "status": put.status}))

asyncio.run(main())
"""


# Run inside the gateway's namespace: /metrics (open to loopback by default), then the dashboard's
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
    namespace): its health, probe RTT and interface counters in /metrics and the status;
    the page is not served on the uplink's address even when web.listen names it."""
    with Lab(k=1, up_bps=None, down_bps=None) as lab:
        site, hop = lab.sources[0], lab.downloader
        gw = gateway_factory(
            start=False, dicom={"listen": site.addr},
            # The uplink's own address is refused for the page; loopback serves it.
            web={"listen": ["127.0.0.1", site.addr]},
            net={
                "uplinks": [{"name": "adsl1", "interface": site.iface, "gateway": hop.addr,
                             "up_kbps": 8000, "down_kbps": 30000}],
                "health": {"interval_s": 0.3, "timeout_s": 0.25, "up_after": 1},
            },
        )  # fmt: skip
        gw.start(netns=site.ns)
        client = lab.popen(
            site,
            [sys.executable, "-c", _UPLINK_CLIENT, f"http://127.0.0.1:{gw.web_port}",
             str(gw.state_dir / "setup-code")],
            stdout=subprocess.PIPE, text=True,
            env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "PATH": "/usr/bin"},
        )  # fmt: skip
        out, _ = client.communicate(timeout=60)
        assert client.returncode == 0
        log = gw.log()
        assert f"admin page not on {site.addr}: that is an uplink's address" in log
        assert f"admin page on http://127.0.0.1:{gw.web_port}/\n" in log
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
