#!/usr/bin/env python3
"""Central PACS through replicas: a clinic C-MOVEs a study only the central PACS holds, via 1, 2
and 3 replica gateways each on one ADSL-like line, against a plain C-MOVE from the PACS over
one such line, in one run on one lab.

The lab (network namespaces, LAB.md's ADSL rates x10, tbf with a 200 ms buffer)::

    <p>-pacs    Orthanc; LAN bridge 10.80.0.1/24 ----+------------------+---- ...
                line 10.81.1.2 ==8 Mbit/s up==>     |                  |
    <p>-r<i>    LAN 10.80.0.<10+i> (unshaped) ------+ (replica 1)      + (replica 2) ...
                line 10.81.<i+1>.2 ==8 Mbit/s up==>
    <p>-inet    router: one /24 per line, forwards, no shaping of its own
    <p>-c       clinic, line 10.82.0.2 <==30 Mbit/s down== (tbf on the router's side)

Each replica's upload (egress of its line) is shaped to 8 Mbit/s (ADSL 800 kbit/s x10); the
clinic's download to 30 Mbit/s (3 Mbit/s x10), so 3 replicas (24 Mbit/s) never fill it. The
PACS and the replicas share an unshaped LAN, as on a hospital's gigabit LAN. Plain routed
addresses, no WireGuard: every gateway's mesh address is its line's address (one tunnel per
line would cost ~4 % of goodput, LAB.md, alike for every replica count). Replicas reach each
other's mesh addresses over the LAN (host routes), so filling each other (README "The central
PACS": a replica swarms the rest once its share is in) does not use their lines.

Cases, each with fresh gateways (cold stores) and a fresh storescp in the clinic:
- dicomesh, k replicas (k = 1, 2, 3): real `dicomesh run` gateways in their namespaces,
  [central] on, replicas registered in Orthanc (REST PUT /modalities, their LAN addresses);
  DCMTK movescu in the clinic C-MOVEs the study (STUDY level) from the clinic gateway to a
  storescp ("WS") there: the replicas retrieve their shares from Orthanc over the LAN and the
  clinic swarms from all of them over their lines while they fill;
- plain C-MOVE: the same movescu asks Orthanc itself (over the PACS's own line) to C-MOVE the
  study to the same storescp: client/server DICOM over one ADSL-like upload.

Times: from movescu's start to its exit ("seconds"); "first image": when the first instance
appeared in storescp's directory (polled every 10 ms), also as a share of the whole time.
"ideal": bytes / (0.957 x min(k x up, down)) (TCP goodput over tbf, LAB.md). "PACS sent":
instances Orthanc sent by C-MOVE in that case (its --verbose log), each once per replica set.
Every received instance is compared with the original's data set, byte for byte.
Targets (issue 7): 3 replicas >= 2.8 x 1 replica, first image < 10 % of the whole transfer.

Wire compression is off by default (`--compression off`): chunks travel raw, so every case
moves the study's own bytes; `--compression on` (the firmware's default) or `both`.
The machine has 2 cores: the load average and any qemu or other bench running are printed.

Needs root (namespaces), dcmtk, orthanc.
Usage: .venv/bin/python bench/central.py [--size-mb 30] [--runs 1] [--k 1,2,3]
       [--compression off|on|both] [--no-cmove] [--keep] [--log-level debug]
       (~2 min per run with the defaults; --keep leaves the gateways' and Orthanc's logs)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from dcmtk import dcmtk_env, storescu  # noqa: E402
from dicomfiles import dataset_bytes, sop_instance_uid  # noqa: E402
from gateway import Gateway  # noqa: E402
from lab import (  # noqa: E402
    ADSL_DOWN_X10,
    ADSL_UP_X10,
    FAMILY,
    MBIT,
    TCP_GOODPUT,
    LabError,
    _cmd,
    delete_namespaces,
    shape_egress,
    stop_processes,
)
from orthanc import ORTHANC_BINARY, Orthanc  # noqa: E402
from procs import LOOPBACK  # noqa: E402
from studygen import StudyInfo, generate_study  # noqa: E402

PACS_LAN = "10.80.0.1"
PACS_LINE = 1  # index of the PACS's own line (replica i has line i + 1)
CLINIC_ADDR, CLINIC_GW = "10.82.0.2", "10.82.0.1"
MESH_PORT = 7480
WS_PORT = 11113  # the clinic workstation's storescp, inside the clinic namespace
WS_AE = "WS"
SYNC_S = 0.5
START_TIMEOUT = 90.0  # up to 4 gateways start at once on 2 cores
STOP_TIMEOUT = 15.0
ONLINE_TIMEOUT = 30.0
POLL_S = 0.01  # storescp directory poll, for the first image
BUSY = "qemu-|bench/bonding.py|bench/swarm.py|pytest"  # heavy work of others, reported
NETNS_RUN_DIR = "/var/run/netns"  # where `ip netns add` pins namespaces
CLONE_NEWNET = 0x40000000  # linux/sched.h
_SENT = re.compile(r'Sending resource ([0-9a-f-]+) to modality "[^"]+"')


def line_addr(n: int) -> tuple[str, str]:
    """(address, router address) of line n: the PACS's is 1, replica i's is i + 1."""
    return f"10.81.{n}.2", f"10.81.{n}.1"


def replica_lan(i: int) -> str:
    return f"10.80.0.{10 + i}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the lab ------------------------------------------------------------------------------------


def ns_socket(ns: str) -> socket.socket:
    """A TCP socket inside namespace `ns`: made by a short-lived thread that joined `ns`
    (setns(2) moves only the calling thread). Not pyroute2's create_socket: it forks, and a
    forked copy of this script that gets SIGTERM would run its teardown."""
    made: list[socket.socket] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"{NETNS_RUN_DIR}/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=make, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return made[0]


def ns_connectable(ns: str, host: str, port: int) -> bool:
    sock = ns_socket(ns)
    try:
        sock.settimeout(0.5)
        sock.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


@dataclass(eq=False)
class CentralLab:
    """The central site (PACS + `replicas` replicas on a LAN, one line each), an inet router
    and a clinic with one line. A context manager: teardown stops what it started and deletes
    the namespaces (which kills whatever still runs in them)."""

    replicas: int = 3
    up_bps: int = ADSL_UP_X10
    down_bps: int = ADSL_DOWN_X10
    latency_ms: int = 200
    prefix: str = field(default_factory=lambda: FAMILY + secrets.token_hex(3))
    _namespaces: list[str] = field(init=False, default_factory=list)
    _procs: list[subprocess.Popen] = field(init=False, default_factory=list)
    _closed: bool = field(init=False, default=False)
    _owner: int = field(init=False, default_factory=os.getpid)

    @property
    def pacs(self) -> str:
        return f"{self.prefix}-pacs"

    @property
    def inet(self) -> str:
        return f"{self.prefix}-inet"

    @property
    def clinic(self) -> str:
        return f"{self.prefix}-c"

    def replica(self, i: int) -> str:
        return f"{self.prefix}-r{i}"

    def line_iface(self, n: int) -> str:
        """Line n's interface in its site (the shaped upload)."""
        return f"{self.prefix}u{n}"

    @property
    def clinic_iface(self) -> str:
        return f"{self.prefix}c"

    def __enter__(self) -> CentralLab:
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

    def _shape(self, ns: str, dev: str, bps: int) -> None:
        shape_egress(ns, dev, bps, self.latency_ms)

    def _line(self, ns: str, n: int) -> None:
        """Line n from `ns` to the router: its upload shaped to `up_bps`, default route."""
        addr, gw = line_addr(n)
        inner, outer = self.line_iface(n), f"{self.prefix}i{n}"
        _cmd(f"ip -n {self.inet} link add {outer} type veth peer name {inner} netns {ns}")
        _cmd(f"ip -n {self.inet} addr add {gw}/24 dev {outer}")
        _cmd(f"ip -n {self.inet} link set {outer} up")
        _cmd(f"ip -n {ns} addr add {addr}/24 dev {inner}")
        _cmd(f"ip -n {ns} link set {inner} up")
        _cmd(f"ip -n {ns} route add default via {gw}")
        self._shape(ns, inner, self.up_bps)

    def _build(self) -> None:
        p = self.prefix
        self._ns(self.inet)
        _cmd(f"ip netns exec {self.inet} sysctl -qw net.ipv4.ip_forward=1")
        self._ns(self.pacs)
        lan = f"{p}lan"
        _cmd(f"ip -n {self.pacs} link add {lan} type bridge mcast_snooping 0")
        _cmd(f"ip -n {self.pacs} addr add {PACS_LAN}/24 dev {lan}")
        _cmd(f"ip -n {self.pacs} link set {lan} up")
        self._line(self.pacs, PACS_LINE)
        for i in range(1, self.replicas + 1):
            ns = self.replica(i)
            self._ns(ns)
            port, inner = f"{p}r{i}p", f"{p}r{i}l"
            _cmd(f"ip -n {self.pacs} link add {port} type veth peer name {inner} netns {ns}")
            _cmd(f"ip -n {self.pacs} link set {port} master {lan} up")
            _cmd(f"ip -n {ns} addr add {replica_lan(i)}/24 dev {inner}")
            _cmd(f"ip -n {ns} link set {inner} up")
            self._line(ns, i + 1)
        # Replicas talk to each other's mesh (line) addresses over the LAN, not the lines.
        for i in range(1, self.replicas + 1):
            for j in range(1, self.replicas + 1):
                if i != j:
                    _cmd(
                        f"ip -n {self.replica(i)} route add {line_addr(j + 1)[0]}/32"
                        f" via {replica_lan(j)} dev {p}r{i}l"
                    )
        self._ns(self.clinic)
        outer = f"{p}ci"
        _cmd(
            f"ip -n {self.inet} link add {outer} type veth"
            f" peer name {self.clinic_iface} netns {self.clinic}"
        )
        _cmd(f"ip -n {self.inet} addr add {CLINIC_GW}/24 dev {outer}")
        _cmd(f"ip -n {self.inet} link set {outer} up")
        _cmd(f"ip -n {self.clinic} addr add {CLINIC_ADDR}/24 dev {self.clinic_iface}")
        _cmd(f"ip -n {self.clinic} link set {self.clinic_iface} up")
        _cmd(f"ip -n {self.clinic} route add default via {CLINIC_GW}")
        self._shape(self.inet, outer, self.down_bps)  # the clinic's download

    def close(self) -> None:
        """Stop our processes and delete our namespaces; idempotent, and only in the process
        that built the lab (never in a forked copy)."""
        if self._closed or os.getpid() != self._owner:
            return
        self._closed = True
        stop_processes(self._procs)
        errors = delete_namespaces(self._namespaces)
        self._namespaces.clear()
        if errors:
            raise LabError("teardown: " + "; ".join(errors))

    def popen(self, ns: str, args: list[str], **kw) -> subprocess.Popen:
        """Start `args` inside `ns`, in its own session; stopped at teardown."""
        if self._closed:
            raise LabError("lab is closed")
        kw["start_new_session"] = True
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], **kw)
        self._procs.append(proc)
        return proc

    def link_bytes(self, ns: str, iface: str) -> tuple[int, int]:
        """(rx, tx) bytes of an interface, frames incl. headers (`ip -json -s link`)."""
        info = json.loads(_cmd(f"ip -n {ns} -j -s link show dev {iface}"))
        stats = info[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def line_tx(self, n: int) -> int:
        ns = self.pacs if n == PACS_LINE else self.replica(n - 1)
        return self.link_bytes(ns, self.line_iface(n))[1]

    def clinic_rx(self) -> int:
        return self.link_bytes(self.clinic, self.clinic_iface)[0]


class NsOrthanc(Orthanc):
    """tests/orthanc.py's Orthanc, run inside a namespace with --verbose (its log then names
    each resource a C-MOVE sends), line-buffered (so the log is current when read after a
    case); REST calls go to its loopback through a socket made there."""

    def __init__(self, netns: str, workdir: Path, **kw) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        wrapper = workdir / "orthanc-in-netns"
        command = f'ip netns exec {netns} stdbuf -oL -eL {ORTHANC_BINARY} --verbose "$@"'
        wrapper.write_text(f"#!/bin/sh\nexec {command}\n")
        wrapper.chmod(0o755)
        super().__init__(workdir, binary=str(wrapper), **kw)
        self.netns = netns
        self._sizes: dict[str, int] = {}  # Orthanc ID -> instances in it

    def _http(self, method: str, path: str, body: bytes | None, timeout: float) -> object:
        sock = ns_socket(self.netns)
        conn = http.client.HTTPConnection(LOOPBACK, self.http_port, timeout=timeout)
        try:
            sock.settimeout(timeout)
            sock.connect((LOOPBACK, self.http_port))
            conn.sock = sock
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
            sock.close()
        if resp.status >= 400:
            raise OSError(f"Orthanc {method} {path}: HTTP {resp.status} {raw[:200]!r}")
        return json.loads(raw) if raw else None

    def rest(self, path: str, *, timeout: float = 10.0) -> object:
        return self._http("GET", path, None, timeout)

    def post(self, path: str, body: object, *, timeout: float = 60.0) -> object:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._http("POST", path, data, timeout)

    def put(self, path: str, body: object, *, timeout: float = 10.0) -> object:
        return self._http("PUT", path, json.dumps(body).encode(), timeout)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}")
            with contextlib.suppress(OSError, ValueError):
                self.rest("/system", timeout=1.0)
                if ns_connectable(self.netns, LOOPBACK, self.dicom_port):
                    return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Orthanc not up after {self._startup_timeout} s")
            time.sleep(0.1)

    def register(self, name: str, ae_title: str, host: str, port: int) -> None:
        """A C-MOVE destination (PUT /modalities/{name})."""
        self.put(f"/modalities/{name}", {"AET": ae_title, "Host": host, "Port": port})

    def sent(self) -> int:
        """Instances sent by C-MOVE so far: the resources its log names ("Sending resource",
        one per C-MOVE match: an instance, or a whole series or study), counted in instances."""
        total = 0
        for m in _SENT.finditer(self.log_path.read_text(errors="replace")):
            oid = m.group(1)
            if oid not in self._sizes:
                self._sizes[oid] = self._instances_in(oid)
            total += self._sizes[oid]
        return total

    def _instances_in(self, oid: str) -> int:
        with contextlib.suppress(OSError):
            self.rest(f"/instances/{oid}")
            return 1
        with contextlib.suppress(OSError):
            return len(self.rest(f"/series/{oid}")["Instances"])  # type: ignore[index]
        with contextlib.suppress(OSError):
            self.rest(f"/studies/{oid}")
            return len(self.rest(f"/studies/{oid}/instances"))  # type: ignore[arg-type]
        raise RuntimeError(f"Orthanc sent {oid}, which it does not hold")


