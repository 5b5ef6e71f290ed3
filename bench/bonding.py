#!/usr/bin/env python3
"""Bonded uplinks: what a clinic's three ADSL lines give the swarm, against one line and
against Linux MPTCP over the same three tunnels, in one run on one lab.

The lab (tests/netswarmkit.py on tests/netlab.py): a clinic gateway with 3 lines, each
downloading at 8 Mbit/s (LAB.md's ADSL x10, tbf with a 200 ms buffer on the ISP side), and 3
peer sites on unshaped lines; real `dicomesh run` gateways in their namespaces, each bringing
up its own wireguard-go tunnels (one per clinic line) and policy routing. Wire compression is
off, so every contender moves the same bytes.

Cases (the study held complete by all 3 sites; times from start to exit of `dicomesh fetch`):
- dicomesh, 3 lines: one swarm path per (site, line), 9 in all;
- dicomesh, 1 line: lines 2 and 3 cut (the bridge port drops everything) and declared down
  by the clinic's health monitor before the fetch starts;
- dicomesh, line 1 cut once 30 % of the bytes arrived: compared with the ideal of 30 % at 3
  lines then 70 % at 2 (an uplink failure should cost no more than its share);
- MPTCP, 3 tunnels: each site sends a third of the bytes over one MPTCP connection to the
  clinic (in-kernel path manager: `ip mptcp endpoint ... subflow` for the clinic's 2nd and 3rd
  tunnel addresses, so each connection has one subflow per tunnel, i.e. per line).

Goodput = payload bits / seconds; "/lines" divides it by the sum of the usable lines' rates
(TCP through WireGuard reaches ~0.917 of a line: LAB.md). Targets: 3 lines >= 2.85 x 1 line,
and dicomesh >= MPTCP.

Needs root (namespaces), wireguard-go, dcmtk. Run as a script inside a namespace, this file is
also the MPTCP sender/receiver (``mptcp-send`` / ``mptcp-recv``).
Usage: .venv/bin/python bench/bonding.py [--size-mb 30] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

if TYPE_CHECKING:  # tests/ helpers: imported when a bench runs (they need root and the lab)
    from netswarmkit import BondedClinic
    from studygen import StudyInfo

LINES = 3
CUT_AT = 0.30
MPTCP_PORT = 9100
FETCH_TIMEOUT = 300.0
IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)


@dataclass(frozen=True)
class Case:
    name: str
    payload: int
    seconds: float
    lines: int  # usable lines (for /lines)
    rx: list[int]  # bytes received per clinic line
    ideal: float | None = None  # the time it should take (failure case)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- MPTCP sender / receiver (run inside namespaces) -------------------------------------------


def _mptcp_send(addr: str, port: int, nbytes: int) -> int:
    """Accept one MPTCP connection on addr:port, send `nbytes`, close; prints READY first."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    srv.settimeout(120)
    print("READY", flush=True)
    conn, _ = srv.accept()
    block = os.urandom(1 << 16)
    left = nbytes
    with conn:
        while left > 0:
            n = conn.send(block[: min(left, len(block))])
            left -= n
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait for the receiver to close: everything was delivered
    srv.close()
    return 0


def _mptcp_recv(targets: list[str], port: int) -> int:
    """Connect to every addr over MPTCP at once, read each to EOF; print the time taken."""
    results: dict[str, int] = {}
    errors: list[str] = []

    def one(addr: str) -> None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP) as s:
                s.settimeout(120)
                s.connect((addr, port))
                total = 0
                while chunk := s.recv(1 << 16):
                    total += len(chunk)
                results[addr] = total
        except OSError as exc:
            errors.append(f"{addr}: {exc}")

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(a,)) for a in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    print(json.dumps({"seconds": time.monotonic() - start, "bytes": results, "errors": errors}))
    return 1 if errors else 0


# -- the cases ------------------------------------------------------------------------------


