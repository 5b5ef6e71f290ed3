#!/usr/bin/env python3
"""Ingest and retrieval throughput: dicomesh against DICOM peers, measured in the same run.

Ingest: DCMTK storescu sends a directory over ONE association (`+sd`) to each target, which
starts empty for every run; we time storescu's whole run. Targets: dicomesh (durable LMDB
commits, hashing, indexing), DCMTK storescp (writes files, no fsync), Orthanc (Debian package,
its default fsync on) and a bare pynetdicom SCP writing received bytes without fsync.
Retrieval: getscu C-GET of the whole study, and movescu C-MOVE to a storescp, from dicomesh and
from Orthanc.

Debian's DCMTK and Orthanc leave Nagle's algorithm on, which stalls every image by a delayed
ACK; like the reference measurements we export TCP_NODELAY=1 for them unless --nagle is given.

Usage: .venv/bin/python bench/ingest.py [--runs 3] [--slices 300] [--study-gb 1.0] [--no-study]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from dcmtk import StoreSCP, getscu, movescu, storescu  # noqa: E402
from gateway import Gateway  # noqa: E402
from orthanc import Orthanc  # noqa: E402
from procs import free_port, stop_process, wait_for_port  # noqa: E402
from studygen import generate_ct_series, generate_study  # noqa: E402


@dataclass
class Target:
    """A started, empty DICOM receiver."""

    name: str
    host: str
    port: int
    ae_title: str


@dataclass
class Results:
    runs: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (test, peer) -> s

    def add(self, test: str, peer: str, seconds: float) -> None:
        self.runs.setdefault((test, peer), []).append(seconds)


# -- targets ----------------------------------------------------------------------------------
# Each target starts empty; `dest` is the storescp C-MOVE destination it must know about.


@contextmanager
def dicomesh(work: Path, nagle: bool, dest: StoreSCP) -> Iterator[Target]:
    node = {"ae_title": dest.ae_title, "host": dest.host, "port": dest.port}
    gw = Gateway(work / "dicomesh", dicom={"nodes": [node]}).start()
    try:
        yield Target("dicomesh", gw.host, gw.port, gw.ae_title)
    finally:
        gw.stop()


@contextmanager
def orthanc(work: Path, nagle: bool, dest: StoreSCP) -> Iterator[Target]:
    modalities = {"movedest": (dest.ae_title, dest.host, dest.port)}
    with Orthanc(work / "orthanc", modalities=modalities, tcp_nodelay=not nagle) as pacs:
        yield Target("orthanc", "127.0.0.1", pacs.dicom_port, pacs.ae_title)


@contextmanager
def storescp(work: Path, nagle: bool, dest: StoreSCP) -> Iterator[Target]:
    with StoreSCP(work / "storescp", ae_title="STORESCP", tcp_nodelay=not nagle) as scp:
        yield Target("storescp", scp.host, scp.port, scp.ae_title)


@contextmanager
def bare_pynetdicom(work: Path, nagle: bool, dest: StoreSCP) -> Iterator[Target]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "bare_scp.py"), str(port), str(work / "bare")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, 30, proc=proc)
        yield Target("pynetdicom-bare", "127.0.0.1", port, "BARE")
    finally:
        stop_process(proc)


PEERS: dict[str, Callable] = {
    "dicomesh": dicomesh,
    "orthanc": orthanc,
    "storescp": storescp,
    "pynetdicom-bare": bare_pynetdicom,
}
RETRIEVERS = ("dicomesh", "orthanc")


# -- measurements ---------------------------------------------------------------------------


def ingest(target: Target, data: Path, nagle: bool) -> float:
    run = storescu(
        target.host, target.port, target.ae_title, data, tcp_nodelay=not nagle, timeout=3600
    )
    if not run.ok:
        failed = [(p.name, s) for p, s in run.results if s != 0][:3]
        raise RuntimeError(f"{target.name}: storescu failed (rc {run.returncode}) {failed}")
    return run.seconds


def retrieve_get(target: Target, study_uid: str, out: Path, expected: int, nagle: bool) -> float:
    out.mkdir()
    start = time.monotonic()
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"]
    getscu(target.host, target.port, target.ae_title, keys, out, timeout=3600,
           tcp_nodelay=not nagle)  # fmt: skip
    seconds = time.monotonic() - start
    got = len(list(out.iterdir()))
    shutil.rmtree(out)
    if got != expected:
        raise RuntimeError(f"{target.name}: C-GET returned {got} of {expected} instances")
    return seconds


def retrieve_move(
    target: Target, study_uid: str, dest: StoreSCP, expected: int, nagle: bool
) -> float:
    start = time.monotonic()
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"]
    movescu(target.host, target.port, target.ae_title, keys, dest.ae_title, timeout=3600,
            tcp_nodelay=not nagle)  # fmt: skip
    seconds = time.monotonic() - start
    files = dest.files()
    for f in files:
        f.unlink()
    if len(files) != expected:
        raise RuntimeError(f"{target.name}: C-MOVE delivered {len(files)} of {expected}")
    return seconds


def measure(
    name: str, data: Path, study_uid: str, runs: int, nagle: bool, peers: list[str], res: Results
) -> None:
    count = len(list(data.iterdir()))
    for run in range(runs):
        # Rotate the order so no peer always runs first (cold caches) or last.
        order = peers[run % len(peers) :] + peers[: run % len(peers)]
        for peer in order:
            with tempfile.TemporaryDirectory(prefix=f"bench-{peer}-") as tmp_name:
                tmp = Path(tmp_name)
                dest_scp = StoreSCP(tmp / "movedest", ae_title="MOVEDEST", tcp_nodelay=not nagle)
                with dest_scp as dest, PEERS[peer](tmp, nagle, dest) as target:
                    res.add(f"ingest {name}", peer, ingest(target, data, nagle))
                    if peer in RETRIEVERS:
                        get_s = retrieve_get(target, study_uid, tmp / "get", count, nagle)
                        res.add(f"C-GET {name}", peer, get_s)
                        move_s = retrieve_move(target, study_uid, dest, count, nagle)
                        res.add(f"C-MOVE {name}", peer, move_s)
            print(f"  {name}: run {run + 1}/{runs} {peer} done", file=sys.stderr, flush=True)


# -- report --------------------------------------------------------------------------------


def report(res: Results, sizes: dict[str, tuple[int, int]]) -> None:
    print()
    python = platform.python_version()
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, python {python}")
    tests = list(dict.fromkeys(test for test, _ in res.runs))
    for test in tests:
        data_name = test.split(" ", 1)[1]
        nbytes, count = sizes[data_name]
        print(f"\n{test}: {count} instances, {nbytes / 1e6:.0f} MB")
        rows = []
        for (t, peer), secs in res.runs.items():
            if t != test:
                continue
            med = statistics.median(secs)
            rows.append((peer, nbytes / 1e6 / med, count / med, secs))
        ours = next((r[1] for r in rows if r[0] == "dicomesh"), None)
        print(f"  {'peer':16s} {'MB/s':>8s} {'images/s':>9s} {'dicomesh/peer':>14s}  runs (s)")
        for peer, mbps, ips, secs in rows:
            ratio = f"{ours / mbps:.2f}" if ours else "-"
            runs = " ".join(f"{s:.2f}" for s in secs)
            print(f"  {peer:16s} {mbps:8.1f} {ips:9.1f} {ratio:>14s}  {runs}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300, help="CT series size (512x512)")
    parser.add_argument("--study-gb", type=float, default=1.0, help="multi-series study size")
    parser.add_argument("--no-study", action="store_true", help="skip the ~1 GB study")
    parser.add_argument("--nagle", action="store_true", help="leave Nagle on for DCMTK/Orthanc")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset")
    parser.add_argument("--data", type=Path, help="where to keep generated data (reused)")
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}")

    data_root = args.data or Path(tempfile.gettempdir()) / "dicomesh-bench-data"
    res = Results()
    sizes: dict[str, tuple[int, int]] = {}
    datasets = [(f"series {args.slices}x512x512", "series", None)]
    if not args.no_study:
        datasets.append((f"study {args.study_gb:g} GB", "study", args.study_gb))
    for label, kind, gb in datasets:
        path = data_root / (f"series-{args.slices}" if kind == "series" else f"study-{gb:g}gb")
        uid_file = path.with_suffix(".uid")
        if not uid_file.exists():
            shutil.rmtree(path, ignore_errors=True)
            print(f"generating {label} in {path} ...", file=sys.stderr, flush=True)
            if kind == "series":
                info = generate_ct_series(path, args.slices, seed=101)
            else:
                info = generate_study(path, target_bytes=int(gb * 1e9), seed=202)
            uid_file.write_text(info.study_uid)
        files = list(path.iterdir())
        sizes[label] = (sum(f.stat().st_size for f in files), len(files))
        measure(label, path, uid_file.read_text(), args.runs, args.nagle, peers, res)
    print(f"\nTCP_NODELAY for DCMTK/Orthanc: {'off (Nagle on)' if args.nagle else 'on'}")
    report(res, sizes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