# -- one measurement ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    seconds: float  # movescu start -> exit
    first: float  # movescu start -> first instance in storescp's directory
    pacs_sent: int  # instances Orthanc sent by C-MOVE meanwhile
    clinic_rx: int  # bytes the clinic's line received (frames)
    lines_tx: list[int]  # bytes each used line sent (replicas' lines, or the PACS's)
    load: tuple[float, float]  # 1-min load average before and after


class Watch:
    """Polls a directory for files: when the first appeared and when `n` were there."""

    def __init__(self, directory: Path, n: int) -> None:
        self.dir, self.n = directory, n
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(POLL_S):  # ends when stop() is called
            count = sum(1 for _ in os.scandir(self.dir))
            now = time.monotonic()
            if count and self.first is None:
                self.first = now
            if count >= self.n:
                self.last = now
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def start_storescp(lab: CentralLab, outdir: Path) -> subprocess.Popen:
    """DCMTK storescp ("WS") in the clinic, storing into `outdir`."""
    outdir.mkdir(parents=True)
    # -dhl: no reverse DNS lookup of the caller (no resolver in the lab: 10 s of timeouts).
    args = ["storescp", "-dhl", "-aet", WS_AE, "-od", str(outdir), "+xa", str(WS_PORT)]
    proc = lab.popen(
        lab.clinic,
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
    )
    deadline = time.monotonic() + 10
    while not ns_connectable(lab.clinic, LOOPBACK, WS_PORT):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("storescp did not start in the clinic")
        time.sleep(0.05)
    return proc


