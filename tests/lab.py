"""Throwaway network lab for tests and benches: one downloader and k sources on shaped lines.

Topology (all IPv4 on one /24, no default route)::

    [d] d-veth ==tbf down==< hub-port  \
                                        hub bridge (namespace <prefix>-hub, no address)
    [sN] sN-veth >==tbf up==> hub-port  /

Each site is a network namespace joined to the hub's bridge by one veth pair. A source's
*upload* is shaped by tbf on its own veth (egress toward the hub); the downloader's
*download* by tbf on its hub-side port (egress toward the downloader), so several sources
share one downlink queue like on a real ADSL line. Rates follow LAB.md: ADSL x10
(8 Mbit/s up, 30 Mbit/s down) with an ADSL-like buffer (tbf ``latency 200ms``).

Faults: ``cut()`` sets the site's bridge port to the *disabled* state. Every frame to and
from the site is then dropped silently inside the hub: no RST, no ICMP, both links keep
their carrier. Neighbours are static (``nud permanent``), so ARP never fails during a cut
either (a failed ARP would make the kernel report "host unreachable" to the sockets, which a
real line cut behind a modem never does). ``loss()`` drops a random share of IPv4 frames
with nftables ``numgen random`` in the hub (needs the ``nft`` binary: Debian ``nftables``).

Every name carries a per-run prefix (``dml`` + 6 hex digits). Teardown stops the processes
started through ``popen`` (SIGTERM, then SIGKILL) and deletes the namespaces, which takes
their interfaces, qdiscs and nft tables with them; an ``atexit`` hook does the same if a
caller never closed its lab. ``leftovers()`` lists namespaces a run left behind.

Run as a script, this file is the lab's probe toolbox (``sink``, ``send``, ``sniff``), started
inside namespaces by ``Lab.popen(node, probe_cmd(...))``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FAMILY = "dml"  # every lab namespace starts with this; the per-run prefix adds 6 hex digits
MBIT = 1_000_000
ADSL_UP_X10 = 8 * MBIT  # LAB.md: real ADSL 800 kbit/s up, 3 Mbit/s down, scaled by 10
ADSL_DOWN_X10 = 30 * MBIT
TCP_GOODPUT = 0.957  # LAB.md: TCP payload over a tbf link of rate R is ~0.957 R
SUBNET = "10.77.0"  # /24 inside the lab's namespaces only
DOWNLOADER_HOST = 100  # downloader = .100, source i = .i
CMD_TIMEOUT = 10.0  # one ip/tc/nft command
STOP_GRACE = 3.0  # SIGTERM -> SIGKILL
PROBE = str(Path(__file__).resolve())

# Bridge port states (include/uapi/linux/if_bridge.h).
BR_STATE_DISABLED = 0
BR_STATE_FORWARDING = 3


class LabError(RuntimeError):
    """An ip/tc/nft command failed, or the lab was used wrongly."""


def _cmd(args: str | Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT) -> str:
    """Run one tooling command (ip, tc, bridge; a str is split on spaces); return stdout.

    Raise LabError when it fails (unless ``check`` is false) or hangs.
    """
    if isinstance(args, str):
        args = args.split()
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(args)}: no answer after {timeout} s") from exc
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def leftovers(prefix: str = FAMILY) -> list[str]:
    """Network namespaces whose name starts with ``prefix`` (all labs' by default)."""
    names = []
    for line in _cmd("ip netns list").splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith(prefix):
            names.append(name)
    return names


def probe_cmd(*args: str) -> list[str]:
    """argv running this file's probe toolbox (``sink``/``send``/``sniff``) with ``args``."""
    return [sys.executable, PROBE, *args]


@dataclass(frozen=True)
class Node:
    """One site of the lab: its namespace, address and the two ends of its line."""

    label: str  # "d" or "s1".."sk"
    ns: str  # network namespace
    addr: str  # IPv4 address (on SUBNET.0/24)
    iface: str  # veth end inside ``ns``
    port: str  # veth end in the hub namespace (a bridge port)
    mac: str  # of ``iface``; static in every neighbour table


@dataclass
class Goodput:
    """TCP payload rate measured at the receiver over a steady window."""

    bps: float  # all senders together
    per_sender: dict[str, float]  # sender label -> bit/s
    seconds: float  # window length


class Lines:
    """Lines of a process's stdout, read by a daemon thread that ends with the pipe."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self._q: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def get(self, timeout: float) -> str | None:
        """Next line, or None at EOF; raise TimeoutError after ``timeout`` s."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output from {self.proc.args[-1]!r} in {timeout} s") from None

    def json(self, timeout: float) -> dict | None:
        """Next line that is a JSON object (other lines skipped), or None at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.get(max(0.0, deadline - time.monotonic()))
            if line is None:
                return None
            if line.startswith("{"):
                return json.loads(line)

    def drain(self) -> list[str]:
        """Lines already read, without waiting."""
        out = []
        while True:
            try:
                line = self._q.get_nowait()
            except queue.Empty:
                return out
            if line is not None:
                out.append(line)

    def wait_for(self, token: str, timeout: float) -> None:
        """Block until a line starting with ``token`` arrives (e.g. ``READY``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.proc.args[-1]!r}: no {token!r} in {timeout} s")
            line = self.get(left)
            if line is None:
                raise LabError(f"{self.proc.args!r} exited ({self.proc.wait()}) before {token!r}")
            if line.startswith(token):
                return


