#!/usr/bin/env python3
"""Bonded uplinks: what a clinic's three ADSL lines give the swarm, against one line and
against Linux MPTCP over the same three tunnels, in one run on one lab.

The lab (tests/netswarmkit.py on tests/netlab.py): a clinic gateway with 3 lines, each
downloading at 8 Mbit/s (LAB.md's ADSL x10, tbf with a 200 ms buffer on the ISP side), and 3
peer sites on unshaped lines; real `dicomesh run` gateways in their namespaces, each bringing
up its own wireguard-go tunnels (one per clinic line) and policy routing. Wire compression is
off, so every contender moves the study's bytes as they are (plus its own protocol's headers:
HTTP and chunk frames for dicomesh, MPTCP options for MPTCP).

Cases (the study held complete by all 3 sites; times from start to exit of `dicomesh fetch`,
and "inner": the gateway's own time for the fetch, from its log):
- dicomesh, 3 lines: one swarm path per (site, line), 9 in all; `--rounds` times, each
  followed by an MPTCP run of the same size (interleaved: a slow moment on a shared machine
  hits both contenders alike; ratios use the totals over the rounds);
- dicomesh, 1 line: lines 2 and 3 cut (the bridge port drops everything) and declared down
  by the clinic's health monitor before the fetch starts;
- dicomesh, serving: site 1 (one line) fetches a study only the clinic holds: one path per
  clinic tunnel, so the clinic's three uploads serve it, each shaped by the gateway's own
  tbf (`[net.uplinks.shape]`, 95 % of its 8 Mbit/s); "/lines" is then over the three shaped
  upload rates and "per line" is what each clinic line sent;
- dicomesh, line 1 cut once 30 % of the bytes arrived: compared with the ideal of 30 % at 3
  lines then 70 % at 2 (an uplink failure should cost no more than its share: the time it
  adds to the 3-line runs vs what the ideal adds), and when the clinic's health monitor and
  the swarm noticed it (from the clinic's log);
- MPTCP, 3 tunnels: each site sends a third of the bytes over one MPTCP connection to the
  clinic (in-kernel path manager: `ip mptcp endpoint ... subflow` for the clinic's 2nd and 3rd
  tunnel addresses, so each connection has one subflow per tunnel, i.e. per line).

Goodput = payload bits / seconds; "/lines" divides it by the sum of the usable lines' rates
(TCP through WireGuard reaches ~0.917 of a line: LAB.md). Targets: 3 lines >= 2.85 x 1 line,
and dicomesh >= MPTCP.

Needs root (namespaces), wireguard-go, dcmtk. Run as a script inside a namespace, this file is
also the MPTCP sender/receiver (``mptcp-send`` / ``mptcp-recv``).
Usage: .venv/bin/python bench/bonding.py [--size-mb 30] [--rounds 2] [--keep]   (~3 min)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime
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
SHAPED = 0.95  # the gateway's upload shaper: 95 % of up_kbps (each line's 8 Mbit/s here)
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
    notes: tuple[str, ...] = ()  # e.g. when the failure was noticed
    # The transfer alone: the gateway's own "fetch ... done in" time (dicomesh), the receiver's
    # connect-to-EOF time (MPTCP, = seconds). `seconds` of dicomesh adds the CLI and its
    # control socket (~0.15 s).
    inner: float | None = None
    # dicomesh: chunk bytes received beyond the study (tail duplicates, cancelled streams).
    beyond: float | None = None
    line_bps: float | None = None  # each line's rate for /lines (None: the lines' download)


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


def run_mptcp(b: BondedClinic, payload: int, name: str = "MPTCP, 3 tunnels") -> Case:
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
    seconds = report["seconds"]
    return Case(name, share * len(targets), seconds, LINES, rx, inner=seconds)


def run_fetch(
    b: BondedClinic, info: StudyInfo, name: str, lines: int, outdir: Path, site: int | None = None
) -> Case:
    """`dicomesh fetch` at the clinic (or at site `site`), checked instance by instance."""
    run = b.fetch(info.study_uid, FETCH_TIMEOUT, site=site)
    if run.returncode != 0:
        raise RuntimeError(f"{name}: dicomesh fetch failed: {run.output[-500:]}")
    outdir.mkdir()
    problems = b.mismatches(info.paths, outdir, site=site)
    if problems:
        raise RuntimeError(f"{name}: {problems[:3]}")
    gw = b.clinic if site is None else b.sites[site - 1]
    assert gw is not None
    inner = beyond = None
    done = rf"fetch {re.escape(info.study_uid)} done: .* in ([0-9.]+) s"
    for line in gw.log().splitlines():
        if found := re.search(done, line):
            inner = float(found.group(1))
            if extra := re.search(r"([0-9.]+) MB received beyond the study", line):
                beyond = float(extra.group(1)) * 1e6
    per_line = run.rx if site is None else run.tx
    return Case(name, info.total_bytes, run.seconds, lines, per_line, inner=inner, beyond=beyond)


def run_serve(b: BondedClinic, info: StudyInfo, outdir: Path) -> Case:
    from netswarmkit import LINE_BPS

    b.site_sees(info.study_uid, site=1)
    case = run_fetch(b, info, "dicomesh, serving site 1", LINES, outdir, site=1)
    return replace(case, line_bps=SHAPED * LINE_BPS)


def _logged_after(text: str, since: float, *needles: str) -> float | None:
    """Seconds from `since` (time.time()) to the first line of the clinic's log after it
    holding every needle (log lines start with "YYYY-mm-dd HH:MM:SS,mmm")."""
    for line in text.splitlines():
        if not all(n in line for n in needles):
            continue
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if stamp >= since - 0.01:
            return stamp - since
    return None


def run_cut(b: BondedClinic, info: StudyInfo, outdir: Path) -> Case:
    from netswarmkit import LINE_BPS, WG_GOODPUT, when_received

    lab = b.lab
    cut_at: list[float] = []

    def cut() -> None:
        lab.cut(1)
        cut_at.append(time.time())

    try:
        with when_received(b, int(CUT_AT * info.total_bytes), cut) as fired:
            case = run_fetch(b, info, "dicomesh, line 1 cut at 30 %", LINES, outdir)
        if not fired:
            raise RuntimeError("the fetch ended before the cut")
    finally:
        lab.restore(1)
    rate = WG_GOODPUT * LINE_BPS / 8
    ideal = CUT_AT * info.total_bytes / (LINES * rate)
    ideal += (1 - CUT_AT) * info.total_bytes / ((LINES - 1) * rate)
    assert b.clinic is not None
    text = b.clinic.log()
    notes = []
    for what, needles in (
        ("health: adsl1 down", ("uplink adsl1: ", "-> down")),
        ("swarm: first path on adsl1 stalled", ("@adsl1 stalled",)),
        ("swarm: first path on adsl1 left", ("@adsl1 left",)),
    ):
        after = _logged_after(text, cut_at[0], *needles)
        notes.append(f"{what}: {'never' if after is None else f'{after:.2f} s after the cut'}")
    return replace(case, ideal=ideal, notes=tuple(notes))


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


def _goodput(cases: list[Case], inner: bool = False) -> float:
    """Bytes/s over all rounds of a case (total payload / total time)."""
    seconds = sum((c.inner or c.seconds) if inner else c.seconds for c in cases)
    return sum(c.payload for c in cases) / seconds


def report(cases: dict[str, list[Case]], line_bps: int) -> None:
    from netswarmkit import WG_GOODPUT

    print()
    print(f"Clinic: {LINES} lines at {line_bps / 1e6:g} Mbit/s down each (ADSL x10), 3 peer "
          "sites, WireGuard tunnels (wireguard-go), wire compression off.")  # fmt: skip
    print("seconds: `dicomesh fetch` start to exit (MPTCP: connect to EOF); inner: the "
          "gateway's own fetch time; beyond: MB the swarm received beyond the study")  # fmt: skip
    print(f"{'case':36s} {'MB':>6s} {'seconds':>8s} {'inner':>6s} {'Mbit/s':>7s} {'/lines':>7s}"
          f" {'beyond':>6s}  per line (MB): received (serving: sent)")  # fmt: skip
    for runs in cases.values():
        for c in runs:
            goodput = c.payload * 8 / c.seconds
            share = goodput / (c.lines * (c.line_bps or line_bps))
            per_line = " ".join(f"{r / 1e6:5.1f}" for r in c.rx)
            inner = f"{c.inner:6.2f}" if c.inner is not None else f"{'-':>6s}"
            beyond = f"{c.beyond / 1e6:6.2f}" if c.beyond is not None else f"{'-':>6s}"
            print(f"{c.name:36s} {c.payload / 1e6:6.1f} {c.seconds:8.2f} {inner} "
                  f"{goodput / 1e6:7.2f} {share:7.3f} {beyond}  {per_line}")  # fmt: skip
    three, one = cases.get("three"), cases.get("one")
    mptcp, cuts, serve = cases.get("mptcp"), cases.get("cut"), cases.get("serve")

    print()
    if three and one:
        r = _goodput(three) / _goodput(one)
        print(f"3 lines / 1 line (dicomesh):        {r:.3f}x   (target >= 2.85)")
    if three and mptcp:
        r = _goodput(three) / _goodput(mptcp)
        ri = _goodput(three, inner=True) / _goodput(mptcp, inner=True)
        print(f"dicomesh / MPTCP, 3 lines:          {r:.3f}x   (target >= 1); transfer "
              f"alone (inner): {ri:.3f}x")  # fmt: skip
    if mptcp and one:
        print(f"MPTCP 3 tunnels / dicomesh 1 line:  {_goodput(mptcp) / _goodput(one):.3f}x")
    for cut in cuts or []:
        if cut.ideal is None:
            continue
        print(f"line 1 cut at 30 %: {cut.seconds:.2f} s, ideal {cut.ideal:.2f} s "
              f"(30 % at 3 lines, 70 % at 2): x{cut.seconds / cut.ideal:.3f}")  # fmt: skip
        if three:
            # The failure's cost is the time it adds to the 3-line runs (at the same payload;
            # the studies differ by < 1 %); its share is what the ideal adds: 70 % at 2 lines
            # instead of 3. Start-up is in both, so it cancels.
            share = cut.ideal - cut.payload * 8 / (LINES * WG_GOODPUT * line_bps)
            cost = cut.seconds - cut.payload / _goodput(three)
            print(f"failure cost: +{cost:.2f} s over 3 lines; its share: +{share:.2f} s "
                  f"(cost / share {cost / share:.2f}, target <= 1)")  # fmt: skip
        for note in cut.notes:
            print(f"  {note}")
    for c in serve or []:
        rate = WG_GOODPUT * (c.line_bps or line_bps)  # one shaped upload through WireGuard
        goodput = c.payload * 8 / c.seconds
        print(f"serving over the clinic's {LINES} uploads: {goodput / 1e6:.2f} Mbit/s = "
              f"{goodput / rate:.2f}x one shaped upload's TCP-through-WireGuard rate "
              f"(ideal {LINES}); sent per line: "
              + " ".join(f"{t / 1e6:.1f}" for t in c.rx) + " MB")  # fmt: skip


def main(argv: list[str]) -> int:
    if argv[:1] == ["mptcp-send"]:
        return _mptcp_send(argv[1], int(argv[2]), int(argv[3]))
    if argv[:1] == ["mptcp-recv"]:
        return _mptcp_recv(argv[2:], int(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=30.0, help="study size (default 30)")
    p.add_argument("--rounds", type=int, default=2,
                   help="3-line and MPTCP runs, interleaved (default 2)")  # fmt: skip
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
    cases: dict[str, list[Case]] = {"three": [], "mptcp": [], "cut": [], "one": [], "serve": []}
    names = [*(f"three{k}" for k in range(1, a.rounds + 1)), "cut", "one", "serve"]
    try:
        studies = {}
        for n, name in enumerate(names):
            directory = work / f"study-{name}"
            directory.mkdir()
            studies[name] = generate_study(
                directory, target_bytes=int(a.size_mb * 1e6), seed=700 + n
            )
        log(f"studies generated in {work}")
        with BondedClinic(work / "gw", serve=True) as b:
            for name in studies:
                if name == "serve":
                    b.store(work / f"study-{name}", clinic=True)
                else:
                    b.store(work / f"study-{name}")
            for name, info in studies.items():
                if name != "serve":
                    b.wait_held(info.study_uid, len(info.paths))
            log("gateways up, studies held by all 3 sites")
            for k in range(1, a.rounds + 1):  # interleaved: a slow moment hits both alike
                info = studies[f"three{k}"]
                case = run_fetch(b, info, f"dicomesh, 3 lines #{k}", LINES, work / f"got{k}")
                cases["three"].append(case)
                log(f"3 lines #{k}: {case.seconds:.2f} s")
                case = run_mptcp(b, info.total_bytes, f"MPTCP, 3 tunnels #{k}")
                cases["mptcp"].append(case)
                log(f"MPTCP #{k}: {case.seconds:.2f} s")
            cases["cut"].append(run_cut(b, studies["cut"], work / "got-cut"))
            log(f"cut: {cases['cut'][0].seconds:.2f} s")
            deadline = time.monotonic() + 20
            while b.uplink_state("adsl1") == "down" and time.monotonic() < deadline:
                time.sleep(0.1)
            cases["one"].append(run_one_line(b, studies["one"], work / "got-one"))
            log(f"1 line: {cases['one'][0].seconds:.2f} s")
            for i in (2, 3):
                b.wait_usable(f"adsl{i}", timeout=20)
            cases["serve"].append(run_serve(b, studies["serve"], work / "got-serve"))
            log(f"serving: {cases['serve'][0].seconds:.2f} s")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(cases, LINE_BPS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