def run_mptcp(b: BondedClinic, payload: int) -> Case:
    """Each site sends payload/3 over one MPTCP connection with a subflow per clinic tunnel."""
    from netswarmkit import clinic_overlay, site_overlay

    lab = b.lab
    clinic_ns = lab.clinic
    tunnels = [f"{lab.wg_prefix}c{i}" for i in range(LINES)]
    cmds = [["ip", "-n", clinic_ns, "mptcp", "limits", "set", "subflow", "8",
             "add_addr_accepted", "0"]]  # fmt: skip
    for i in range(1, LINES):
        cmds.append(["ip", "-n", clinic_ns, "mptcp", "endpoint", "add", clinic_overlay(i + 1),
                     "dev", tunnels[i], "subflow"])  # fmt: skip
    for line in lab.site_lines:
        cmds.append(["ip", "-n", line.ns, "mptcp", "limits", "set", "subflow", "8",
                     "add_addr_accepted", "8"])  # fmt: skip
    for cmd in cmds:
        subprocess.run(cmd, check=True, capture_output=True)
    share = payload // len(lab.site_lines)
    senders = []
    try:
        for j, line in enumerate(lab.site_lines, start=1):
            proc = lab.popen(
                line.ns,
                [sys.executable, __file__, "mptcp-send", site_overlay(j), str(MPTCP_PORT),
                 str(share)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            senders.append(proc)
        for proc in senders:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("an MPTCP sender did not start")
        rx0 = b.rx_bytes()
        targets = [site_overlay(j) for j in range(1, len(lab.site_lines) + 1)]
        done = subprocess.run(
            ["ip", "netns", "exec", clinic_ns, sys.executable, __file__, "mptcp-recv",
             str(MPTCP_PORT), *targets],
            capture_output=True, text=True, timeout=FETCH_TIMEOUT,
        )  # fmt: skip
        rx = [a - z for a, z in zip(b.rx_bytes(), rx0, strict=True)]
        report = json.loads(done.stdout)
        if report["errors"] or sum(report["bytes"].values()) != share * len(targets):
            raise RuntimeError(f"MPTCP transfer incomplete: {report}")
    finally:
        for proc in senders:
            proc.wait(timeout=30)
        subprocess.run(["ip", "-n", clinic_ns, "mptcp", "endpoint", "flush"], capture_output=True)
    return Case("MPTCP, 3 tunnels", share * len(targets), report["seconds"], LINES, rx)


def run_fetch(b: BondedClinic, info: StudyInfo, name: str, lines: int, outdir: Path) -> Case:
    run = b.fetch(info.study_uid, FETCH_TIMEOUT)
    if run.returncode != 0:
        raise RuntimeError(f"{name}: dicomesh fetch failed: {run.output[-500:]}")
    outdir.mkdir()
    problems = b.mismatches(info.paths, outdir)
    if problems:
        raise RuntimeError(f"{name}: {problems[:3]}")
    return Case(name, info.total_bytes, run.seconds, lines, run.rx)


def run_cut(b: BondedClinic, info: StudyInfo, outdir: Path) -> Case:
    from netswarmkit import LINE_BPS, WG_GOODPUT, when_received

    lab = b.lab
    try:
        with when_received(b, int(CUT_AT * info.total_bytes), lambda: lab.cut(1)) as fired:
            case = run_fetch(b, info, "dicomesh, line 1 cut at 30 %", LINES, outdir)
        if not fired:
            raise RuntimeError("the fetch ended before the cut")
    finally:
        lab.restore(1)
    rate = WG_GOODPUT * LINE_BPS / 8
    ideal = CUT_AT * info.total_bytes / (LINES * rate)
    ideal += (1 - CUT_AT) * info.total_bytes / ((LINES - 1) * rate)
    return Case(case.name, case.payload, case.seconds, LINES, case.rx, ideal)


def run_one_line(b: BondedClinic, info: StudyInfo, outdir: Path) -> Case:
    lab = b.lab
    try:
        for i in (2, 3):
            lab.cut(i)
        deadline = time.monotonic() + 20
        while any(b.uplink_state(f"adsl{i}") != "down" for i in (2, 3)):
            if time.monotonic() > deadline:
                raise RuntimeError("lines 2 and 3 were not declared down")
            time.sleep(0.1)
        return run_fetch(b, info, "dicomesh, 1 line", 1, outdir)
    finally:
        for i in (2, 3):
            lab.restore(i)


# -- report ---------------------------------------------------------------------------------


def report(cases: dict[str, Case], line_bps: int) -> None:
    print()
    print(f"Clinic: {LINES} lines at {line_bps / 1e6:g} Mbit/s down each (ADSL x10), 3 peer "
          "sites, WireGuard tunnels (wireguard-go), wire compression off.")  # fmt: skip
    print(f"{'case':34s} {'MB':>6s} {'seconds':>8s} {'Mbit/s':>7s} {'/lines':>7s}  "
          "received per line (MB)")  # fmt: skip
    for c in cases.values():
        goodput = c.payload * 8 / c.seconds
        per_line = " ".join(f"{r / 1e6:5.1f}" for r in c.rx)
        print(f"{c.name:34s} {c.payload / 1e6:6.1f} {c.seconds:8.2f} {goodput / 1e6:7.2f} "
              f"{goodput / (c.lines * line_bps):7.3f}  {per_line}")  # fmt: skip
    three, one = cases.get("three"), cases.get("one")
    mptcp, cut = cases.get("mptcp"), cases.get("cut")

    def gp(c: Case) -> float:
        return c.payload / c.seconds

    print()
    if three and one:
        r = gp(three) / gp(one)
        print(f"3 lines / 1 line (dicomesh):        {r:.3f}x   (target >= 2.85)")
    if three and mptcp:
        r = gp(three) / gp(mptcp)
        print(f"dicomesh / MPTCP, 3 lines:          {r:.3f}x   (target >= 1)")
    if mptcp and one:
        print(f"MPTCP 3 tunnels / dicomesh 1 line:  {gp(mptcp) / gp(one):.3f}x")
    if cut and cut.ideal:
        print(f"line 1 cut at 30 %: {cut.seconds:.2f} s, ideal {cut.ideal:.2f} s "
              f"(30 % at 3 lines, 70 % at 2): x{cut.seconds / cut.ideal:.3f}")  # fmt: skip


def main(argv: list[str]) -> int:
    if argv[:1] == ["mptcp-send"]:
        return _mptcp_send(argv[1], int(argv[2]), int(argv[3]))
    if argv[:1] == ["mptcp-recv"]:
        return _mptcp_recv(argv[2:], int(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=30.0, help="study size (default 30)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bonding.py needs root: it builds network namespaces", file=sys.stderr)
        return 2
    if shutil.which("wireguard-go") is None:
        print("bonding.py needs wireguard-go (apt-get install --no-install-recommends "
              "wireguard-go)", file=sys.stderr)  # fmt: skip
        return 2
    from netswarmkit import LINE_BPS, BondedClinic
    from studygen import generate_study

    work = Path(tempfile.mkdtemp(prefix="dm-bonding-"))
    cases: dict[str, Case] = {}
    try:
        studies = {}
        for n, name in enumerate(("three", "cut", "one")):
            directory = work / f"study-{name}"
            directory.mkdir()
            studies[name] = generate_study(
                directory, target_bytes=int(a.size_mb * 1e6), seed=700 + n
            )
        log(f"studies generated in {work}")
        with BondedClinic(work / "gw") as b:
            for name in studies:
                b.store(work / f"study-{name}")
            for info in studies.values():
                b.wait_held(info.study_uid, len(info.paths))
            log("gateways up, studies held by all 3 sites")
            cases["three"] = run_fetch(b, studies["three"], "dicomesh, 3 lines", LINES,
                                       work / "got-three")  # fmt: skip
            log(f"3 lines: {cases['three'].seconds:.2f} s")
            cases["mptcp"] = run_mptcp(b, studies["three"].total_bytes)
            log(f"MPTCP: {cases['mptcp'].seconds:.2f} s")
            cases["cut"] = run_cut(b, studies["cut"], work / "got-cut")
            log(f"cut: {cases['cut'].seconds:.2f} s")
            deadline = time.monotonic() + 20
            while b.uplink_state("adsl1") == "down" and time.monotonic() < deadline:
                time.sleep(0.1)
            cases["one"] = run_one_line(b, studies["one"], work / "got-one")
            log(f"1 line: {cases['one'].seconds:.2f} s")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(cases, LINE_BPS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