def timed_move(
    lab: CentralLab, study: StudyInfo, host: str, port: int, called: str, outdir: Path
) -> tuple[float, float]:
    """movescu in the clinic: C-MOVE the study from `called` at host:port to WS; (seconds to
    its exit, seconds to the first instance at WS)."""
    n = len(study.paths)
    args = [
        "movescu", "-aet", "WSMOVE", "-aec", called, "-aem", WS_AE, "-S",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
        host, str(port),
    ]  # fmt: skip
    limit = 4 * ideal(study.total_bytes, 1, lab.up_bps, lab.down_bps) + 60
    watch = Watch(outdir, n)
    start = watch.start
    proc = lab.popen(
        lab.clinic, args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dcmtk_env()
    )
    try:
        output, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise RuntimeError(f"movescu still running after {limit:.0f} s") from None
    finally:
        end = time.monotonic()
        watch.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"movescu exit {proc.returncode}: {output.decode()[-800:]}")
    if watch.first is None:
        raise RuntimeError("no instance arrived")
    return end - start, watch.first - start


def check_received(outdir: Path, study: StudyInfo) -> None:
    """Every instance arrived, its data set byte for byte the original's."""
    originals = {
        sop: path for s in study.series for sop, path in zip(s.sop_uids, s.paths, strict=True)
    }
    received = {sop_instance_uid(p): p for p in outdir.iterdir() if p.is_file()}
    if set(received) != set(originals):
        missing = len(set(originals) - set(received))
        raise RuntimeError(f"{missing} instance(s) missing, {len(received)} received")
    bad = [u for u, p in received.items() if dataset_bytes(p) != dataset_bytes(originals[u])]
    if bad:
        raise RuntimeError(f"{len(bad)} instance(s) differ from the originals")


