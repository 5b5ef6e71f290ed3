"""Bonded uplinks end to end: a clinic gateway with 3 ADSL-like lines fetches a study from 3
peer sites through its own wireguard-go tunnels, one swarm path per (peer, uplink).

Rates are ADSL x10 (LAB.md): each clinic line downloads at 8 Mbit/s (tbf on the ISP side,
200 ms buffer), data ~x10 too (30 MB studies). The sites' lines are not shaped: the clinic's
three lines are the bottleneck. Chunks travel raw (wire compression off, netswarmkit.py), so
the yardstick is exact:

    T_ideal = payload x 8 / (lines x 0.917 x 8 Mbit/s)      (0.917: TCP through WireGuard)

asserted as  T <= BOUND x T_ideal + STARTUP_S, and each line's share of the bytes within
SHARE_TOLERANCE of an even split. Bytes per uplink are read from the clinic's interfaces
(`ip -json -s link`), and each site's endpoint for each clinic tunnel from the site's
wireguard-go (UAPI `get=1`, like `wg show`), not from our code.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import leftovers
from netlab import uapi_peer_endpoints, uapi_sockets
from netswarmkit import (
    LINE_BPS,
    MESH_PORT,
    WG_GOODPUT,
    WG_PORT,
    BondedClinic,
    FetchRun,
    clinic_overlay,
    rx_timeline,
    when_received,
)
from studygen import StudyInfo, generate_study

from appliance.net import keys

pytestmark = [
    pytest.mark.lab,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go"),
]

STUDY_BYTES = 30_000_000
LINES = 3
BOUND = 1.25
# What a 10 s transfer cannot amortize: `dicomesh fetch` starting (~0.3 s), the tunnels'
# first handshakes, and each of the 9 paths' first one-chunk request before its rate is known.
STARTUP_S = 1.5
CUT_AT = 0.30  # share of the payload received when uplink 1 is cut
# A silent cut is noticed by the swarm's stall timer (2 s) or the uplink's health (3 x 0.5 s
# + the probe in flight), whichever first: the chunks in flight on the line then move.
DETECT_S = 2.5
# Each line carries its share of what the clinic received within this (ideal: 1/LINES).
SHARE_TOLERANCE = 0.08
FETCH_TIMEOUT = 120.0
SHAPED = 0.95  # the gateway's upload shaper: 95 % of up_kbps (= the line's rate here)


def ideal(payload: int, lines: float) -> float:
    return payload * 8 / (lines * WG_GOODPUT * LINE_BPS)


def ideal_after_cut(payload: int) -> float:
    return ideal(CUT_AT * payload, LINES) + ideal((1 - CUT_AT) * payload, LINES - 1)


@pytest.fixture(scope="module")
def bonded(tmp_path_factory) -> Iterator[tuple[BondedClinic, dict[str, StudyInfo]]]:
    """The clinic and 3 sites, each site holding studies "a", "b" and "c"; the clinic holds
    "d" (to serve to a site) and shapes its uploads with its own shaper."""
    root = tmp_path_factory.mktemp("bonded")
    studies: dict[str, StudyInfo] = {}
    for n, name in enumerate("abcd"):
        directory = root / f"study-{name}"
        directory.mkdir()
        size = STUDY_BYTES if name in "ab" else STUDY_BYTES // 3
        studies[name] = generate_study(directory, target_bytes=size, seed=400 + n)
    with BondedClinic(root / "gw", serve=True) as b:
        prefix = b.lab.prefix
        for name in "abc":
            b.store(root / f"study-{name}")
        b.store(root / "study-d", clinic=True)
        for name in "abc":
            b.wait_held(studies[name].study_uid, len(studies[name].paths))
        yield b, studies
    assert leftovers(prefix) == [] and uapi_sockets(prefix) == []


def _shares_off(rx: list[int]) -> list[str]:
    """The lines whose share of `rx` is off its even share by more than the tolerance."""
    total = sum(rx) or 1
    even = 1 / len(rx)
    return [
        f"line {i}: {r / total:.3f} (even {even:.3f})"
        for i, r in enumerate(rx, start=1)
        if abs(r / total - even) > SHARE_TOLERANCE
    ]


def _endpoints_off_their_line(b: BondedClinic) -> list[str]:
    """Each site's current endpoint for each clinic tunnel key (read over the site's UAPI,
    after WireGuard roaming), compared with that tunnel's own line: the differences."""
    assert b.clinic is not None
    lab = b.lab
    wanted = {}
    for i, line in enumerate(lab.lines):
        public = keys.load_or_create(b.clinic.state_dir, f"adsl{i + 1}").public_b64
        wanted[base64.b64decode(public).hex()] = f"{line.addr}:{WG_PORT + i}"
    problems = []
    for j in range(1, len(lab.site_lines) + 1):
        seen = uapi_peer_endpoints(f"{lab.wg_prefix}s{j}0")
        for key, endpoint in wanted.items():
            if seen.get(key) != endpoint:
                problems.append(f"site{j}: clinic key {key[:8]} at {seen.get(key)}, not {endpoint}")
    return problems