_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


@atexit.register
def _close_forgotten_labs() -> None:
    for lab in list(_open_labs):
        lab.close()


@dataclass(eq=False)  # identity semantics: labs live in a WeakSet
class Lab:
    """k source namespaces and one downloader behind a hub bridge, shaped like ADSL lines.

    Rates are bit/s; ``None`` leaves that direction unshaped. Use as a context manager.
    """

    k: int = 3
    up_bps: int | None = ADSL_UP_X10  # each source's upload
    down_bps: int | None = ADSL_DOWN_X10  # the downloader's download
    downloader_up_bps: int | None = None
    source_down_bps: int | None = None
    latency_ms: int = 200  # tbf queue: LAB.md, ADSL-like buffer
    prefix: str = field(default_factory=lambda: FAMILY + secrets.token_hex(3))
    downloader: Node = field(init=False)
    sources: list[Node] = field(init=False)
    hub: str = field(init=False)
    _namespaces: list[str] = field(init=False, default_factory=list)
    _procs: list[subprocess.Popen] = field(init=False, default_factory=list)
    _cut: set[str] = field(init=False, default_factory=set)
    _nft: bool = field(init=False, default=False)
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 32:
            raise LabError(f"k={self.k}: 1..32 sources")
        if not self.prefix.startswith(FAMILY) or len(self.prefix) > 9:
            raise LabError(f"prefix {self.prefix!r}: must start with {FAMILY!r}, <= 9 chars")
        self.hub = f"{self.prefix}-hub"
        self.downloader = self._node("d", DOWNLOADER_HOST)
        self.sources = [self._node(f"s{i}", i) for i in range(1, self.k + 1)]

    def _node(self, label: str, host: int) -> Node:
        return Node(
            label=label,
            ns=f"{self.prefix}-{label}",
            addr=f"{SUBNET}.{host}",
            iface=f"{self.prefix}{label}",  # <= 9 + 3 chars: IFNAMSIZ is 16 incl. NUL
            port=f"{self.prefix}{label}h",
            mac=f"02:00:00:00:00:{host:02x}",
        )

    @property
    def nodes(self) -> list[Node]:
        """The downloader, then the sources."""
        return [self.downloader, *self.sources]

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Lab:
        _open_labs.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        br = f"{self.prefix}br"
        for ns in [self.hub, *(n.ns for n in self.nodes)]:
            _cmd(f"ip netns add {ns}")
            self._namespaces.append(ns)
            _cmd(f"ip -n {ns} link set lo up")
        _cmd(f"ip -n {self.hub} link add {br} type bridge mcast_snooping 0")
        _cmd(f"ip -n {self.hub} link set {br} up")
        for i, n in enumerate(self.nodes):
            hub_mac = f"02:00:00:00:01:{i:02x}"
            _cmd(
                f"ip -n {self.hub} link add {n.port} address {hub_mac} type veth"
                f" peer name {n.iface} address {n.mac} netns {n.ns}"
            )
            _cmd(f"ip -n {self.hub} link set {n.port} master {br} up")
            _cmd(f"ip -n {n.ns} addr add {n.addr}/24 dev {n.iface}")
            _cmd(f"ip -n {n.ns} link set {n.iface} up")
        for n in self.nodes:
            for other in self.nodes:
                if other is not n:
                    _cmd(
                        f"ip -n {n.ns} neigh replace {other.addr} lladdr {other.mac}"
                        f" dev {n.iface} nud permanent"
                    )
        for s in self.sources:
            self._shape(s.ns, s.iface, self.up_bps)
            self._shape(self.hub, s.port, self.source_down_bps)
        self._shape(self.hub, self.downloader.port, self.down_bps)
        self._shape(self.downloader.ns, self.downloader.iface, self.downloader_up_bps)

    def _shape(self, ns: str, dev: str, bps: int | None) -> None:
        if bps is not None:
            shape_egress(ns, dev, bps, self.latency_ms)

    def close(self) -> None:
        """Stop our processes and delete our namespaces; idempotent, never raises mid-way."""
        if self._closed:
            return
        self._closed = True
        _open_labs.discard(self)
        stop_processes(self._procs)
        errors = delete_namespaces(self._namespaces)
        self._namespaces.clear()
        if errors:
            raise LabError("teardown: " + "; ".join(errors))

    # -- processes ----------------------------------------------------------------------

    def node(self, which: Node | str) -> Node:
        """A node by itself or by label ("d", "s1", ...)."""
        if isinstance(which, Node):
            return which
        for n in self.nodes:
            if n.label == which:
                return n
        raise LabError(f"no node {which!r} in this lab ({[n.label for n in self.nodes]})")

    def popen(self, node: Node | str, args: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``args`` in ``node``'s namespace (or "hub"), in its own session; stopped at
        teardown."""
        if self._closed or not self._namespaces:
            raise LabError("lab is not running")
        kw["start_new_session"] = True  # one process group per process: kill() reaches children
        ns = self.hub if node in ("hub", self.hub) else self.node(node).ns
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], **kw)
        self._procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """Hard-kill a process started by ``popen`` (SIGKILL to its group) and reap it."""
        self._own(proc)
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=STOP_GRACE)

    def stop(self, proc: subprocess.Popen) -> int:
        """Stop a process started by ``popen``: SIGTERM, then SIGKILL; return its exit code."""
        self._own(proc)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=STOP_GRACE)
        return proc.returncode

    def _own(self, proc: subprocess.Popen) -> None:
        if proc not in self._procs:
            raise LabError(f"pid {proc.pid} was not started by this lab")

    # -- faults -------------------------------------------------------------------------

    def cut(self, node: Node | str) -> None:
        """Silently drop everything to and from ``node`` (both directions, no RST/ICMP)."""
        n = self.node(node)
        self._port_state(n, BR_STATE_DISABLED, "disabled")
        self._cut.add(n.label)

    def restore(self, node: Node | str) -> None:
        """Undo ``cut``: the line carries traffic again (TCP resumes at its next retransmit)."""
        n = self.node(node)
        self._port_state(n, BR_STATE_FORWARDING, "forwarding")
        self._cut.discard(n.label)

    def _port_state(self, n: Node, state: int, name: str) -> None:
        # `bridge link set` (not `ip link set type bridge_slave state`, which iproute2 6.1
        # accepts and ignores); read back so a silent no-op cannot fake a cut.
        _cmd(f"bridge -n {self.hub} link set dev {n.port} state {state}")
        shown = json.loads(_cmd(f"bridge -n {self.hub} -j link show dev {n.port}"))
        if not shown or shown[0].get("state") != name:
            raise LabError(f"bridge port {n.port}: state {shown} after setting {name}")

    def is_cut(self, node: Node | str) -> bool:
        """True between ``cut`` and ``restore``."""
        return self.node(node).label in self._cut

    def loss_counts(self, node: Node | str) -> tuple[int, int]:
        """(IPv4 frames seen, frames dropped) by ``node``'s loss rules since `loss` set them."""
        chain = f"loss_{self.node(node).label}"
        text = _cmd(f"ip netns exec {self.hub} nft list chain bridge {self.prefix} {chain}")
        counts = [int(m) for m in re.findall(r"counter packets (\d+)", text)]
        if len(counts) != 2:
            raise LabError(f"no loss rules on {chain}: {text!r}")
        return counts[0], counts[1]

    def loss(self, node: Node | str, percent: float) -> None:
        """Drop ``percent`` % of IPv4 frames to and from ``node`` at random; 0 clears it."""
        n = self.node(node)
        table, chain = self.prefix, f"loss_{n.label}"
        per_mille = round(percent * 10)
        if not 0 <= per_mille <= 1000:
            raise LabError(f"loss {percent} %: 0..100")
        if not self._nft:
            _nft(
                self.hub,
                f"add table bridge {table}\n"
                f"add chain bridge {table} labfwd {{ type filter hook forward priority 0; }}\n",
            )
            self._nft = True
        script = f"add chain bridge {table} {chain}\nflush chain bridge {table} {chain}\n"
        if per_mille:
            script += (
                f"add rule bridge {table} {chain} ether type ip counter\n"
                f"add rule bridge {table} {chain} ether type ip "
                f"numgen random mod 1000 < {per_mille} counter drop\n"
            )
        _nft(self.hub, script)
        rules = _cmd(f"ip netns exec {self.hub} nft list chain bridge {table} labfwd")
        if f"jump {chain}" not in rules:
            for side in ("iifname", "oifname"):
                _nft(self.hub, f'add rule bridge {table} labfwd {side} "{n.port}" jump {chain}\n')

    # -- measurements -------------------------------------------------------------------

    def link_bytes(self, node: Node | str) -> tuple[int, int]:
        """(rx, tx) byte counters of ``node``'s own interface, frames incl. headers."""
        n = self.node(node)
        info = json.loads(_cmd(f"ip -n {n.ns} -j -s link show dev {n.iface}"))
        stats = info[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def snmp(self, node: Node | str) -> dict[str, int]:
        """The namespace's /proc/net/snmp counters as {"Tcp.OutRsts": n, "Icmp.InMsgs": n...}."""
        text = _cmd(f"ip netns exec {self.node(node).ns} cat /proc/net/snmp")
        lines = text.splitlines()
        out: dict[str, int] = {}
        for head, vals in zip(lines[::2], lines[1::2], strict=True):
            proto, names = head.split(":", 1)
            for name, val in zip(names.split(), vals.split(":", 1)[1].split(), strict=True):
                out[f"{proto}.{name}"] = int(val)
        return out

    def tcp_goodput(
        self,
        senders: Iterable[Node | str],
        receiver: Node | str | None = None,
        *,
        seconds: float = 3.0,
        warmup: float = 1.5,
        port: int = 5201,
    ) -> Goodput:
        """Blast TCP from each sender to ``receiver`` (default: downloader); measure payload.

        The window starts ``warmup`` s after every sender is connected (slow start, filling
        the tbf queues) and lasts ``seconds``.
        """
        rx = self.node(receiver or self.downloader)
        tx = [self.node(s) for s in senders]
        by_addr = {n.addr: n.label for n in tx}
        total = warmup + seconds + 5.0
        sink_cmd = probe_cmd("sink", rx.addr, str(port), "--seconds", str(total + 5))
        send_cmd = probe_cmd("send", rx.addr, str(port), "--seconds", str(total))
        sink = self.popen(rx, sink_cmd, stdout=subprocess.PIPE, text=True)
        lines = Lines(sink)
        procs = []
        try:
            lines.wait_for("READY", 10)
            for n in tx:
                procs.append(self.popen(n, send_cmd, stdout=subprocess.DEVNULL))
            ready_at = start = end = None
            deadline = time.monotonic() + total
            while end is None and time.monotonic() < deadline:
                s = lines.json(timeout=5)
                if s is None:
                    raise LabError(f"sink exited ({sink.wait()}) during the measurement")
                if s["errors"]:
                    raise LabError(f"sink: {s['errors']}")
                if ready_at is None:
                    if len(s["peers"]) == len(tx):
                        ready_at = s["t"]
                elif start is None:
                    if s["t"] >= ready_at + warmup:
                        start = s
                elif s["t"] >= start["t"] + seconds:
                    end = s
            if start is None or end is None:
                raise LabError("senders did not connect/flow within the time limit")
        finally:
            for p in [*procs, sink]:
                self.stop(p)
        dt = end["t"] - start["t"]
        per = {
            by_addr.get(addr, addr): (end["peers"][addr] - start["peers"].get(addr, 0)) * 8 / dt
            for addr in end["peers"]
        }
        return Goodput(sum(per.values()), per, dt)


def shape_egress(ns: str, dev: str, bps: int, latency_ms: int) -> None:
    """tbf at `bps` on `dev`'s egress in `ns`, with a `latency_ms` queue (LAB.md)."""
    # Burst: a few full frames, or 2 ms at rate; tbf splits bigger GSO frames itself.
    burst = max(16_000, bps // 8 // 500)
    _cmd(
        f"tc -n {ns} qdisc replace dev {dev} root tbf"
        f" rate {bps}bit burst {burst} latency {latency_ms}ms"
    )


@contextlib.contextmanager
def when_grown(
    counter: Callable[[], int], nbytes: int, action: Callable[[], None], poll_s: float
) -> Iterator[list[float]]:
    """Run `action` once `counter()` has grown by `nbytes` since entry (polled every
    `poll_s` on a watcher thread); yields a list that then holds the seconds after entry at
    which it ran. An exception from `action` is raised on exit."""
    base = counter()
    done = threading.Event()
    fired: list[float] = []
    errors: list[BaseException] = []

    def watch() -> None:
        start = time.monotonic()
        while not done.wait(poll_s):  # bounded by the body: `done` is set when it ends
            if counter() - base >= nbytes:
                try:
                    action()
                except BaseException as exc:  # reported to the caller below
                    errors.append(exc)
                fired.append(time.monotonic() - start)
                return

    watcher = threading.Thread(target=watch, name="when-grown", daemon=True)
    watcher.start()
    try:
        yield fired
    finally:
        done.set()
        watcher.join(timeout=10)
    if errors:
        raise errors[0]


def stop_processes(procs: Iterable[subprocess.Popen]) -> None:
    """SIGTERM the process groups still running, SIGKILL those not gone within the grace."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=STOP_GRACE)


def delete_namespaces(namespaces: Sequence[str]) -> list[str]:
    """Kill what still runs inside each namespace (only a lab's own namespaces are passed:
    processes it started, or the code under test started in them), then delete it, newest
    first. Returns the errors instead of stopping at the first one."""
    errors: list[str] = []
    for ns in reversed(namespaces):
        try:
            for pid in _cmd(f"ip netns pids {ns}", check=False).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _cmd(f"ip netns del {ns}")
        except LabError as exc:
            errors.append(str(exc))
    return errors


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _nft(ns: str, script: str) -> None:
    try:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT,
        )
    except FileNotFoundError:
        raise LabError("nft not found: apt-get install --no-install-recommends nftables") from None
    if done.returncode != 0:
        if "No such file" in done.stderr and "nft" in done.stderr:
            raise LabError("nft not found: apt-get install --no-install-recommends nftables")
        raise LabError(f"nft in {ns}: {done.stderr.strip()}")


# -- probe toolbox (runs inside the namespaces) -----------------------------------------------


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _sink(addr: str, port: int, seconds: float, every: float) -> int:
    """Accept TCP, read everything; every ``every`` s print cumulative bytes per peer address."""
    srv = socket.create_server((addr, port), backlog=64)
    srv.setblocking(False)
    conns: dict[socket.socket, str] = {}
    peers: dict[str, int] = {}
    errors: list[str] = []
    closed: list[str] = []
    buf = bytearray(1 << 20)
    print("READY", flush=True)
    end = time.monotonic() + seconds
    next_report = time.monotonic()
    while (now := time.monotonic()) < end:
        readable, _, _ = select.select([srv, *conns], [], [], max(0.0, next_report - now))
        for s in readable:
            if s is srv:
                c, (host, _p) = srv.accept()
                c.setblocking(False)
                conns[c] = host
                peers.setdefault(host, 0)
                continue
            try:
                n = s.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError as exc:
                errors.append(f"{conns[s]}: {exc!r}")
                n = 0
            if n:
                peers[conns[s]] += n
            else:
                closed.append(conns.pop(s))
                s.close()
        if time.monotonic() >= next_report:
            _emit({"t": time.monotonic(), "peers": peers, "closed": closed, "errors": errors})
            next_report += every
    return 0


def _send(addr: str, port: int, seconds: float, every: float) -> int:
    """Connect and send as fast as TCP allows for ``seconds``; report errors as JSON lines."""
    try:
        sock = socket.create_connection((addr, port), timeout=10)
    except OSError as exc:
        _emit({"error": repr(exc), "errno": exc.errno})
        return 1
    sock.setblocking(False)
    print("CONNECTED", flush=True)
    data = memoryview(os.urandom(1 << 18))
    sent = 0
    end = time.monotonic() + seconds
    next_report = time.monotonic() + every
    while (now := time.monotonic()) < end:
        _, writable, _ = select.select([], [sock], [], min(every, end - now))
        if writable:
            try:
                sent += sock.send(data)
            except BlockingIOError:
                pass
            except OSError as exc:
                _emit({"t": time.monotonic(), "error": repr(exc), "errno": exc.errno})
                return 1
        if time.monotonic() >= next_report:
            _emit({"t": time.monotonic(), "sent": sent})
            next_report += every
    sock.close()
    _emit({"t": time.monotonic(), "sent": sent, "done": True})
    return 0


def _sniff(ifaces: list[str], seconds: float) -> int:
    """Count frames, TCP RSTs and ICMP seen on ``ifaces`` (both directions) until SIGTERM."""
    eth_p_all = 0x0003
    socks = {}
    for name in ifaces:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_p_all))
        s.bind((name, 0))
        s.setblocking(False)
        socks[s] = name
    counts = {name: {"frames": 0, "tcp": 0, "rst": 0, "icmp": 0} for name in ifaces}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        readable, _, _ = select.select(list(socks), [], [], 0.1)
        for s in readable:
            with contextlib.suppress(BlockingIOError):
                frame = s.recv(256)
                c = counts[socks[s]]
                c["frames"] += 1
                if len(frame) < 34 or frame[12:14] != b"\x08\x00":
                    continue
                ihl = (frame[14] & 0x0F) * 4
                proto = frame[23]
                if proto == socket.IPPROTO_ICMP:
                    c["icmp"] += 1
                elif proto == socket.IPPROTO_TCP and len(frame) > 14 + ihl + 13:
                    c["tcp"] += 1
                    if frame[14 + ihl + 13] & 0x04:  # RST flag
                        c["rst"] += 1
    _emit({"counts": counts})
    return 0


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="lab probes, run inside a lab namespace")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("sink", "send"):
        p = sub.add_parser(name)
        p.add_argument("addr")
        p.add_argument("port", type=int)
        p.add_argument("--seconds", type=float, default=30.0)
        p.add_argument("--every", type=float, default=0.1 if name == "sink" else 0.25)
    p = sub.add_parser("sniff")
    p.add_argument("ifaces", nargs="+")
    p.add_argument("--seconds", type=float, default=60.0)
    a = ap.parse_args(argv)
    if a.cmd == "sink":
        return _sink(a.addr, a.port, a.seconds, a.every)
    if a.cmd == "send":
        return _send(a.addr, a.port, a.seconds, a.every)
    return _sniff(a.ifaces, a.seconds)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