def central_section(pacs: NsOrthanc) -> dict:
    return {
        "enabled": True,
        "ae_title": pacs.ae_title,
        "host": PACS_LAN,
        "port": pacs.dicom_port,
    }


def run_dicomesh(
    lab: CentralLab,
    pacs: NsOrthanc,
    study: StudyInfo,
    k: int,
    work: Path,
    compression: bool,
    log_level: str = "info",
) -> Measure:
    """k fresh replicas and a fresh clinic gateway; movescu at the clinic; timed."""
    mesh = {"port": MESH_PORT, "sync_interval_s": SYNC_S, "wire_compression": compression}
    replicas = [
        Gateway(
            work / f"repl{i}",
            ae_title=f"REPL{i}",
            dicom={"listen": "0.0.0.0"},  # the PACS C-MOVEs to it over the LAN
            mesh={**mesh, "name": f"repl{i}", "role": "replica", "address": line_addr(i + 1)[0]},
            central=central_section(pacs),
            web={"enabled": False},
            qos={"enabled": False},
            log={"level": log_level},
        )
        for i in range(1, k + 1)
    ]
    clinic = Gateway(
        work / "clinic",
        ae_title="CLINIC",
        dicom={"nodes": [{"ae_title": WS_AE, "host": LOOPBACK, "port": WS_PORT}]},
        mesh={**mesh, "name": "clinic", "role": "clinic", "address": CLINIC_ADDR},
        central=central_section(pacs),
        web={"enabled": False},
        qos={"enabled": False},
        log={"level": log_level},
    )
    everyone = [*replicas, clinic]
    for gw in everyone:
        for other in everyone:
            if other is not gw:
                gw.admit(other, role="replica" if other in replicas else "clinic")
    for i, gw in enumerate(replicas, start=1):
        pacs.register(f"repl{i}", gw.ae_title, replica_lan(i), gw.port)
    nss = [lab.replica(i) for i in range(1, k + 1)] + [lab.clinic]
    try:
        with ThreadPoolExecutor(len(everyone)) as pool:
            futures = [
                pool.submit(gw.start, START_TIMEOUT, netns=ns)
                for gw, ns in zip(everyone, nss, strict=True)
            ]
        for f in futures:
            f.result()
        deadline = time.monotonic() + ONLINE_TIMEOUT
        for gw in replicas:
            while f"peer {gw.mesh_name} is online" not in clinic.log():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the clinic does not see {gw.mesh_name} online")
                time.sleep(0.1)
        lines = [i + 1 for i in range(1, k + 1)]
        return measured(lab, pacs, study, work, lines, LOOPBACK, clinic.port, clinic.ae_title)
    finally:
        errors = []
        for gw in everyone:
            try:
                gw.stop(timeout=STOP_TIMEOUT)
            except Exception as exc:  # the others must stop too
                errors.append(repr(exc))
        if errors:
            log(f"    stopping gateways: {'; '.join(errors)}")