def test_every_site_reaches_each_clinic_tunnel_over_its_own_line(bonded) -> None:
    """Right after start, no tunnel's first packets left by another line (issue 4: they
    did, and the sites roamed every clinic tunnel's endpoint to line 1 for good)."""
    b, _ = bonded
    assert _endpoints_off_their_line(b) == []


def _fetched(b: BondedClinic, info: StudyInfo, run: FetchRun, outdir: Path) -> None:
    assert b.clinic is not None
    assert run.returncode == 0, run.output[-1000:] + b.clinic.log()[-4000:]
    outdir.mkdir()
    assert b.mismatches(info.paths, outdir) == []


def _line(what: str, run: FetchRun, payload: int, yardstick: float) -> str:
    rx = ", ".join(f"adsl{i} {r / 1e6:.1f} MB" for i, r in enumerate(run.rx, start=1))
    return (
        f"{what}: {payload / 1e6:.1f} MB in {run.seconds:.2f} s, ideal {yardstick:.2f} s "
        f"(x{run.seconds / yardstick:.3f}); received {rx}"
    )


def test_mesh_serves_only_through_the_tunnels(bonded) -> None:
    """Underlay: nothing listens on the clinic's line addresses; a packet routed to its
    overlay address over a line (not through a tunnel) is refused whoever sends it."""
    b, _ = bonded
    lab = b.lab
    site_ns = lab.site_lines[0].ns
    probe = (
        "import http.client, sys\n"
        "c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=5)\n"
        "try:\n"
        "    c.request('GET', '/mesh/v1/hello'); r = c.getresponse()\n"
        "    print(r.status, r.read().decode().strip())\n"
        "except OSError as e:\n"
        "    print('error', type(e).__name__)\n"
    )

    def ask(ns: str, addr: str) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "python3", "-c", probe, addr, str(MESH_PORT)],
            capture_output=True, text=True, timeout=15,
        )  # fmt: skip
        return done.stdout.strip()

    for line in lab.lines:
        assert ask(site_ns, line.addr) == "error ConnectionRefusedError"
    # The ISP's router routes the overlay to the clinic's first line: plain underlay.
    subprocess.run(
        ["ip", "-n", lab.inet, "route", "add", "10.90.1.0/24", "via", lab.lines[0].addr],
        check=True,
    )
    try:
        assert ask(lab.inet, clinic_overlay(1)) == "403 mesh requests only through the VPN"
    finally:
        subprocess.run(["ip", "-n", lab.inet, "route", "del", "10.90.1.0/24"], check=True)


def test_three_uplinks_are_all_used_at_line_rate(bonded, tmp_path) -> None:
    b, studies = bonded
    info = studies["a"]
    with rx_timeline(b) as rates:
        run = b.fetch(info.study_uid, FETCH_TIMEOUT)
    _fetched(b, info, run, tmp_path / "got")
    yardstick = ideal(info.total_bytes, LINES)
    line = _line("3 uplinks", run, info.total_bytes, yardstick)
    line += "; Mbit/s per 0.5 s: " + " ".join(f"{r:.0f}" for r in rates)
    assert b.clinic is not None
    line += "".join(f"\n{x}" for x in b.clinic.log().splitlines() if "per path:" in x)
    print("\n" + line)
    assert _shares_off(run.rx) == [], line
    assert run.rx_total >= info.total_bytes, line  # the payload came over the lines
    assert run.seconds <= BOUND * yardstick + STARTUP_S, line


