"""Network lab for the net subsystem: a clinic with several uplinks and remote sites, all
behind one "internet" router namespace (tests/lab.py's helpers and naming, a routed
topology instead of one flat segment).

    clinic <p>-c                  inet <p>-inet (forwards)             site j <p>-sj
    <p>ui 10.78.i.2 ==veth== <p>ii-[bridge <p>bi 10.78.i.1]
                                   [bridge <p>cj 10.79.j.1]-<p>tj ==veth== <p>sj 10.79.j.2

Each clinic uplink i ends in its own bridge in the inet namespace (the ISP's router port),
so `cut(i)` can disable that bridge port: every frame of the line is then dropped silently
(no RST, no ICMP, carrier stays up), as in lab.py. Neighbours are static (`nud permanent`)
so ARP never fails during a cut. The clinic's main table has a default route via uplink 1
only, like a box whose DHCP client won on one line: unbound sockets use that line.

Shaping (optional, bit/s): `down_bps` on each clinic uplink's ISP side (its download).
Upload shaping is the gateway's own job (appliance.net shapers) and is not set here.
Teardown stops processes started through `popen`, deletes the namespaces and removes
WireGuard UAPI sockets named with the lab's prefix.
"""

from __future__ import annotations

import atexit
import json
import secrets
import subprocess
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lab import FAMILY, LabError, _cmd, delete_namespaces, shape_egress, stop_processes

UAPI_DIR = Path("/var/run/wireguard")
BR_STATE_DISABLED, BR_STATE_FORWARDING = 0, 3


_open_labs: weakref.WeakSet[UplinkLab] = weakref.WeakSet()


@atexit.register
def _close_forgotten_labs() -> None:
    for lab in list(_open_labs):
        lab.close()


@dataclass(frozen=True)
class Line:
    """One point-to-point line between a namespace and the inet router."""

    ns: str
    iface: str  # inside ns
    addr: str  # address of iface
    gateway: str  # the router's address on this line
    port: str  # veth end in the inet namespace (a bridge port)
    bridge: str  # bridge in the inet namespace holding `gateway`