def run_cmove(lab: CentralLab, pacs: NsOrthanc, study: StudyInfo, work: Path) -> Measure:
    """The clinic's movescu asks Orthanc itself; Orthanc sends over its own line."""
    pacs.register("ws", WS_AE, CLINIC_ADDR, WS_PORT)
    host = line_addr(PACS_LINE)[0]
    return measured(lab, pacs, study, work, [PACS_LINE], host, pacs.dicom_port, pacs.ae_title)


def measured(
    lab: CentralLab,
    pacs: NsOrthanc,
    study: StudyInfo,
    work: Path,
    lines: list[int],
    host: str,
    port: int,
    called: str,
) -> Measure:
    outdir = work / "ws"
    scp = start_storescp(lab, outdir)
    try:
        load0 = os.getloadavg()[0]
        sent0 = pacs.sent()
        rx0, tx0 = lab.clinic_rx(), [lab.line_tx(n) for n in lines]
        seconds, first = timed_move(lab, study, host, port, called, outdir)
        rx = lab.clinic_rx() - rx0
        tx = [lab.line_tx(n) - t for n, t in zip(lines, tx0, strict=True)]
        sent = pacs.sent() - sent0
        load1 = os.getloadavg()[0]
    finally:
        stop_processes([scp])
    check_received(outdir, study)
    return Measure(seconds, first, sent, rx, tx, (load0, load1))


