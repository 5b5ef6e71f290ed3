#!/usr/bin/env python3
"""Swarm download: dicomesh against multi-source peers on the same shaped lab, in one run.

A downloader pulls one study from k source gateways at once over ADSL-like lines (tests/lab.py:
each source uploads at 8 Mbit/s, the downloader downloads at 30 Mbit/s; LAB.md's ADSL rates x10,
tbf with a 200 ms buffer). Contenders, each a ``run_<name>(lab, data, k, fault) -> seconds``:

- dicomesh: the mesh swarm downloader: one real `dicomesh run` per namespace (tests/swarmkit.py:
  mesh address = the node's lab address, every gateway admits every other one), the study
  C-STOREd into each source by storescu inside its namespace, the downloader's catalog polled
  until it lists all k sources as complete holders, then `dicomesh fetch` on the host;
- dicomesh-raw: the same with `[mesh] wire_compression = false`: no zstd on the wire, so it
  moves the same bytes as the others (the "raw bytes" comparison);
- aria2c (Debian aria2): multi-source HTTP, the k sources as mirrors of one file, split in
  1 MiB ranges; each source runs bench/http_source.py (aiohttp, Range support);
- libtorrent (PyPI, the ``bench`` extra): k seeders and one leecher, TCP only, 512 KiB pieces
  (our chunk size), peers connected directly (bench/torrent_peer.py).

aria2c and libtorrent get the study as one file (its DICOM files concatenated: realistic bytes,
so compression would be honest); dicomesh gets the study directory. Each measurement gets a
fresh lab. Reported: completion time / T_min, T_min = bytes / min(downlink, k x uplink) (TCP
payload is ~0.957 of a tbf rate, so ~1.045 is the floor). Failure cases at k=3: one source is
lost once the downloader has received 30 % of the bytes, either killed (SIGKILL: its kernel
closes the connections) or cut (the line silently drops everything, no RST, no ICMP), and the
time is compared to the ideal: 30 % at k x uplink, then 70 % at (k-1) x uplink, TCP included.

Times: aria2c and `dicomesh fetch` from their start to their exit; libtorrent from add_torrent
(session already listening) to torrent_finished_alert. Every download is checked against the
payload's SHA-256 (dicomesh: every instance C-GET from the downloader and compared byte for
byte with the original's data set).

Compression: dicomesh sends a chunk zstd-compressed when that saves >= 10 % (generated CT:
~0.49 of the payload), so it moves fewer bytes than the payload and can beat T_min. The report
shows it as measured, with rx/payload (the downloader's line: bytes received per payload byte,
Ethernet frames) for every contender and, for dicomesh, the same bounds taken on the bytes it
has to move (notes under each table). Its 30 % loss point is taken on those bytes too.

Needs root (network namespaces) and aria2c: apt-get install -y --no-install-recommends aria2
Usage: .venv/bin/python bench/swarm.py [--runs 3] [--size-mb 40] [--k 1,2,3,4]
       [--only aria2c,libtorrent] [--faults kill,cut]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from lab import ADSL_DOWN_X10, ADSL_UP_X10, MBIT, TCP_GOODPUT, Lab, Lines, Node  # noqa: E402
from studygen import generate_study  # noqa: E402
from swarmkit import Swarm, wire_payload  # noqa: E402

LOSS_AT = 0.30  # share of the payload received when a source is lost
FAULT_K = 3
FAULTS = ("kill", "cut")
PIECE = 512 * 1024  # libtorrent piece size = dicomesh chunk size
HTTP_PORT = 8080
BT_PORT = 6881
# A full-sized TCP segment on the wire: 1448 B payload (MSS with timestamps) in a 1514 B frame.
WIRE_PER_PAYLOAD = 1514 / 1448
READY_TIMEOUT = 30.0
APT_ARIA2 = "apt-get install -y --no-install-recommends aria2"


@dataclass(frozen=True)
class Payload:
    """The study every contender moves: as DICOM files (dicomesh) and as one file (peers)."""

    study_dir: Path  # DICOM Part 10 files of one CT study
    study_uid: str
    instances: int
    file: Path  # the study's files concatenated, for aria2c/libtorrent
    size: int
    sha256: str
    work: Path  # scratch space for downloads and torrents
    wire: int  # bytes dicomesh's swarm moves for it: zstd/raw chunk frames (swarmkit)


def make_payload(work: Path, size_mb: float, seed: int = 7) -> Payload:
    """Generate a CT study of ~``size_mb`` MB and its single-file concatenation."""
    study_dir = work / "study"
    study_dir.mkdir()
    info = generate_study(study_dir, target_bytes=int(size_mb * 1e6), seed=seed)
    blob = work / "source" / "study.bin"
    blob.parent.mkdir()
    digest = hashlib.sha256()
    with blob.open("wb") as out:
        for path in info.paths:
            data = path.read_bytes()
            out.write(data)
            digest.update(data)
    return Payload(
        study_dir,
        info.study_uid,
        len(info.paths),
        blob,
        blob.stat().st_size,
        digest.hexdigest(),
        work,
        wire_payload(info.paths),
    )


# -- reference times ----------------------------------------------------------------------------


def t_min(size: int, k: int, up_bps: int, down_bps: int) -> float:
    """Line-rate bound: bytes / min(downlink, k x uplink), without TCP overhead."""
    return size * 8 / min(down_bps, k * up_bps)


def ideal_after_loss(size: int, k: int, up_bps: int, down_bps: int, at: float = LOSS_AT) -> float:
    """Best possible time when one of k sources is lost at ``at`` of the bytes, TCP included."""
    before = at * size * 8 / (TCP_GOODPUT * min(down_bps, k * up_bps))
    after = (1 - at) * size * 8 / (TCP_GOODPUT * min(down_bps, (k - 1) * up_bps))
    return before + after


# -- shared plumbing ----------------------------------------------------------------------------


@contextlib.contextmanager
def lose_source(
    lab: Lab,
    data: Payload,
    fault: str | None,
    victim: Node,
    proc: subprocess.Popen | None,
    *,
    kill: Callable[[], None] | None = None,
    moved: int | None = None,
) -> Iterator[None]:
    """Around a download: once the downloader has received ``LOSS_AT`` of the payload (its link
    byte counter, frames converted to TCP payload), kill ``proc`` or cut ``victim``'s line.

    ``kill`` replaces killing ``proc`` (for a process the lab did not start); ``moved`` is
    what the contender moves for the payload when that is not ``data.size`` (compression).
    """
    if fault is None:
        yield
        return
    if fault not in FAULTS:
        raise ValueError(f"fault {fault!r}: one of {FAULTS}")
    base = lab.link_bytes(lab.downloader)[0]
    moved = moved or data.size
    threshold = LOSS_AT * moved * WIRE_PER_PAYLOAD
    done = threading.Event()
    fired: list[float] = []

    def watch() -> None:
        start = time.monotonic()
        while not done.wait(0.02):  # bounded by the download: `done` is set when it ends
            received = lab.link_bytes(lab.downloader)[0] - base
            if received >= threshold:
                if fault == "kill" and kill is not None:
                    kill()
                elif fault == "kill":
                    assert proc is not None
                    lab.kill(proc)
                else:
                    lab.cut(victim)
                fired.append(time.monotonic() - start)
                log(
                    f"    {fault} {victim.label} at {received / WIRE_PER_PAYLOAD / moved:.1%}"
                    f" ({fired[0]:.1f} s)"
                )
                return

    watcher = threading.Thread(target=watch, name="lose-source", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(timeout=10)
    if not fired:
        raise RuntimeError(f"download ended before {LOSS_AT:.0%}: no {fault} happened")


def start_ready(lab: Lab, node: Node, args: list[str]) -> subprocess.Popen:
    """Start a server in ``node``'s namespace and wait for its READY line."""
    proc = lab.popen(node, args, stdout=subprocess.PIPE, text=True)
    Lines(proc).wait_for("READY", READY_TIMEOUT)
    return proc


