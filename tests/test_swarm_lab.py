"""The dicomesh swarm on the network lab: real gateways in namespaces on ADSL-like lines.

Rates are ADSL x10 (LAB.md): each source uploads 8 Mbit/s, the downloader downloads
30 Mbit/s, tbf with a 200 ms buffer; studies are ~20 MB CT (the bench uses 40 MB). Timed:
`dicomesh fetch` on the host, from its start to its exit.

Two yardsticks. The brief's T_min = payload / min(downlink, k x uplink). But the mesh sends
zstd chunks when that saves >= 10 % (the generated CT compresses to ~0.49), so on these
studies it moves about half the payload and beats that T_min easily; the strict yardstick is
the same bound on the bytes it must move (swarmkit.wire_payload): ``T_wire``. Both ratios are
printed; both are asserted (on ``T_wire`` with an allowance for the fixed start-up cost).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lab import ADSL_DOWN_X10, ADSL_UP_X10, TCP_GOODPUT, Lab, leftovers
from studygen import StudyInfo, generate_study
from swarmkit import Fetch, Swarm, at_received, wire_payload

pytestmark = [
    pytest.mark.lab,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

STUDY_BYTES = 20_000_000
KS = (1, 2, 3, 4)
FAULT_K = 3
LOSS_AT = 0.30  # share of the transfer received when a source is lost
# A full-sized TCP segment on the wire: 1448 B payload in a 1514 B frame (as bench/swarm.py).
WIRE_PER_PAYLOAD = 1514 / 1448
BOUND = 1.25
# On T_wire, what a ~10 MB transfer cannot amortize: `dicomesh fetch` starting (Python, aiohttp:
# ~0.3 s) and each path's first one-chunk request before its rate is measured.
STARTUP_S = 1.0
FETCH_TIMEOUT = 120.0


@dataclass(frozen=True)
class Study:
    info: StudyInfo
    dir: Path
    wire: int  # bytes the swarm moves for it (zstd chunks + frame headers)

    @property
    def uid(self) -> str:
        return self.info.study_uid

    @property
    def size(self) -> int:
        return self.info.total_bytes


def make_study(root: Path, seed: int) -> Study:
    directory = root / f"study{seed}"
    directory.mkdir()
    info = generate_study(directory, target_bytes=STUDY_BYTES, seed=seed)
    return Study(info, directory, wire_payload(info.paths))


def t_min(size: int, k: int) -> float:
    """Line-rate bound: bytes / min(downlink, k x uplink)."""
    return size * 8 / min(ADSL_DOWN_X10, k * ADSL_UP_X10)


def ideal_after_loss(size: int, k: int) -> float:
    """LOSS_AT of the bytes at k sources, the rest at k-1, TCP goodput included."""
    rate = TCP_GOODPUT * min(ADSL_DOWN_X10, k * ADSL_UP_X10)
    rest = TCP_GOODPUT * min(ADSL_DOWN_X10, (k - 1) * ADSL_UP_X10)
    return LOSS_AT * size * 8 / rate + (1 - LOSS_AT) * size * 8 / rest


def fetched_ok(swarm: Swarm, study: Study, run: Fetch, outdir: Path) -> None:
    """The fetch exited 0 and every instance is at the downloader, byte for byte."""
    assert run.returncode == 0, run.output[-1000:] + swarm.downloader.log()[-3000:]
    assert swarm.mismatches(study.info.paths, outdir) == []


@pytest.fixture
def built(tmp_path: Path) -> Iterator[tuple[Path, list[Lab]]]:
    """Scratch space, and a list the test puts its lab in: checked for leftovers at the end."""
    labs: list[Lab] = []
    yield tmp_path, labs
    for lab in labs:
        assert leftovers(lab.prefix) == []


def test_time_scales_with_holders(built) -> None:
    """k = 1..4 holders: study k is held by the first k sources of one lab (4 sources)."""
    tmp, labs = built
    studies = {k: make_study(tmp, seed=100 + k) for k in KS}
    results: dict[int, Fetch] = {}
    own: dict[int, float | None] = {}
    with Lab(k=max(KS)) as lab, Swarm(lab, tmp / "gw") as swarm:
        labs.append(lab)
        for k, study in studies.items():
            swarm.store(study.dir, lab.sources[:k])
        for k, study in studies.items():
            swarm.wait_held(study.uid, lab.sources[:k], len(study.info.paths))
        for k, study in studies.items():
            results[k] = swarm.fetch(study.uid, FETCH_TIMEOUT)
            own[k] = swarm.gateway_seconds(study.uid)
            fetched_ok(swarm, study, results[k], tmp / f"got{k}")
    lines = []
    for k, run in results.items():
        s = studies[k]
        lines.append(
            f"k={k}: {run.seconds:6.2f} s  /T_min {run.seconds / t_min(s.size, k):.3f}"
            f"  /T_wire {run.seconds / t_min(s.wire, k):.3f}"
            f"  (gateway's own {own[k]} s; payload {s.size / 1e6:.1f} MB,"
            f" wire {s.wire / 1e6:.1f} MB, link rx {run.rx_frame_bytes / 1e6:.1f} MB)"
        )
    print("\n" + "\n".join(lines))
    for k, run in results.items():
        s = studies[k]
        assert run.seconds <= BOUND * t_min(s.size, k), lines
        assert run.seconds <= BOUND * t_min(s.wire, k) + STARTUP_S, lines
    for k in KS[1:]:
        assert results[k].seconds < results[k - 1].seconds, lines


@pytest.mark.parametrize("fault", ["kill", "cut"])
def test_one_of_three_sources_lost_at_30_percent(built, fault: str) -> None:
    """A source is killed (SIGKILL: its kernel closes the connections) or its line silently
    cut (no RST, no ICMP: only stall detection notices) once 30 % of the bytes arrived."""
    tmp, labs = built
    study = make_study(tmp, seed=200 + (fault == "cut"))
    with Lab(k=FAULT_K) as lab, Swarm(lab, tmp / "gw") as swarm:
        labs.append(lab)
        victim = lab.sources[0]
        swarm.store(study.dir, lab.sources)
        swarm.wait_held(study.uid, lab.sources, len(study.info.paths))
        lose = (lambda: swarm.kill(victim)) if fault == "kill" else (lambda: lab.cut(victim))
        with at_received(lab, int(LOSS_AT * study.wire * WIRE_PER_PAYLOAD), lose) as fired:
            run = swarm.fetch(study.uid, FETCH_TIMEOUT)
        assert fired, f"the fetch ended before {LOSS_AT:.0%}: no {fault}"
        fetched_ok(swarm, study, run, tmp / "got")
        log = swarm.downloader.log()
    ideal, ideal_wire = ideal_after_loss(study.size, FAULT_K), ideal_after_loss(study.wire, FAULT_K)
    line = (
        f"{fault} {victim.label} at {fired[0]:.2f} s: {run.seconds:.2f} s"
        f"  /ideal {run.seconds / ideal:.3f}  /ideal_wire {run.seconds / ideal_wire:.3f}"
        f"  (ideal {ideal:.2f} s, on the wire bytes {ideal_wire:.2f} s)"
    )
    print("\n" + line)
    assert run.seconds <= BOUND * ideal, line
    assert run.seconds <= BOUND * ideal_wire + STARTUP_S, line + "\n" + log[-4000:]


def test_a_silently_cut_peer_does_not_stop_catalog_sync(built) -> None:
    """Regression: with one peer's line cut (no RST), the catalog keeps flowing from the
    others: a study stored at s2 reaches the downloader in a bounded time."""
    tmp, labs = built
    study = make_study(tmp, seed=300)
    with Lab(k=2) as lab, Swarm(lab, tmp / "gw") as swarm:
        labs.append(lab)
        s1, s2 = lab.sources
        # Cut only once the downloader talks to s1 (a kept-alive connection exists: the case
        # where a pull used to wait forever).
        deadline = time.monotonic() + 30
        while "peer gw-s1 is online" not in swarm.downloader.log():
            assert time.monotonic() < deadline, "s1 never came online"
            time.sleep(0.1)
        lab.cut(s1)
        swarm.store(study.dir, [s2])
        swarm.wait_held(study.uid, [s2], len(study.info.paths), timeout=40)
        assert "peer gw-s1 is offline" in swarm.downloader.log()