# -- runs and report ----------------------------------------------------------------------------


def ideal(size: int, k: int, up_bps: int, down_bps: int) -> float:
    """Line-rate bound with TCP: bytes / (0.957 x min(k x up, down))."""
    return size * 8 / (TCP_GOODPUT * min(k * up_bps, down_bps))


def busy() -> str:
    """Other heavy work on the machine (qemu, other benches), as pgrep shows it."""
    done = subprocess.run(["pgrep", "-f", BUSY], capture_output=True, text=True, check=False)
    pids = [p for p in done.stdout.split() if int(p) != os.getpid()]
    return f"{len(pids)} process(es) matching {BUSY!r}" if pids else "none"


@dataclass
class Results:
    runs: dict[str, list[Measure]] = field(default_factory=dict)
    failed: dict[str, list[str]] = field(default_factory=dict)

    def median(self, case: str, attr: str = "seconds") -> float | None:
        got = [getattr(m, attr) for m in self.runs.get(case, [])]
        return statistics.median(got) if got else None


def case_name(k: int | None, compression: bool) -> str:
    if k is None:
        return "plain C-MOVE, 1 line"
    return f"dicomesh{'' if not compression else ' zstd'}, {k} repl."


def report(res: Results, study: StudyInfo, a: argparse.Namespace, load_start: str) -> bool:
    """Print the table and the targets; whether the targets are met."""
    size = study.total_bytes
    up, down = a.up / MBIT, a.down / MBIT
    print()
    print(
        f"machine: {os.cpu_count()} cores, {platform.platform()}, python "
        f"{platform.python_version()}; at start: {load_start}"
    )
    print(
        f"study: {size / 1e6:.1f} MB CT, {len(study.paths)} instances, held only by Orthanc "
        f"(the central PACS); median of {a.runs} run(s)"
    )
    print(
        f"lab: each replica's line and the PACS's line upload {up:g} Mbit/s, the clinic "
        f"downloads {down:g} Mbit/s (ADSL 0.8/3 Mbit/s x10, LAB.md), tbf latency 200 ms; "
        f"PACS + replicas on an unshaped LAN; plain routed addresses (no WireGuard)"
    )
    print(
        f"wire compression: {', '.join('on' if c else 'off' for c in a.compression)}"
        " (off: chunks travel raw, every case moves the study's own bytes)"
    )
    base = res.median(case_name(None, False))
    head = (
        f"{'case':24s} {'seconds':>8s} {'x 1 repl':>8s} {'x C-MOVE':>8s} {'1st img':>7s} "
        f"{'1st/all':>7s} {'ideal':>6s} {'/ideal':>6s} {'PACS':>5s} {'rx MB':>6s} "
        f"{'lines tx MB':>17s} {'load1':>9s}  runs (s)"
    )
    print()
    print(head)
    ok = True
    cases: list[tuple[int | None, bool]] = [(None, False)] if a.cmove else []
    cases += [(k, c) for c in a.compression for k in a.k]
    for k, comp in cases:
        name = case_name(k, comp)
        runs = res.runs.get(name, [])
        fails = res.failed.get(name, [])
        text = " ".join([f"{m.seconds:.2f}" for m in runs] + ["FAIL"] * len(fails))
        med = res.median(name)
        if med is None:
            print(f"{name:24s} {'-':>8s}  {text}")
            continue
        one = res.median(case_name(1, comp))
        first = res.median(name, "first")
        assert first is not None
        best = ideal(size, k or 1, a.up, a.down)
        last = runs[-1]
        tx = "/".join(f"{t / 1e6:.1f}" for t in last.lines_tx)
        cells = [
            f"{name:24s}",
            f"{med:8.2f}",
            f"{one / med:8.2f}" if one and k else f"{'-':>8s}",
            f"{base / med:8.2f}" if base else f"{'-':>8s}",
            f"{first:7.2f}",
            f"{first / med:7.1%}",
            f"{best:6.1f}",
            f"{med / best:6.2f}",
            f"{last.pacs_sent:5d}",
            f"{last.clinic_rx / 1e6:6.1f}",
            f"{tx:>17s}",
            f"{last.load[0]:4.2f}>{last.load[1]:4.2f}",
        ]
        print(" ".join(cells) + f"  {text}")
    print(
        "x 1 repl / x C-MOVE: speed-up (time of the 1-replica case or of the plain C-MOVE / this "
        "time); 1st img: movescu start to the first instance at the workstation; ideal: bytes / "
        f"(k x {up:g} Mbit/s x {TCP_GOODPUT}); PACS: instances Orthanc sent by C-MOVE (study: "
        f"{len(study.paths)}); rx: the clinic's line, tx: each used line (last run); load1: "
        "1-min load average before>after"
    )
    print()
    for comp in a.compression:
        three, one = res.median(case_name(3, comp)), res.median(case_name(1, comp))
        if 3 in a.k and 1 in a.k:
            if three and one:
                met = one / three >= 2.8
                ok &= met
                print(
                    f"target {case_name(3, comp)} >= 2.8 x 1 replica: {one / three:.2f} x "
                    f"-> {'MET' if met else 'NOT MET'}"
                )
            else:
                ok = False
                print(f"target {case_name(3, comp)} >= 2.8 x 1 replica: no result -> NOT MET")
        for k in a.k:
            name = case_name(k, comp)
            med, first = res.median(name), res.median(name, "first")
            if med and first is not None:
                met = first / med < 0.10
                ok &= met
                print(
                    f"target {name} first image < 10 % of the transfer: {first:.2f} s of "
                    f"{med:.2f} s = {first / med:.1%} -> {'MET' if met else 'NOT MET'}"
                )
    for name, errs in res.failed.items():
        ok = False
        print(f"FAILED {name}: {errs[0]}")
    return ok


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=30.0, help="study size, MB (1e6 bytes)")
    ap.add_argument("--runs", type=int, default=1, help="runs per case; the median is shown")
    ap.add_argument("--k", default="1,2,3", help="replica counts, e.g. 1,2,3")
    ap.add_argument("--compression", choices=["off", "on", "both"], default="off")
    ap.add_argument("--no-cmove", dest="cmove", action="store_false", help="skip the peer")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs) at the end")
    ap.add_argument("--log-level", default="info", help="the gateways' [log] level")
    ap.add_argument("--up-mbit", type=float, default=ADSL_UP_X10 / MBIT)
    ap.add_argument("--down-mbit", type=float, default=ADSL_DOWN_X10 / MBIT)
    a = ap.parse_args(argv)
    a.k = sorted({int(x) for x in a.k.split(",") if x})
    if not a.k or min(a.k) < 1 or max(a.k) > 9:
        ap.error("--k: replica counts between 1 and 9")
    a.compression = {"off": [False], "on": [True], "both": [False, True]}[a.compression]
    a.up, a.down = int(a.up_mbit * MBIT), int(a.down_mbit * MBIT)
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        log("central.py needs root: it builds network namespaces")
        return 2
    # SIGTERM unwinds like Ctrl-C: gateways, Orthanc, the lab and the temp dir all go.
    main_pid = os.getpid()
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(143) if os.getpid() == main_pid else os._exit(143)
    )
    load_start = f"load {os.getloadavg()[0]:.2f}, other heavy work: {busy()}"
    log(load_start)
    res = Results()
    cases: list[tuple[int | None, bool]] = [(None, False)] if a.cmove else []
    cases += [(k, c) for c in a.compression for k in a.k]
    work = Path(tempfile.mkdtemp(prefix="central-bench-"))
    try:
        log(f"generating a {a.size_mb:g} MB CT study ...")
        study = generate_study(work / "study", target_bytes=int(a.size_mb * 1e6), seed=11)
        with (
            CentralLab(replicas=max(a.k), up_bps=a.up, down_bps=a.down) as lab,
            NsOrthanc(lab.pacs, work / "pacs") as pacs,
        ):
            log(f"lab {lab.prefix}: loading the study into Orthanc ...")
            stored = storescu(
                LOOPBACK, pacs.dicom_port, pacs.ae_title, study.paths,
                wrapper=["ip", "netns", "exec", lab.pacs],
            )  # fmt: skip
            if not stored.ok or pacs.instances_count() != len(study.paths):
                raise RuntimeError(f"loading Orthanc failed: {stored.stderr[-800:]}")
            n = 0
            for run in range(a.runs):
                # Rotate the order so no case always runs first or last.
                order = cases[run % len(cases) :] + cases[: run % len(cases)]
                for k, comp in order:
                    name = case_name(k, comp)
                    n += 1
                    case_dir = work / f"case{n}-{'cmove' if k is None else f'k{k}'}"
                    log(f"  {name}: load {os.getloadavg()[0]:.2f}, other work: {busy()}")
                    try:
                        if k is None:
                            m = run_cmove(lab, pacs, study, case_dir)
                        else:
                            m = run_dicomesh(lab, pacs, study, k, case_dir, comp, a.log_level)
                    except Exception as exc:  # one failed case must not end the bench
                        res.failed.setdefault(name, []).append(repr(exc))
                        log(f"  {name}: FAILED {exc!r}")
                        continue
                    res.runs.setdefault(name, []).append(m)
                    log(
                        f"  {name}: {m.seconds:.2f} s, first image {m.first:.2f} s, "
                        f"PACS sent {m.pacs_sent}, clinic rx {m.clinic_rx / 1e6:.1f} MB"
                    )
                log(f"run {run + 1}/{a.runs} done")
        ok = report(res, study, a, load_start)
    finally:
        if a.keep:
            log(f"kept {work} (gateway and Orthanc logs, received files)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