def verify(path: Path, data: Payload) -> None:
    """The downloaded file must be the payload, byte for byte."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != data.sha256:
        raise RuntimeError(f"{path}: content differs from the payload")


def deadline_for(lab: Lab, data: Payload, k: int) -> float:
    """Generous per-download time limit: 3x the slowest reference time, plus startup."""
    return 3 * ideal_after_loss(data.size, max(k, 2), lab.up_bps, lab.down_bps) + 30


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- contenders ---------------------------------------------------------------------------------


def run_dicomesh(
    lab: Lab, data: Payload, k: int, fault: str | None, *, compression: bool = True
) -> float:
    """dicomesh swarm: k gateways holding ``data.study_dir``, the downloader pulls the study
    with `dicomesh fetch` (timed from its start to its exit); victim: the first source's
    gateway (SIGKILL) or line (cut). compression=False: `[mesh] wire_compression = false`,
    so it moves the same bytes as the others."""
    work = Path(tempfile.mkdtemp(prefix="dicomesh-", dir=data.work))
    victim = lab.sources[0]
    moved = data.wire if compression else data.size
    with Swarm(lab, work / "gw", wire_compression=compression) as swarm:
        swarm.store(data.study_dir, lab.sources)
        swarm.wait_held(data.study_uid, lab.sources, data.instances, timeout=READY_TIMEOUT)
        with lose_source(lab, data, fault, victim, None,
                         kill=lambda: swarm.kill(victim), moved=moved):  # fmt: skip
            run = swarm.fetch(data.study_uid, deadline_for(lab, data, k))
        if run.returncode != 0:
            tail = swarm.downloader.log()[-1500:]
            raise RuntimeError(f"dicomesh fetch exit {run.returncode}: {run.output[-300:]}\n{tail}")
        problems = swarm.mismatches(sorted(data.study_dir.iterdir()), work / "got")
    if problems:
        raise RuntimeError(f"dicomesh: {len(problems)} instance(s) wrong: {problems[:3]}")
    shutil.rmtree(work)
    return run.seconds


def run_aria2c(lab: Lab, data: Payload, k: int, fault: str | None) -> float:
    """aria2c: one file from k HTTP mirrors, 1 MiB splits, one connection per source."""
    server = [sys.executable, str(HERE / "http_source.py")]
    servers = [
        start_ready(lab, s, [*server, str(data.file), s.addr, str(HTTP_PORT)]) for s in lab.sources
    ]
    out = Path(tempfile.mkdtemp(prefix="aria2c-", dir=data.work))
    urls = [f"http://{s.addr}:{HTTP_PORT}/{data.file.name}" for s in lab.sources]
    cmd = [
        "aria2c", "--no-conf", "--dir", str(out), "--out", data.file.name,
        "--min-split-size=1M",  # -k: without it aria2c does not split a 40 MB file at all
        f"--split={k}", "--max-connection-per-server=1",  # -s/-x: one range stream per source
        "--file-allocation=none", "--allow-overwrite=true", "--auto-file-renaming=false",
        "--summary-interval=0", "--console-log-level=warn", "--download-result=hide",
        "--connect-timeout=5", "--timeout=5", "--max-tries=0", "--retry-wait=1",
        *urls,
    ]  # fmt: skip
    limit = deadline_for(lab, data, k)
    with lose_source(lab, data, fault, lab.sources[0], servers[0]):
        start = time.monotonic()
        proc = lab.popen(
            lab.downloader, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            output, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            lab.stop(proc)
            raise RuntimeError(f"aria2c still running after {limit:.0f} s") from None
        seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"aria2c exit {proc.returncode}: {output.strip()[-500:]}")
    verify(out / data.file.name, data)
    shutil.rmtree(out)
    return seconds


def make_torrent(data: Payload) -> Path:
    """A v1 .torrent of the payload file with 512 KiB pieces (made once per payload)."""
    path = data.work / "study.torrent"
    if not path.exists():
        import libtorrent as lt

        files = lt.list_files(str(data.file))
        ct = lt.create_torrent(files, PIECE, flags=lt.create_torrent.v1_only)
        lt.set_piece_hashes(ct, str(data.file.parent))
        path.write_bytes(lt.bencode(ct.generate()))
    return path


def run_libtorrent(lab: Lab, data: Payload, k: int, fault: str | None) -> float:
    """libtorrent: k seeders, one leecher connecting to all of them (TCP, no tracker)."""
    torrent = make_torrent(data)
    peer = [sys.executable, str(HERE / "torrent_peer.py")]
    port = str(BT_PORT)
    seeders = [
        start_ready(lab, s, [*peer, "seed", str(torrent), str(data.file.parent), s.addr, port])
        for s in lab.sources
    ]
    out = Path(tempfile.mkdtemp(prefix="libtorrent-", dir=data.work))
    limit = deadline_for(lab, data, k)
    d = lab.downloader
    cmd = [*peer, "leech", str(torrent), str(out), d.addr, str(BT_PORT), "--timeout", str(limit)]
    cmd += [f"--peer={s.addr}:{BT_PORT}" for s in lab.sources]
    with lose_source(lab, data, fault, lab.sources[0], seeders[0]):
        leecher = lab.popen(d, cmd, stdout=subprocess.PIPE, text=True)
        result = Lines(leecher).json(timeout=limit + READY_TIMEOUT)
    if not result or "error" in result:
        raise RuntimeError(f"libtorrent leecher: {result or f'exit {leecher.wait()}'}")
    verify(out / data.file.name, data)
    lab.stop(leecher)
    shutil.rmtree(out)
    return result["done"] - result["start"]


CONTENDERS: dict[str, Callable[[Lab, Payload, int, str | None], float]] = {
    "dicomesh": run_dicomesh,
    "dicomesh-raw": functools.partial(run_dicomesh, compression=False),
    "aria2c": run_aria2c,
    "libtorrent": run_libtorrent,
}


# -- runs and report ----------------------------------------------------------------------------


@dataclass
class Results:
    runs: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (case, who) -> s
    failed: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # who -> why
    rx: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # downloader link rx, B

    def rx_share(self, case: str, who: str, size: int) -> str:
        """Median bytes the downloader's line received per payload byte, as text."""
        got = self.rx.get((case, who))
        return f"{statistics.median(got) / size:.3f}" if got else "-"

    def cell(self, case: str, who: str) -> tuple[float | None, str]:
        """(median seconds or None, all runs as text)."""
        secs = self.runs.get((case, who), [])
        fails = self.failed.get((case, who), [])
        text = " ".join([f"{s:.2f}" for s in secs] + ["FAIL"] * len(fails))
        return (statistics.median(secs) if secs else None), text


