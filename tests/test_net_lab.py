"""The network subsystem on real namespaces: policy routing, shaping, health, bound sockets
and wireguard-go tunnels brought up by the gateway's own code (needs root).

Rates follow LAB.md scaled by 10: an ADSL upload of 800 kbit/s is shaped here at 8 Mbit/s.
Routing is checked from outside with `ip -json` / `tc -json`, not with our code.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asynckit import run
from lab import TCP_GOODPUT, Lines, leftovers, probe_cmd
from netlab import UplinkLab, uapi_peer_endpoints, uapi_sockets

from appliance.mesh.peers import Peer
from appliance.net import keys
from appliance.net.binding import UplinkBinding, open_socket, tcp_connector
from appliance.net.config import NetConfig
from appliance.net.health import Health
from appliance.net.manager import NetworkManager, UplinkChange
from appliance.net.netns import socket_in
from appliance.schema import load

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

SHAPED_KBPS = 8000  # ADSL upload x10 (LAB.md)
OUR_PRIORITIES = range(1000, 1300)
OUR_TABLES = {str(t) for t in range(2100, 2116)}
# The lab forks namespace helpers and shapes traffic on a 2-core machine shared with other
# suites: a loop step can lose the CPU for a while without blocking anything itself.
LAB_BLOCK_S = 0.3


def net_config(lab: UplinkLab, **sections: Any) -> NetConfig:
    """Uplinks on the lab's clinic lines; `sections` override [net] keys."""
    shape = sections.pop("shape", False)
    data: dict[str, Any] = {
        "uplinks": [
            {
                "name": f"adsl{i}",
                "interface": line.iface,
                "gateway": line.gateway,
                "up_kbps": SHAPED_KBPS,
                "down_kbps": 30_000,
                "shape": {"enabled": shape, "rate_kbps": SHAPED_KBPS},
            }
            for i, line in enumerate(lab.lines, start=1)
        ],
        "reconcile_interval_s": 60.0,  # tests call reconcile() themselves
    }
    data.update(sections)
    return load(NetConfig, data, "net")


def our_rules(lab: UplinkLab) -> list[dict]:
    return [
        r for r in lab.ip_json(lab.clinic, "rule", "show") if r.get("priority") in OUR_PRIORITIES
    ]


def our_routes(lab: UplinkLab) -> list[dict]:
    routes = lab.ip_json(lab.clinic, "route", "show", "table", "all")
    return [r for r in routes if r.get("table") in OUR_TABLES]


@pytest.fixture(scope="module")
def lab3() -> Iterator[UplinkLab]:
    """A clinic with 3 uplinks and one remote site."""
    with UplinkLab(uplinks=3, sites=1) as lab:
        yield lab
    assert leftovers(lab.prefix) == []


# ---------------------------------------------------------------------------- routing


def test_reconcile_sets_restores_and_removes_exactly_its_own(lab3: UplinkLab, tmp_path) -> None:
    lab, c = lab3, lab3.clinic
    # An operator's own policy routing, which the gateway must leave alone.
    subprocess.run(["ip", "-n", c, "rule", "add", "pref", "500", "lookup", "100"], check=True)
    subprocess.run(
        ["ip", "-n", c, "route", "add", "unreachable", "default", "table", "100"], check=True
    )

    async def body() -> None:
        mgr = NetworkManager(net_config(lab), tmp_path, peers=list, netns=c)
        await mgr.start()
        try:
            rules = await asyncio.to_thread(our_rules, lab)
            got = {(r["priority"], r.get("src"), r.get("fwmark"), r["table"]) for r in rules}
            assert got == {
                (1000, "all", "0x4d10", "2100"),
                (1001, "all", "0x4d11", "2101"),
                (1002, "all", "0x4d12", "2102"),
                (1100, "10.78.1.2", None, "2100"),
                (1101, "10.78.2.2", None, "2101"),
                (1102, "10.78.3.2", None, "2102"),
            }
            routes = await asyncio.to_thread(our_routes, lab)
            got_routes = {
                (r["table"], r["dst"], r["gateway"], r["dev"], r["prefsrc"]) for r in routes
            }
            assert got_routes == {
                ("2100", "default", "10.78.1.1", lab.lines[0].iface, "10.78.1.2"),
                ("2101", "default", "10.78.2.1", lab.lines[1].iface, "10.78.2.2"),
                ("2102", "default", "10.78.3.1", lab.lines[2].iface, "10.78.3.2"),
            }
            assert await mgr.reconcile() == 0, "a second run changed something"

            for cmd in (
                ["rule", "del", "pref", "1101"],
                ["route", "del", "default", "table", "2102"],
            ):
                subprocess.run(["ip", "-n", c, *cmd], check=True)
            assert len(await asyncio.to_thread(our_rules, lab)) == 5
            assert await mgr.reconcile() == 2
            assert len(await asyncio.to_thread(our_rules, lab)) == 6
            assert len(await asyncio.to_thread(our_routes, lab)) == 3
            assert await mgr.reconcile() == 0
        finally:
            await mgr.stop()

    run(body(), max_block_s=LAB_BLOCK_S)
    assert our_rules(lab) == [] and our_routes(lab) == []
    assert any(r.get("priority") == 500 for r in lab.ip_json(c, "rule", "show"))
    assert lab.ip_json(c, "route", "show", "table", "100") != []
    assert lab.ip_json(c, "route", "show", "default") != []  # main table untouched
    subprocess.run(["ip", "-n", c, "rule", "del", "pref", "500"], check=True)
    subprocess.run(["ip", "-n", c, "route", "flush", "table", "100"], check=True)