@dataclass(eq=False)
class UplinkLab:
    """A clinic with `uplinks` lines and `sites` single-line sites. Use as a context manager."""

    uplinks: int = 3
    sites: int = 1
    down_bps: int | None = None
    latency_ms: int = 200
    prefix: str = field(default_factory=lambda: FAMILY + secrets.token_hex(3))
    clinic: str = field(init=False)
    inet: str = field(init=False)
    lines: list[Line] = field(init=False)  # the clinic's uplinks, index 0 = uplink 1
    site_lines: list[Line] = field(init=False)
    _namespaces: list[str] = field(init=False, default_factory=list)
    _procs: list[subprocess.Popen] = field(init=False, default_factory=list)
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        p = self.prefix
        self.clinic, self.inet = f"{p}-c", f"{p}-inet"
        self.lines = [
            Line(self.clinic, f"{p}u{i}", f"10.78.{i}.2", f"10.78.{i}.1", f"{p}i{i}", f"{p}b{i}")
            for i in range(1, self.uplinks + 1)
        ]
        self.site_lines = [
            Line(f"{p}-s{j}", f"{p}s{j}", f"10.79.{j}.2", f"10.79.{j}.1", f"{p}t{j}", f"{p}c{j}")
            for j in range(1, self.sites + 1)
        ]

    @property
    def wg_prefix(self) -> str:
        """A tunnel interface prefix unique to this run (wireguard-go sockets are global)."""
        return f"{self.prefix}w"

    def __enter__(self) -> UplinkLab:
        _open_labs.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ns(self, name: str) -> None:
        _cmd(f"ip netns add {name}")
        self._namespaces.append(name)
        _cmd(f"ip -n {name} link set lo up")

    def _build(self) -> None:
        self._ns(self.inet)
        _cmd(f"ip netns exec {self.inet} sysctl -qw net.ipv4.ip_forward=1")
        self._ns(self.clinic)
        for line in self.site_lines:
            self._ns(line.ns)
        for n, line in enumerate([*self.lines, *self.site_lines]):
            inner_mac, router_mac = f"02:00:00:00:{n:02x}:02", f"02:00:00:00:{n:02x}:01"
            _cmd(
                f"ip -n {self.inet} link add {line.port} type veth"
                f" peer name {line.iface} address {inner_mac} netns {line.ns}"
            )
            _cmd(
                f"ip -n {self.inet} link add {line.bridge} address {router_mac}"
                " type bridge mcast_snooping 0"
            )
            _cmd(f"ip -n {self.inet} link set {line.port} master {line.bridge} up")
            _cmd(f"ip -n {self.inet} addr add {line.gateway}/24 dev {line.bridge}")
            _cmd(f"ip -n {self.inet} link set {line.bridge} up")
            _cmd(f"ip -n {line.ns} addr add {line.addr}/24 dev {line.iface}")
            _cmd(f"ip -n {line.ns} link set {line.iface} up")
            _cmd(
                f"ip -n {line.ns} neigh replace {line.gateway} lladdr {router_mac}"
                f" dev {line.iface} nud permanent"
            )
            _cmd(
                f"ip -n {self.inet} neigh replace {line.addr} lladdr {inner_mac}"
                f" dev {line.bridge} nud permanent"
            )
        for line in self.site_lines:
            _cmd(f"ip -n {line.ns} route add default via {line.gateway}")
        _cmd(f"ip -n {self.clinic} route add default via {self.lines[0].gateway}")
        if self.down_bps is not None:
            for line in self.lines:
                shape_egress(self.inet, line.port, self.down_bps, self.latency_ms)

    def close(self) -> None:
        """Stop our processes, delete our namespaces and UAPI sockets; idempotent."""
        if self._closed:
            return
        self._closed = True
        _open_labs.discard(self)
        stop_processes(self._procs)
        errors = delete_namespaces(self._namespaces)
        self._namespaces.clear()
        for sock in uapi_sockets(self.prefix):
            sock.unlink(missing_ok=True)
        if errors:
            raise LabError("teardown: " + "; ".join(errors))

    def popen(self, ns: str, args: Sequence[str], **kw) -> subprocess.Popen:
        """Start `args` inside namespace `ns`, in its own session; stopped at teardown."""
        kw["start_new_session"] = True
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], **kw)
        self._procs.append(proc)
        return proc

    # -- faults and observation ------------------------------------------------------

    def cut(self, uplink: int) -> None:
        """Silently drop everything on clinic uplink `uplink` (1-based)."""
        self._port_state(self.lines[uplink - 1], BR_STATE_DISABLED, "disabled")

    def restore(self, uplink: int) -> None:
        self._port_state(self.lines[uplink - 1], BR_STATE_FORWARDING, "forwarding")

    def _port_state(self, line: Line, state: int, name: str) -> None:
        _cmd(f"bridge -n {self.inet} link set dev {line.port} state {state}")
        shown = json.loads(_cmd(f"bridge -n {self.inet} -j link show dev {line.port}"))
        if not shown or shown[0].get("state") != name:
            raise LabError(f"bridge port {line.port}: state {shown} after setting {name}")

    def ip_json(self, ns: str, *args: str) -> list[dict]:
        """`ip -json ARGS` in namespace `ns`, parsed (checks from outside our code)."""
        out = _cmd(["ip", "-n", ns, "-json", *args])
        return json.loads(out) if out.strip() else []

    def tc_json(self, ns: str, *args: str) -> list[dict]:
        out = _cmd(["tc", "-n", ns, "-json", *args])
        return json.loads(out) if out.strip() else []

    def tx_bytes(self, ns: str, iface: str) -> int:
        return self.ip_json(ns, "-s", "link", "show", "dev", iface)[0]["stats64"]["tx"]["bytes"]


def uapi_sockets(prefix: str) -> list[Path]:
    """WireGuard UAPI sockets whose interface name starts with `prefix`."""
    if not UAPI_DIR.is_dir():
        return []
    return sorted(p for p in UAPI_DIR.iterdir() if p.name.startswith(prefix))


def uapi_peer_endpoints(ifname: str, timeout: float = 5.0) -> dict[str, str | None]:
    """A wireguard-go device's peers as the remote sees them, read over its UAPI socket like
    `wg show <ifname> endpoints` would: public key (hex) -> current endpoint (after roaming)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(UAPI_DIR / f"{ifname}.sock"))
        sock.sendall(b"get=1\n\n")
        reply = b""
        while not reply.endswith(b"\n\n"):
            data = sock.recv(1 << 16)
            if not data:
                break
            reply += data
    peers: dict[str, str | None] = {}
    key = None
    for line in reply.decode().splitlines():
        name, _, value = line.partition("=")
        if name == "public_key":
            key = value
            peers[key] = None
        elif name == "endpoint" and key is not None:
            peers[key] = value
    return peers


def wait_until(predicate, timeout: float, every: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout` s passed; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