def test_a_cut_uplink_leaves_and_the_transfer_completes_over_the_others(bonded, tmp_path) -> None:
    b, studies = bonded
    info = studies["b"]
    lab = b.lab
    at_cut: list[int] = []

    def cut() -> None:
        lab.cut(1)
        at_cut.extend(b.rx_bytes())

    try:
        with when_received(b, int(CUT_AT * info.total_bytes), cut) as fired:
            run = b.fetch(info.study_uid, FETCH_TIMEOUT)
        assert fired, "the fetch ended before the cut"
        after = [end - cut_rx for end, cut_rx in zip(b.rx_bytes(), at_cut, strict=True)]
        _fetched(b, info, run, tmp_path / "got")
        log = b.clinic.log() if b.clinic else ""
    finally:
        lab.restore(1)
    yardstick = ideal_after_cut(info.total_bytes)
    line = _line(f"uplink 1 cut at {fired[0]:.2f} s", run, info.total_bytes, yardstick)
    line += f"; after the cut: {', '.join(f'{a / 1e6:.1f} MB' for a in after)}"
    print("\n" + line)
    # The cut line carries nothing more than what its ISP-side tbf queue (200 ms) held.
    assert after[0] < 300_000, line
    assert sum(after[1:]) >= (1 - CUT_AT) * info.total_bytes * 0.95, line
    assert _shares_off(after[1:]) == [], line  # the two others take half each
    assert "uplink adsl1: " in log and "-> down" in log, log[-3000:]
    assert "@adsl1 left: its uplink is down" in log, log[-3000:]
    assert run.seconds <= BOUND * yardstick + STARTUP_S + DETECT_S, line


def test_a_restored_uplink_carries_paths_again(bonded, tmp_path) -> None:
    b, studies = bonded
    info = studies["c"]
    assert b.wait_usable("adsl1", timeout=15), "adsl1 never came back"
    run = b.fetch(info.study_uid, FETCH_TIMEOUT)
    _fetched(b, info, run, tmp_path / "got")
    yardstick = ideal(info.total_bytes, LINES)
    line = _line("after restore", run, info.total_bytes, yardstick)
    print("\n" + line)
    assert _shares_off(run.rx) == [], line
    assert run.seconds <= BOUND * yardstick + STARTUP_S, line
    assert _endpoints_off_their_line(b) == []  # the cut and restore moved no tunnel


def test_a_one_line_site_is_served_over_all_three_clinic_uploads(bonded, tmp_path) -> None:
    """Serving: a site with one line fetches a study only the clinic holds. Its swarm has one
    path per clinic tunnel (README, address plan), so the clinic's three uploads, each shaped
    by the gateway's own tbf at 95 % of the line, carry a third each."""
    b, studies = bonded
    info = studies["d"]
    assert b.wait_usable("adsl1", timeout=15), "adsl1 never came back"
    b.site_sees(info.study_uid, site=1)
    run = b.fetch(info.study_uid, FETCH_TIMEOUT, site=1)
    assert run.returncode == 0, run.output[-1000:] + b.sites[0].log()[-4000:]
    (tmp_path / "got").mkdir()
    assert b.mismatches(info.paths, tmp_path / "got", site=1) == []
    yardstick = ideal(info.total_bytes, LINES * SHAPED)
    tx = ", ".join(f"adsl{i} {t / 1e6:.1f} MB" for i, t in enumerate(run.tx, start=1))
    line = (
        f"served: {info.total_bytes / 1e6:.1f} MB in {run.seconds:.2f} s, ideal "
        f"{yardstick:.2f} s (x{run.seconds / yardstick:.3f}); sent {tx}"
    )
    print("\n" + line)
    assert sum(run.tx) >= info.total_bytes, line  # the payload left over the lines
    assert _shares_off(run.tx) == [], line
    assert run.seconds <= BOUND * yardstick + STARTUP_S, line