def measure_one(
    res: Results,
    who: str,
    case: str,
    k: int,
    fault: str | None,
    data: Payload,
    a: argparse.Namespace,
) -> None:
    if who in res.skipped:
        return
    try:
        with Lab(k=k, up_bps=a.up, down_bps=a.down) as lab:
            rx0 = lab.link_bytes(lab.downloader)[0]
            seconds = CONTENDERS[who](lab, data, k, fault)
            rx = lab.link_bytes(lab.downloader)[0] - rx0
    except NotImplementedError as exc:
        res.skipped[who] = str(exc)
        log(f"  {who}: skipped ({exc})")
        return
    except Exception as exc:  # one failed download must not end the whole bench
        res.failed.setdefault((case, who), []).append(repr(exc))
        log(f"  {case} {who}: FAILED {exc!r}")
        return
    res.runs.setdefault((case, who), []).append(seconds)
    res.rx.setdefault((case, who), []).append(rx)
    log(f"  {case} {who}: {seconds:.2f} s, downloader received {rx / 1e6:.1f} MB")


def report(res: Results, data: Payload, who: list[str], a: argparse.Namespace) -> None:
    up, down = a.up / MBIT, a.down / MBIT
    print()
    print(
        f"machine: {os.cpu_count()} cores, {platform.platform()}, python "
        f"{platform.python_version()}"
    )
    print(
        f"payload: {data.size / 1e6:.1f} MB CT study ({data.instances} instances; one file "
        f"for aria2c/libtorrent), median of {a.runs} run(s)"
    )
    print(
        f"lab: sources upload {up:g} Mbit/s, downloader downloads {down:g} Mbit/s, tbf "
        f"latency 200 ms (ADSL x10, LAB.md); TCP goodput {TCP_GOODPUT} of a link -> ratio "
        f"floor {1 / TCP_GOODPUT:.3f}"
    )
    for name, why in res.skipped.items():
        print(f"{name}: SKIPPED ({why})")
    for name in CONTENDERS:
        if name not in who:
            print(f"{name}: not run (left out by --only)")
    shown = [w for w in who if w not in res.skipped]
    for k in a.k:
        tm = t_min(data.size, k, a.up, a.down)
        print(f"\nk={k}: T_min = {tm:.2f} s (bytes / min({down:g}, {k} x {up:g} Mbit/s))")
        print(f"  {'contender':12s} {'seconds':>8s} {'/T_min':>7s} {'rx/payload':>10s}  runs (s)")
        for w in shown:
            med, runs = res.cell(f"k={k}", w)
            rx = res.rx_share(f"k={k}", w, data.size)
            if med is None:
                print(f"  {w:12s} {'-':>8s} {'-':>7s} {rx:>10s}  {runs}")
            else:
                print(f"  {w:12s} {med:8.2f} {med / tm:7.3f} {rx:>10s}  {runs}")
        for w in who:
            if w in res.skipped:
                print(f"  {w:12s} {'skipped':>8s}")
        med, _ = res.cell(f"k={k}", "dicomesh")
        if med is not None:
            tw = t_min(data.wire, k, a.up, a.down)
            print(
                f"  note: dicomesh moves {data.wire / 1e6:.1f} MB of chunk frames (zstd where it "
                f"saves >= 10 %); T_min on those bytes {tw:.2f} s -> ratio {med / tw:.3f}"
            )
    if a.faults:
        ideal = ideal_after_loss(data.size, FAULT_K, a.up, a.down)
        print(
            f"\nfailure, k={FAULT_K}, one source lost at {LOSS_AT:.0%} of the bytes: ideal "
            f"{ideal:.2f} s ({LOSS_AT:.0%} at {FAULT_K} x {up:g}, then {1 - LOSS_AT:.0%} at "
            f"{FAULT_K - 1} x {up:g} Mbit/s, x{TCP_GOODPUT} TCP)"
        )
        head = "".join(f" {f + ' (s)':>9s} {'/ideal':>7s} {'rx/pl':>6s}" for f in a.faults)
        print(f"  {'contender':12s}{head}  runs (s)")
        for w in shown:
            cells, runs = "", []
            for f in a.faults:
                med, text = res.cell(f, w)
                rx = res.rx_share(f, w, data.size)
                cells += (
                    f" {med:9.2f} {med / ideal:7.3f} {rx:>6s}"
                    if med
                    else f" {'-':>9s} {'-':>7s} {rx:>6s}"
                )
                runs.append(f"{f}: {text}")
            print(f"  {w:12s}{cells}  {'; '.join(runs)}")
        for w in who:
            if w in res.skipped:
                print(f"  {w:12s} {'skipped':>9s}")
        wire_ideal = ideal_after_loss(data.wire, FAULT_K, a.up, a.down)
        meds = [(f, res.cell(f, "dicomesh")[0]) for f in a.faults]
        if any(m is not None for _, m in meds):
            ratios = ", ".join(f"{f} {m / wire_ideal:.3f}" for f, m in meds if m is not None)
            print(
                f"  note: the same ideal on dicomesh's {data.wire / 1e6:.1f} MB of chunk frames "
                f"is {wire_ideal:.2f} s -> dicomesh {ratios} (its loss point: 30 % of those)"
            )
    print(
        "rx/payload (rx/pl): bytes the downloader's line received (Ethernet frames: headers, "
        "retransmits, duplicates included) per payload byte"
    )
    for (case, w), errs in res.failed.items():
        print(f"FAILED {case} {w}: {errs[0]}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="runs per case; the median is shown")
    ap.add_argument("--size-mb", type=float, default=40.0, help="study size, MB (1e6 bytes)")
    ap.add_argument("--k", default="1,2,3,4", help="source counts, e.g. 1,2,3,4")
    ap.add_argument("--only", default=",".join(CONTENDERS), help="contenders, comma-separated")
    ap.add_argument("--faults", default=",".join(FAULTS), help="kill,cut or none")
    ap.add_argument("--up-mbit", type=float, default=ADSL_UP_X10 / MBIT)
    ap.add_argument("--down-mbit", type=float, default=ADSL_DOWN_X10 / MBIT)
    a = ap.parse_args(argv)
    a.k = [int(x) for x in a.k.split(",") if x]
    a.only = [x for x in a.only.split(",") if x]
    a.faults = [] if a.faults == "none" else [x for x in a.faults.split(",") if x]
    a.up, a.down = int(a.up_mbit * MBIT), int(a.down_mbit * MBIT)
    unknown = [x for x in a.only if x not in CONTENDERS] + [f for f in a.faults if f not in FAULTS]
    if unknown:
        ap.error(f"unknown {unknown}; contenders {list(CONTENDERS)}, faults {list(FAULTS)}")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("swarm.py needs root: it builds network namespaces (tests/lab.py)", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C: every lab and the scratch directory are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    who = list(a.only)
    res = Results()
    if "aria2c" in who and shutil.which("aria2c") is None:
        res.skipped["aria2c"] = f"aria2c not installed: {APT_ARIA2}"
    if "libtorrent" in who:
        try:
            import libtorrent  # noqa: F401
        except ImportError:
            res.skipped["libtorrent"] = "not installed: .venv/bin/pip install -e '.[bench]'"
    cases = [(f"k={k}", k, None) for k in a.k] + [(f, FAULT_K, f) for f in a.faults]
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        log(f"generating a {a.size_mb:g} MB CT study ...")
        data = make_payload(Path(tmp), a.size_mb)
        for run in range(a.runs):
            for case, k, fault in cases:
                # Rotate the order so no contender always runs first (cold caches) or last.
                order = who[run % len(who) :] + who[: run % len(who)]
                for w in order:
                    measure_one(res, w, case, k, fault, data, a)
            log(f"run {run + 1}/{a.runs} done")
        report(res, data, who, a)
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