# ---------------------------------------------------------------------------- throughput


def _send_for(sock: socket.socket, dest: tuple[str, int], seconds: float) -> None:
    data = os.urandom(1 << 16)
    with sock:
        sock.settimeout(10)
        sock.connect(dest)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sock.sendall(data)


def goodput(lab: UplinkLab, sockets: list[socket.socket], port: int) -> dict[str, float]:
    """Bit/s received at the site per source address, TCP payload, over a steady window."""
    site = lab.site_lines[0]
    warmup, seconds = 1.5, 3.0
    sink = lab.popen(
        site.ns,
        probe_cmd("sink", site.addr, str(port), "--seconds", str(warmup + seconds + 8)),
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = Lines(sink)
    lines.wait_for("READY", 10)
    senders = [
        threading.Thread(target=_send_for, args=(s, (site.addr, port), warmup + seconds + 2))
        for s in sockets
    ]
    for t in senders:
        t.start()
    start = end = None
    try:
        while end is None:
            report = lines.json(timeout=5)
            assert report is not None and not report["errors"], report
            if start is None and len(report["peers"]) >= 1:
                start = {"t": report["t"] + warmup}
            elif start is not None and "peers" not in start and report["t"] >= start["t"]:
                start = report
            elif start is not None and "peers" in start and report["t"] >= start["t"] + seconds:
                end = report
    finally:
        for t in senders:
            t.join(timeout=15)
        sink.terminate()
        sink.wait(timeout=5)
    dt = end["t"] - start["t"]
    return {
        addr: (end["peers"][addr] - start["peers"].get(addr, 0)) * 8 / dt for addr in end["peers"]
    }


@pytest.mark.slow  # ~20 s: four timed shaped-rate phases
def test_bound_sockets_each_get_their_own_shaped_uplink(lab3: UplinkLab, tmp_path) -> None:
    lab = lab3
    cfg = net_config(lab, shape=True)

    async def body() -> tuple[dict[str, float], ...]:
        mgr = NetworkManager(cfg, tmp_path, peers=list, netns=lab.clinic)
        await mgr.start()
        try:
            dev = lab.lines[0].iface
            qdiscs = await asyncio.to_thread(lab.tc_json, lab.clinic, "qdisc", "show", "dev", dev)
            assert [(q["kind"], q["handle"], q["options"]["rate"]) for q in qdiscs] == [
                ("tbf", "d1c0:", 1_000_000)  # bytes/s: 8 Mbit/s
            ]
            assert await mgr.reconcile() == 0
            bindings = mgr.bindings()
            assert [b.source for b in bindings] == ["10.78.1.2", "10.78.2.2", "10.78.3.2"]

            def measure() -> tuple[dict[str, float], ...]:
                unbound = [socket_in(lab.clinic, socket.AF_INET, socket.SOCK_STREAM) for _ in "abc"]
                return (
                    goodput(lab, [open_socket(bindings[0])], 5301),
                    goodput(lab, [open_socket(b) for b in bindings], 5302),
                    goodput(lab, unbound, 5303),
                )

            return await asyncio.to_thread(measure)
        finally:
            await mgr.stop()

    one, three, unbound = run(body(), max_block_s=LAB_BLOCK_S)
    nominal = TCP_GOODPUT * SHAPED_KBPS * 1000
    single = sum(one.values())
    print(
        f"\nbound 1: {single / 1e6:.2f} Mbit/s; bound 3: {sum(three.values()) / 1e6:.2f} Mbit/s "
        f"({sum(three.values()) / single:.2f}x); unbound 3: {sum(unbound.values()) / 1e6:.2f}"
    )
    assert abs(single / nominal - 1) < 0.05, one
    assert set(three) == {"10.78.1.2", "10.78.2.2", "10.78.3.2"}
    assert sum(three.values()) / single >= 2.85, three
    assert set(unbound) == {"10.78.1.2"}  # the main default route: one line only
    assert sum(unbound.values()) / single < 1.1
    qdiscs = lab.tc_json(lab.clinic, "qdisc", "show", "dev", lab.lines[0].iface)
    assert [q["kind"] for q in qdiscs] == ["noqueue"], "shaper left behind"


def test_aiohttp_connector_binds_every_connection(lab3: UplinkLab, tmp_path) -> None:
    import aiohttp

    lab, site = lab3, lab3.site_lines[0]
    server = lab.popen(
        site.ns,
        ["python3", "-u", "-m", "http.server", "--bind", site.addr, "8080"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    seen = Lines(subprocess.Popen(["cat"], stdin=server.stderr, stdout=subprocess.PIPE, text=True))

    async def body() -> list[int]:
        mgr = NetworkManager(net_config(lab), tmp_path, peers=list, netns=lab.clinic)
        await mgr.start()
        statuses = []
        try:
            for binding in mgr.bindings():
                async with aiohttp.ClientSession(connector=tcp_connector(binding)) as session:
                    for _ in range(20):  # the server may still be starting
                        try:
                            async with session.get(f"http://{site.addr}:8080/") as resp:
                                statuses.append(resp.status)
                                break
                        except aiohttp.ClientConnectorError:
                            await asyncio.sleep(0.1)
        finally:
            await mgr.stop()
        return statuses

    try:
        assert run(body(), max_block_s=LAB_BLOCK_S) == [200, 200, 200]
        clients = set()
        deadline = time.monotonic() + 5
        while len(clients) < 3 and time.monotonic() < deadline:
            line = seen.get(timeout=5)
            if line and '"GET /' in line:
                clients.add(line.split()[0])
    finally:
        server.terminate()
        server.wait(timeout=5)
    assert clients == {"10.78.1.2", "10.78.2.2", "10.78.3.2"}


# ---------------------------------------------------------------------------- health


def test_a_cut_uplink_goes_down_in_time_and_comes_back(lab3: UplinkLab, tmp_path) -> None:
    lab = lab3
    health = {"interval_s": 0.3, "timeout_s": 0.25, "down_after": 3, "up_after": 3}
    cfg = net_config(lab, health=health)
    events: list[tuple[float, UplinkChange]] = []

    async def wait_for(pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            await asyncio.sleep(0.02)
        return False

    async def body() -> tuple[float, float]:
        mgr = NetworkManager(cfg, tmp_path, peers=list, netns=lab.clinic)
        mgr.subscribe(lambda change: events.append((time.monotonic(), change)))
        await mgr.start()
        try:
            all_up = lambda: all(mgr.health(f"adsl{i}") is Health.UP for i in (1, 2, 3))  # noqa: E731
            assert await wait_for(all_up, 5), [mgr.health(f"adsl{i}") for i in (1, 2, 3)]
            cut_at = time.monotonic()
            await asyncio.to_thread(lab.cut, 2)
            try:
                assert await wait_for(lambda: mgr.health("adsl2") is Health.DOWN, 5)
                down_s = time.monotonic() - cut_at
                assert [b.uplink for b in mgr.bindings()] == ["adsl1", "adsl3"]
                assert mgr.health("adsl1") is Health.UP and mgr.health("adsl3") is Health.UP
            finally:
                await asyncio.to_thread(lab.restore, 2)
            restored_at = time.monotonic()
            assert await wait_for(lambda: mgr.health("adsl2") is Health.UP, 5)
            up_s = time.monotonic() - restored_at
            status = await mgr.status()
            assert [u["state"] for u in status["uplinks"]] == ["up", "up", "up"]
        finally:
            await mgr.stop()
        return down_s, up_s

    down_s, up_s = run(body(), max_block_s=LAB_BLOCK_S)
    print(f"\ncut detected after {down_s:.2f} s, restore after {up_s:.2f} s")
    # down_after x interval, plus the probe in flight at the cut (one interval + timeout).
    assert down_s <= 3 * 0.3 + 0.3 + 0.25 + 0.2
    assert up_s <= 3 * 0.3 + 0.3 + 0.2
    changes = [(c.uplink, c.old.value, c.new.value) for _, c in events if c.uplink == "adsl2"]
    assert ("adsl2", "up", "down") in changes or ("adsl2", "degraded", "down") in changes
    assert changes[-1][2] == "up"
    down_event = next(c for _, c in events if c.new is Health.DOWN)
    assert down_event.binding.source == "10.78.2.2" and not down_event.usable
    assert all(c.uplink == "adsl2" for _, c in events if c.old is not Health.UNKNOWN)


# ---------------------------------------------------------------------------- WireGuard


@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go")
def test_wireguard_tunnels_one_per_uplink_and_only_admitted_keys_get_in(tmp_path) -> None:
    with UplinkLab(uplinks=3, sites=2) as lab:
        _wireguard_scenario(lab, tmp_path)
        prefix = lab.prefix
    assert leftovers(prefix) == [] and uapi_sockets(prefix) == []


def _site_config(lab: UplinkLab, j: int, overlay: str, tag: str) -> NetConfig:
    line = lab.site_lines[j - 1]
    return load(
        NetConfig,
        {
            "uplinks": [
                {
                    "name": "dsl",
                    "interface": line.iface,
                    "gateway": line.gateway,
                    "up_kbps": 8000,
                    "down_kbps": 30000,
                    "overlay_address": overlay,
                }
            ],
            "wireguard": {"enabled": True, "interface_prefix": lab.wg_prefix + tag},
            "reconcile_interval_s": 60.0,
        },
        "net",
    )


def _wireguard_scenario(lab: UplinkLab, tmp_path: Path) -> None:
    overlay = ["10.90.1.1", "10.90.1.2", "10.90.1.3"]
    clinic_cfg = load(
        NetConfig,
        {
            "uplinks": [
                {
                    "name": f"adsl{i}",
                    "interface": line.iface,
                    "gateway": line.gateway,
                    "up_kbps": 8000,
                    "down_kbps": 30000,
                    "overlay_address": overlay[i - 1],
                }
                for i, line in enumerate(lab.lines, start=1)
            ],
            "wireguard": {"enabled": True, "interface_prefix": lab.wg_prefix + "c"},
            "reconcile_interval_s": 60.0,
        },
        "net",
    )
    dirs = {name: tmp_path / name for name in ("clinic", "site", "intruder")}
    for d in dirs.values():
        d.mkdir()
    clinic_keys = [keys.load_or_create(dirs["clinic"], f"adsl{i}").public_b64 for i in (1, 2, 3)]
    site_key = keys.load_or_create(dirs["site"], "dsl").public_b64
    site_peer = Peer("site", site_key, ["10.90.2.1"], endpoints=["10.79.1.2:51820"])
    clinic_peer = Peer(
        "clinic",
        clinic_keys[0],
        overlay,
        tunnel_keys=clinic_keys[1:],
        endpoints=[f"10.78.{i}.2:{51819 + i}" for i in (1, 2, 3)],
    )
    clinic = NetworkManager(clinic_cfg, dirs["clinic"], peers=lambda: [site_peer], netns=lab.clinic)
    site = NetworkManager(
        _site_config(lab, 1, "10.90.2.1", "s"),
        dirs["site"],
        peers=lambda: [clinic_peer],
        netns=lab.site_lines[0].ns,
    )
    # Knows the site's key and endpoint, but the site never admitted it.
    intruder = NetworkManager(
        _site_config(lab, 2, "10.90.3.1", "x"),
        dirs["intruder"],
        peers=lambda: [site_peer],
        netns=lab.site_lines[1].ns,
    )

    async def body() -> None:
        seen: list[str] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("peername")[0])
            total = 0
            while chunk := await reader.read(1 << 16):
                total += len(chunk)
            writer.write(str(total).encode())
            await writer.drain()
            writer.close()

        # The site first: the clinic's tunnels then get answers to their very first
        # handshakes, so one that left by the wrong line would be roamed to it (issue 4).
        managers = [site, clinic, intruder]
        started = []
        server = None
        try:
            for m in managers:
                await m.start()
                started.append(m)
            status = await clinic.status()
            assert status["wireguard"]["backend"] == "userspace"
            listener = await asyncio.to_thread(
                socket_in, lab.site_lines[0].ns, socket.AF_INET, socket.SOCK_STREAM
            )
            listener.bind(("10.90.2.1", 7480))
            listener.listen(8)
            listener.setblocking(False)
            server = await asyncio.start_server(handle, sock=listener)

            payload = os.urandom(1_000_000)
            for i, binding in enumerate(clinic.bindings()):
                assert binding.source == overlay[i]
                before = await asyncio.to_thread(lab.tx_bytes, lab.clinic, lab.lines[i].iface)
                answer = await _exchange(binding, ("10.90.2.1", 7480), payload, timeout=10)
                after = await asyncio.to_thread(lab.tx_bytes, lab.clinic, lab.lines[i].iface)
                assert answer == str(len(payload)).encode()
                assert after - before >= len(payload), f"tunnel {i} did not use uplink {i + 1}"
            assert seen == overlay  # identity: each tunnel's own overlay address
            # Downloads too: the site reaches each clinic tunnel at its own line (read from
            # the site's wireguard-go, after roaming), not where a first packet strayed.
            endpoints = await asyncio.to_thread(uapi_peer_endpoints, site.tunnel_name(0))
            assert [endpoints.get(base64.b64decode(k).hex()) for k in clinic_keys] == [
                f"10.78.{i}.2:{51819 + i}" for i in (1, 2, 3)
            ]

            # An unknown key: the site drops its handshakes, nothing gets through.
            stranger = intruder.bindings()[0]
            with pytest.raises((TimeoutError, OSError)):
                await _exchange(stranger, ("10.90.2.1", 7480), b"x", timeout=3)
            # An admitted key sending from an address it does not own (cryptokey routing).
            await asyncio.to_thread(
                subprocess.run,
                [
                    "ip",
                    "-n",
                    lab.clinic,
                    "addr",
                    "add",
                    "10.90.1.99/32",
                    "dev",
                    clinic.tunnel_name(0),
                ],
                check=True,
            )
            spoof = UplinkBinding("adsl1", "10.90.1.99", clinic.bindings()[0].fwmark, lab.clinic)
            with pytest.raises((TimeoutError, OSError)):
                await _exchange(spoof, ("10.90.2.1", 7480), b"x", timeout=3)
            assert seen == overlay

            status = await clinic.status()
            tunnels = [u["tunnel"] for u in status["uplinks"]]
            assert [t["peers_with_handshake"] for t in tunnels] == [1, 1, 1]
            assert [t["public_key"] for t in tunnels] == clinic_keys
            assert await clinic.reconcile() == 1  # the stray address removed, nothing else
            assert await clinic.reconcile() == 0
        finally:
            if server is not None:
                server.close()
                await server.wait_closed()
            for m in reversed(started):
                await m.stop()

    run(body(), max_block_s=LAB_BLOCK_S)
    assert uapi_sockets(lab.prefix) == []
    links = [link["ifname"] for link in lab.ip_json(lab.clinic, "link", "show")]
    assert not [name for name in links if name.startswith(lab.wg_prefix)], links
    assert [
        r for r in lab.ip_json(lab.clinic, "rule", "show") if r["priority"] in OUR_PRIORITIES
    ] == []


async def _exchange(
    binding: UplinkBinding, dest: tuple[str, int], payload: bytes, timeout: float
) -> bytes:
    """Send `payload` over a socket bound to `binding`, half-close, return the answer."""
    sock = await asyncio.to_thread(open_socket, binding)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, dest), timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        writer.write(payload)
        await asyncio.wait_for(writer.drain(), timeout)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
