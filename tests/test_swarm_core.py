"""The swarm scheduler (appliance.mesh.swarm.core), alone and over the simulated network.

Times are simulated seconds and rates decimal MB/s; `pytest -s` prints the measured ratios.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping

import pytest

from appliance.mesh.config import MeshConfig
from appliance.mesh.swarm import Cancel, PathState, PeerCutOff, Request, Scheduler, SwarmConfig
from appliance.mesh.swarm.paths import TRANSITIONS, PathEvent
from appliance.mesh.swarm.sim import LinkEvent, SimPath, SimPeer, Simulation
from appliance.store.chunking import CHUNK_BYTES

MB = 1_000_000
STALL = SwarmConfig().stall_timeout_s


def study(n: int, size: int = CHUNK_BYTES, tag: str = "") -> dict[bytes, int]:
    """n chunks of `size` bytes keyed by made-up SHA-256 digests."""
    return {hashlib.sha256(f"{tag}chunk{i}".encode()).digest(): size for i in range(n)}


STUDY_40MB = study(80)  # 40 MiB of 512 KiB chunks
TOTAL_40MB = sum(STUDY_40MB.values())


def simulate(
    chunks: Mapping[bytes, int],
    paths: Iterable[SimPath],
    peers: Iterable[SimPeer],
    *,
    config: SwarmConfig | None = None,
    have: Iterable[bytes] = (),
    downlink: float = math.inf,
    **kw: float,
) -> tuple[Scheduler, Simulation]:
    sched = Scheduler(chunks, have=have, config=config)
    return sched, Simulation(sched, chunks, paths, peers, downlink=downlink, **kw)


def sources(rates: Iterable[float], **kw) -> tuple[list[SimPath], list[SimPeer]]:
    """One complete holder per rate, each reached over one path "r<i>/adsl0"."""
    paths = [SimPath(f"r{i}/adsl0", f"r{i}", rate, **kw) for i, rate in enumerate(rates)]
    return paths, [SimPeer(f"r{i}") for i in range(len(paths))]


def report(what: str, **values: float) -> None:
    print(f"\n[swarm] {what}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))


def requested(sim: Simulation, path: str) -> list[bytes]:
    """Chunks requested on `path`, in request order."""
    return [c for _, r in sim.requests if r.path == path for c in r.chunks]


def wasted(sim: Simulation, needed: int) -> int:
    return sum(sim.wire_bytes.values()) - needed


# -- throughput over the simulated network ----------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_speed_scales_with_holders_until_the_downlink_is_full(k: int) -> None:
    paths, peers = sources([1 * MB] * k)
    _, sim = simulate(STUDY_40MB, paths, peers, downlink=3 * MB)
    assert sim.run()
    t_min = TOTAL_40MB / min(3 * MB, k * MB)
    ratio = sim.finished_at / t_min
    report(f"{k} equal sources", t=sim.finished_at, t_min=t_min, ratio=ratio)
    assert ratio <= 1.03
    assert wasted(sim, TOTAL_40MB) == 0
    assert not sim.violations


def test_tcp_payload_efficiency_scales_the_time() -> None:
    paths, peers = sources([1 * MB] * 2)
    _, sim = simulate(STUDY_40MB, paths, peers, efficiency=0.957)
    assert sim.run()
    ratio = sim.finished_at / (TOTAL_40MB / (2 * MB * 0.957))
    report("2 sources at 95.7 % TCP efficiency", ratio=ratio)
    assert 1.0 <= ratio <= 1.03


def test_requests_overlap_so_the_line_never_idles_between_them() -> None:
    # 150 ms one way: a round trip lost per request would cost ~10 % over ~20 requests.
    paths, peers = sources([1 * MB], latency=0.15)
    _, sim = simulate(STUDY_40MB, paths, peers)
    assert sim.run()
    ideal = TOTAL_40MB / MB + 2 * 0.15  # only the first request's round trip is unavoidable
    report("one source 150 ms away", requests=len(sim.requests), ratio=sim.finished_at / ideal)
    assert len(sim.requests) >= 10
    assert sim.finished_at <= ideal + 0.01


def test_queues_hold_about_queue_seconds_of_each_paths_measured_rate() -> None:
    rates = [0.2 * MB, 1 * MB, 3 * MB]
    paths, peers = sources(rates)
    sched, sim = simulate(study(200), paths, peers)
    qs = sched.config.queue_seconds
    for t in (4.0, 6.0, 8.0, 10.0):
        sim.run(until=t)
        for path, rate in zip(paths, rates, strict=True):
            status = sched.progress(sim.now).paths[path.name]
            assert status.rate == pytest.approx(rate, rel=0.03)
            budget = status.rate * qs
            # Refilled at half the budget, up to the budget (rounded up to whole chunks).
            assert min(budget / 2, CHUNK_BYTES) * 0.9 <= status.queued_bytes
            assert status.queued_bytes <= budget + CHUNK_BYTES
    # Every path starts with one chunk; the fast one grows to several per request.
    first = {p.name: next(r for _, r in sim.requests if r.path == p.name) for p in paths}
    assert all(len(r.chunks) == 1 for r in first.values())
    assert max(len(r.chunks) for _, r in sim.requests if r.path == "r2/adsl0") >= 5


def test_a_lan_fast_path_gets_batches_of_at_most_max_batch_chunks() -> None:
    paths, peers = sources([20 * MB])
    sched, sim = simulate(study(400), paths, peers)
    assert sim.run()
    sizes = [len(r.chunks) for _, r in sim.requests]
    assert max(sizes) == sched.config.max_batch_chunks
    assert sim.finished_at <= 1.03 * 400 * CHUNK_BYTES / (20 * MB)


def test_heterogeneous_paths_finish_near_ideal_and_the_fast_path_carries_most() -> None:
    rates = [0.2 * MB, 1 * MB, 3 * MB]
    paths, peers = sources(rates)
    sched, sim = simulate(STUDY_40MB, paths, peers)
    assert sim.run()
    ideal = TOTAL_40MB / sum(rates)
    ratio = sim.finished_at / ideal
    shares = {p: s.delivered_bytes / TOTAL_40MB for p, s in sched.progress(sim.now).paths.items()}
    report("paths 0.2/1/3 MB/s", ratio=ratio, **{f"share_{p[:2]}": s for p, s in shares.items()})
    assert ratio <= 1.03
    assert shares["r2/adsl0"] >= 0.6
    for path, rate in zip(paths, rates, strict=True):
        assert shares[path.name] == pytest.approx(rate / sum(rates), abs=0.05)


# -- the tail: chunks split into pieces -------------------------------------------------------

ODD_STUDY = study(39, tag="odd")  # 2 equal paths: whole chunks leave one a chunk behind
PIECE = SwarmConfig().piece_bytes


def spans_of(sim: Simulation) -> list[Request]:
    return [r for _, r in sim.requests if r.span is not None]


def test_whole_chunks_leave_one_path_a_chunk_behind_and_pieces_end_them_together() -> None:
    total = sum(ODD_STUDY.values())
    t_min = total / (2 * MB)
    _, whole = simulate(ODD_STUDY, *sources([1 * MB] * 2), config=SwarmConfig(piece_bytes=0))
    _, split = simulate(ODD_STUDY, *sources([1 * MB] * 2))
    assert whole.run() and split.run()
    report("39 chunks over 2 paths", whole=whole.finished_at / t_min,
           split=split.finished_at / t_min)  # fmt: skip
    # Half a chunk at 1 MB/s is lost at the end without splitting: what the pieces win back.
    assert whole.finished_at - t_min >= 0.9 * CHUNK_BYTES / (2 * MB)
    assert split.finished_at - t_min <= PIECE / MB
    assert not spans_of(whole)
    spans = spans_of(split)
    assert spans
    for req in spans:
        start, end = req.span
        assert len(req.chunks) == 1 and start % PIECE == 0 and start < end
        assert end == ODD_STUDY[req.chunks[0]] or end % PIECE == 0
    assert wasted(split, total) == 0
    assert not split.violations
    # Pieces count as useful bytes of their peers once their chunk is assembled.
    assert sum(split.sched.progress(split.now).peer_bytes.values()) == total


@pytest.mark.parametrize("rates", [(0.3, 1.0, 1.7), (1.0, 1.0, 1.0, 1.0), (0.1, 2.0)])
def test_paths_of_any_speed_end_together(rates: tuple[float, ...]) -> None:
    chunks = study(41, tag="mixed")
    total = sum(chunks.values())
    _, sim = simulate(chunks, *sources([r * MB for r in rates]))
    assert sim.run()
    ratio = sim.finished_at / (total / (sum(rates) * MB))
    report(f"paths {rates} MB/s", ratio=ratio)
    assert ratio <= 1.015  # the first round trip (40 ms) and rate estimates
    assert wasted(sim, total) == 0


def test_pieces_of_a_path_that_dies_go_to_the_others() -> None:
    paths, peers = sources([1 * MB] * 2)
    _, probe = simulate(ODD_STUDY, paths, peers)
    assert probe.run()
    t_piece = min(t for t, r in probe.requests if r.span and r.path == "r0/adsl0")
    paths[0] = SimPath("r0/adsl0", "r0", 1 * MB, events=(LinkEvent(t_piece + 0.01, "die"),))
    sched, sim = simulate(ODD_STUDY, paths, peers)
    assert sim.run()
    lost = [r for t, r in sim.requests if r.span and r.path == "r0/adsl0"]
    assert lost
    for req in lost:  # each piece the dead path owed arrived over the other one
        assert sim.delivered_by[req.chunks[0]] == "r1/adsl0"
    assert sched.progress(sim.now).chunks_done == len(ODD_STUDY)


@pytest.mark.parametrize("kind", ["die", "stall"])
def test_what_a_lost_path_sent_of_its_chunk_is_kept_and_the_rest_comes_as_pieces(
    kind: str,
) -> None:
    paths, peers = sources([1 * MB] * 2)
    t_lost = 1.3  # r0 is part-way through its third chunk (0.52 s each)
    paths[0] = SimPath("r0/adsl0", "r0", 1 * MB, events=(LinkEvent(t_lost, kind),))
    _, sim = simulate(STUDY_40MB, paths, peers)
    assert sim.run()
    after = [r for t, r in sim.requests if t >= t_lost and r.span is not None]
    assert after and min(r.span[0] for r in after) > 0  # the received start is not asked again
    # Only the tail of the broken chunk below a piece boundary was lost.
    assert wasted(sim, TOTAL_40MB) < PIECE


def _stalled_part_way(tag: str) -> tuple[Scheduler, bytes, list]:
    """r0 delivers 3 pieces and a bit of its first chunk, then falls silent; r1 (same
    holdings) joins as r0 is found stalled. The chunk r0 was in and that actions() call."""
    sched = Scheduler(study(6, tag=tag), config=SwarmConfig(initial_rate=1 * MB))
    sched.set_peer_chunks("r0", None, 0.0)
    sched.set_peer_chunks("r1", None, 0.0)
    sched.add_path("r0/adsl0", "r0", 0.0)
    (first,) = sched.actions(0.0)
    assert isinstance(first, Request) and first.span is None
    sched.on_bytes(first.id, 3 * PIECE + 100, 0.1)
    sched.add_path("r1/adsl0", "r1", 0.1 + STALL)
    stalled = sched.actions(0.1 + STALL)
    assert Cancel(first.id, "r0/adsl0") in stalled
    return sched, first.chunks[0], stalled


def _deliver(sched: Scheduler, actions: Iterable, chunks: Mapping[bytes, int], now: float) -> None:
    for a in actions:
        if isinstance(a, Request) and a.span is None:
            for c in a.chunks:
                sched.on_bytes(a.id, chunks[c], now)
                sched.on_chunk(a.id, c, True, now)


def test_a_stalled_paths_part_way_chunk_waits_for_on_partial() -> None:
    sched, head, stalled = _stalled_part_way("held")
    # The chunk r0 was part-way through is held back from r1 in the call that found the stall.
    assert not any(isinstance(a, Request) and head in a.chunks for a in stalled)
    # Salvaged by the adapter as it carries out the Cancel: its whole pieces are kept and only
    # the rest of the chunk is fetched, as pieces.
    assert sched.on_partial(head, 3 * PIECE + 100, 0.1 + STALL) == 3 * PIECE
    _deliver(sched, stalled, study(6, tag="held"), 0.15 + STALL)
    later = [a for a in sched.actions(0.2 + STALL) if isinstance(a, Request) and head in a.chunks]
    assert later and all(a.span is not None and a.span[0] >= 3 * PIECE for a in later)


def test_a_held_chunk_nobody_salvaged_is_fetched_whole_at_the_next_call() -> None:
    sched, head, stalled = _stalled_part_way("unsalvaged")
    assert not any(isinstance(a, Request) and head in a.chunks for a in stalled)
    _deliver(sched, stalled, study(6, tag="unsalvaged"), 0.15 + STALL)
    again = [a for a in sched.actions(0.2 + STALL) if isinstance(a, Request) and head in a.chunks]
    assert again and again[0].span is None


def test_a_split_chunk_that_fails_assembly_is_fetched_whole_again() -> None:
    # r0 spoils everything but is never cut off: its pieces spoil split chunks.
    paths, peers = sources([1 * MB] * 2)
    peers[0] = SimPeer("r0", corrupt=True)
    config = SwarmConfig(bad_chunk_limit=10_000)
    sched, sim = simulate(ODD_STUDY, paths, peers, config=config)
    assert sim.run()
    assert set(sim.delivered_by.values()) == {"r1/adsl0"}
    spoiled = {r.chunks[0] for r in spans_of(sim) if r.path == "r0/adsl0"}
    assert spoiled
    for chunk in spoiled:
        after = [r for _, r in sim.requests if chunk in r.chunks]
        last_span = max(i for i, r in enumerate(after) if r.span is not None)
        assert after[-1].span is None and last_span < len(after) - 1  # then whole
    assert sched.progress(sim.now).corrupt_bytes >= len(spoiled) * CHUNK_BYTES
    # Its pieces were never credited to it: they only ever went into spoiled assemblies.
    assert sched.progress(sim.now).peer_bytes.get("r0", 0) == 0
    assert sched.progress(sim.now).paths["r0/adsl0"].delivered_bytes == 0


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "detect"), [("die", 0.0), ("stall", STALL)])
def test_a_source_lost_at_30_percent_costs_only_its_detection(kind: str, detect: float) -> None:
    t_event = 0.3 * TOTAL_40MB / (3 * MB)
    paths, peers = sources([1 * MB] * 3)
    paths[0] = SimPath("r0/adsl0", "r0", 1 * MB, events=(LinkEvent(t_event, kind),))
    sched, sim = simulate(STUDY_40MB, paths, peers, downlink=3 * MB)
    sim.run(until=t_event + detect - 0.05)
    assert sched.progress(sim.now).paths["r0/adsl0"].state is PathState.ACTIVE
    # Detected within the stall timeout of the last bytes (reports come every 16 ms here).
    sim.run(until=t_event + detect + 0.02)
    assert sched.progress(sim.now).paths["r0/adsl0"].state is PathState.BACKOFF
    assert sim.run()
    lost_at = sched.progress(sim.now).paths["r0/adsl0"].delivered_bytes
    ideal = (TOTAL_40MB - lost_at) / (2 * MB) + detect  # the rest at the remaining capacity
    ratio = sim.finished_at / ideal
    report(f"source {kind}s at 30 %", t=sim.finished_at, ideal=ideal, ratio=ratio)
    assert ratio <= 1.03


def test_a_path_back_after_dying_is_used_again_at_its_rate() -> None:
    paths, peers = sources([1 * MB] * 3)
    events = (LinkEvent(3.0, "die"), LinkEvent(7.0, "revive"))
    paths[0] = SimPath("r0/adsl0", "r0", 1 * MB, events=events)
    _, sim = simulate(STUDY_40MB, paths, peers, downlink=3 * MB)
    sim.run(until=7.0)
    before = sim.wire_bytes["r0/adsl0"]
    probes = [r for t, r in sim.requests if r.path == "r0/adsl0" and 3.0 < t < 7.0]
    assert probes and all(len(r.chunks) == 1 for r in probes)  # one probe chunk per retry
    assert sim.run()
    after = sim.wire_bytes["r0/adsl0"] - before
    report("path revived", bytes_after=after, t=sim.finished_at)
    assert after >= 5 * MB
    assert max(len(r.chunks) for t, r in sim.requests if r.path == "r0/adsl0" and t > 7.0) >= 2


def test_a_corrupt_peer_is_cut_off_and_its_chunks_fetched_elsewhere() -> None:
    paths, peers = sources([1 * MB] * 3)
    peers[0] = SimPeer("r0", corrupt=True)
    sched, sim = simulate(STUDY_40MB, paths, peers)
    assert sim.run()
    limit = sched.config.bad_chunk_limit
    [(t_cut, cut)] = sim.cut_offs
    assert cut == PeerCutOff("r0", t_cut + sched.config.ban_s, limit)
    progress = sched.progress(sim.now)
    assert progress.cut_off == {"r0": cut.until}
    assert progress.corrupt_bytes == limit * CHUNK_BYTES
    assert set(sim.delivered_by.values()) == {"r1/adsl0", "r2/adsl0"}
    assert not [r for t, r in sim.requests if r.path == "r0/adsl0" and t > t_cut]
    # The chunks r0 spoiled were asked of the others afterwards.
    spoiled = set(requested(sim, "r0/adsl0")) - {
        c for c, p in sim.delivered_by.items() if p == "r0"
    }
    assert spoiled <= set(requested(sim, "r1/adsl0")) | set(requested(sim, "r2/adsl0"))


def test_a_cut_off_peer_is_allowed_again_but_never_asked_for_a_chunk_it_spoiled() -> None:
    paths, peers = sources([1 * MB] * 2)
    peers[0] = SimPeer("r0", corrupt=True)
    config = SwarmConfig(ban_s=5.0)
    _, sim = simulate(STUDY_40MB, paths, peers, config=config)
    assert sim.run()
    assert len(sim.cut_offs) >= 2
    first_until = sim.cut_offs[0][1].until
    assert [r for t, r in sim.requests if r.path == "r0/adsl0" and t >= first_until]
    asked = requested(sim, "r0/adsl0")
    assert len(asked) == len(set(asked))


# -- which chunks go where --------------------------------------------------------------------


def test_a_partial_holder_is_asked_only_for_chunks_it_holds_as_they_grow() -> None:
    chunks = study(100)
    order = list(chunks)
    random.Random(5).shuffle(order)
    grows = {0.0: order[:20], 4.0: order[:30], 8.0: order[:40]}
    part = SimPeer(
        "part",
        chunks=frozenset(grows[0.0]),
        updates=tuple((t, frozenset(c)) for t, c in grows.items() if t),
    )
    paths = [SimPath("full/adsl0", "full", 1 * MB), SimPath("part/adsl0", "part", 1 * MB)]
    _, sim = simulate(chunks, paths, [SimPeer("full"), part])
    assert sim.run()
    assert not sim.violations
    late = set(order[30:40])
    asked_late = {
        c for t, r in sim.requests if r.path == "part/adsl0" and t >= 8.0 for c in r.chunks
    }
    assert asked_late & late  # it got chunks it only announced at t=8
    report(
        "partial holder", chunks_from_part=sum(p == "part/adsl0" for p in sim.delivered_by.values())
    )


def test_rarest_chunks_are_fetched_first_from_their_only_holder() -> None:
    chunks = study(100)
    common = frozenset(list(chunks)[:30])  # also held by three partial holders
    paths = [SimPath("full/adsl0", "full", 1 * MB)]
    paths += [SimPath(f"p{i}/adsl0", f"p{i}", 1 * MB) for i in range(3)]
    peers = [SimPeer("full")] + [SimPeer(f"p{i}", chunks=common) for i in range(3)]
    _, sim = simulate(chunks, paths, peers)
    assert sim.run()
    from_full = requested(sim, "full/adsl0")
    rare_first = next((i for i, c in enumerate(from_full) if c in common), len(from_full))
    report("rarest first", rare_before_first_common=rare_first, rare_total=70)
    assert rare_first >= 70


def test_holders_without_a_usable_path_do_not_make_chunks_common() -> None:
    chunks = study(40)
    half = frozenset(list(chunks)[:20])

    def full_holders_picks(other_has_path: bool) -> list[bytes]:
        sched = Scheduler(chunks, config=SwarmConfig(initial_rate=10 * MB))
        sched.set_peer_chunks("full", None, 0.0)
        sched.set_peer_chunks("other", half, 0.0)
        if other_has_path:
            sched.add_path("other/a", "other", 0.0)
        sched.add_path("full/a", "full", 0.0)
        [probe] = [r for r in sched.actions(0.0) if r.path == "full/a"]
        sched.on_bytes(probe.id, 1000, 0.1)  # active: a full batch next
        more = [r for r in sched.actions(0.1) if r.path == "full/a"]
        return [c for r in [probe, *more] for c in r.chunks]

    # 20 of the 40 chunks are held by "full" alone: those come first...
    assert not set(full_holders_picks(True)[:20]) & half
    # ...unless "other" has no path: then its holdings do not count, the order is random.
    assert set(full_holders_picks(False)[:20]) & half


def test_tie_break_order_is_random_per_seed_and_repeatable() -> None:
    def first_requests(seed: int) -> list[bytes]:
        paths, peers = sources([1 * MB])
        _, sim = simulate(STUDY_40MB, paths, peers, config=SwarmConfig(seed=seed))
        sim.run(until=8.0)
        return requested(sim, "r0/adsl0")[:10]

    orders = [first_requests(seed) for seed in range(4)]
    assert first_requests(0) == orders[0]
    assert len({tuple(o) for o in orders}) == 4
    assert orders[0] != list(STUDY_40MB)[:10]


def slowdown_run(endgame_max_copies: int) -> tuple[Scheduler, Simulation, float]:
    """Three 1 MB/s sources; at 70 % one slows to 20 kB/s, its queued chunks stuck."""
    t_slow = 0.7 * TOTAL_40MB / (3 * MB)
    paths, peers = sources([1 * MB] * 3)
    paths[0] = SimPath("r0/adsl0", "r0", 1 * MB, events=(LinkEvent(t_slow, "rate", 0.02 * MB),))
    config = SwarmConfig(endgame_max_copies=endgame_max_copies)
    sched, sim = simulate(STUDY_40MB, paths, peers, config=config)
    sim.run(until=t_slow)
    ideal = t_slow + (TOTAL_40MB - sched.progress(sim.now).bytes_done) / (2.02 * MB)
    assert sim.run()
    return sched, sim, ideal


def test_endgame_duplicates_few_bytes_and_cancels_the_losers() -> None:
    sched, sim, ideal = slowdown_run(endgame_max_copies=2)
    paths_of: dict[bytes, set[str]] = {}
    for _, r in sim.requests:
        for c in r.chunks:
            paths_of.setdefault(c, set()).add(r.path)
    duplicated = [c for c, ps in paths_of.items() if len(ps) > 1]
    waste = wasted(sim, TOTAL_40MB) / TOTAL_40MB
    ratio = sim.finished_at / ideal
    report("endgame", ratio=ratio, duplicated_chunks=len(duplicated), wasted=waste)
    assert ratio <= 1.03
    assert duplicated
    assert waste < 0.05
    assert sched.progress(sim.now).duplicate_bytes <= 2 * CHUNK_BYTES
    # The stuck requests on r0 were cancelled, each only once all it owed had arrived.
    losers = [(t, c) for t, c in sim.cancels if c.path == "r0/adsl0"]
    assert losers
    for t, cancel in sim.cancels:
        assert all(sim.delivered_at[c] <= t for c in sim.cancelled[cancel.id])
    # Without duplicates the stuck chunks set the pace.
    _, plain, _ = slowdown_run(endgame_max_copies=1)
    report("no endgame", ratio=plain.finished_at / ideal)
    assert plain.finished_at > 2 * sim.finished_at


def test_endgame_copies_go_to_another_line_only() -> None:
    """r0 and r1 come in over our line A, r2 over line B; r0 slows down near the end. A copy
    of r0's chunks on r1 would share line A with the original (no sooner, bytes wasted): the
    copies go over line B only."""
    t_slow = 0.7 * TOTAL_40MB / (3 * MB)
    paths = [
        SimPath("r0@A", "r0", 1 * MB, line="A", events=(LinkEvent(t_slow, "rate", 0.02 * MB),)),
        SimPath("r1@A", "r1", 1 * MB, line="A"),
        SimPath("r2@B", "r2", 1 * MB, line="B"),
    ]
    peers = [SimPeer(f"r{i}") for i in range(3)]
    _, sim = simulate(STUDY_40MB, paths, peers, config=SwarmConfig(endgame_max_copies=2))
    sim.run(until=t_slow)
    before = {name: len(requested(sim, name)) for name in ("r1@A", "r2@B")}
    assert sim.run()
    on_path: dict[bytes, list[str]] = {}
    for _, r in sim.requests:
        for c in r.chunks:
            on_path.setdefault(c, []).append(r.path)
    copies = [ps for ps in on_path.values() if len(ps) > 1]
    assert copies, "the slowed path's chunks were never copied"
    of_r0 = [ps[1:] for ps in copies if ps[0] == "r0@A"]
    assert of_r0 and all(ps == ["r2@B"] for ps in of_r0), copies
    assert len(requested(sim, "r2@B")) > before["r2@B"]


def test_resume_never_requests_chunks_already_held() -> None:
    have = list(STUDY_40MB)[::2]
    paths, peers = sources([1 * MB])
    sched, sim = simulate(STUDY_40MB, paths, peers, have=have)
    assert sched.progress(0.0).bytes_done == TOTAL_40MB // 2
    assert sim.run()
    assert not set(requested(sim, "r0/adsl0")) & set(have)
    assert sim.finished_at <= 1.03 * (TOTAL_40MB / 2) / MB
    done = Scheduler(STUDY_40MB, have=STUDY_40MB)
    done.set_peer_chunks("r0", None, 0.0)
    done.add_path("r0/adsl0", "r0", 0.0)
    assert done.done and done.actions(0.0) == [] and done.next_deadline() is None


# -- the core alone ---------------------------------------------------------------------------


def one_path(state: PathState, chunks: int = 8) -> tuple[Scheduler, int, float]:
    """A scheduler with path "a" to complete holder "A" in `state`: (sched, its request, now)."""
    sched = Scheduler(study(chunks), config=SwarmConfig(path_retry_s=10.0))
    sched.set_peer_chunks("A", None, 0.0)
    sched.add_path("a", "A", 0.0)
    [probe] = sched.actions(0.0)
    assert isinstance(probe, Request) and len(probe.chunks) == 1
    if state is PathState.PROBING:
        return sched, probe.id, 0.0
    sched.on_bytes(probe.id, 1000, 0.1)
    if state is PathState.ACTIVE:
        return sched, probe.id, 0.1
    sched.on_request_end(probe.id, 0.1, error="connection reset")
    return sched, probe.id, 0.1


def fire(sched: Scheduler, event: PathEvent, rid: int, now: float) -> None:
    if event is PathEvent.DATA:
        sched.on_bytes(rid, 1000, now + 0.1)
    elif event is PathEvent.STALL:
        sched.actions(now + STALL)  # silent for the stall timeout
    elif event is PathEvent.ERROR:
        sched.on_request_end(rid, now + 0.1, error="connection reset")
    else:  # the backoff timer: due for a backing-off path, a no-op moment for the others
        sched.actions(
            sched.next_deadline() if sched.progress(now).paths["a"].retry_at else now + 0.5
        )


P, A, B = PathState.PROBING, PathState.ACTIVE, PathState.BACKOFF
D, S, E, R = PathEvent.DATA, PathEvent.STALL, PathEvent.ERROR, PathEvent.RETRY
CELLS = {
    (P, D): A, (P, S): B, (P, E): B, (P, R): P,
    (A, D): A, (A, S): B, (A, E): B, (A, R): A,
    (B, D): B, (B, S): B, (B, E): B, (B, R): P,
}  # fmt: skip


@pytest.mark.parametrize(("state", "event"), list(CELLS), ids=lambda x: x.value)
def test_path_state_table(state: PathState, event: PathEvent) -> None:
    sched, rid, now = one_path(state)
    fire(sched, event, rid, now)
    assert sched.progress(now).paths["a"].state is CELLS[state, event]
    assert TRANSITIONS.get((state, event), state) is CELLS[state, event]


def test_entering_backoff_cancels_and_requeues_and_the_delay_grows() -> None:
    sched = Scheduler(study(8), config=SwarmConfig(path_retry_s=1.0))
    sched.set_peer_chunks("A", None, 0.0)
    sched.set_peer_chunks("B", None, 0.0)
    sched.add_path("a", "A", 0.0)
    sched.add_path("b", "B", 0.0)
    reqs = {r.path: r for r in sched.actions(0.0)}
    sched.on_bytes(reqs["a"].id, 1000, 0.05)
    sched.on_bytes(reqs["b"].id, 1000, 0.05)
    more = [r for r in sched.actions(0.05) if r.path == "a"]
    # A stall of "a" (b keeps talking): all of a's requests cancelled, chunks go to b.
    sched.on_bytes(reqs["b"].id, 1000, 2.0)
    out = sched.actions(0.05 + STALL)
    cancelled = {c.id for c in out if isinstance(c, Cancel)}
    assert cancelled == {reqs["a"].id} | {r.id for r in more}
    lost = set(reqs["a"].chunks).union(*(r.chunks for r in more))
    sched.on_chunk(reqs["b"].id, reqs["b"].chunks[0], True, 2.1)
    sched.on_bytes(reqs["b"].id, 1000, 2.1)
    retaken = {c for r in sched.actions(2.1) if isinstance(r, Request) for c in r.chunks}
    assert lost & retaken
    # Repeated failures of "a": retry delays ~1, 2, 4 s (+-10 % jitter), one probe each.
    delays, now = [], 0.05 + STALL
    for _ in range(3):
        retry_at = sched.progress(now).paths["a"].retry_at
        delays.append(retry_at - now)
        now = retry_at
        [probe] = [r for r in sched.actions(now) if isinstance(r, Request) and r.path == "a"]
        assert len(probe.chunks) == 1
        sched.on_request_end(probe.id, now, error="connection refused")
    assert [round(d) for d in delays] == [1, 2, 4]


def test_remove_path_requeues_its_chunks_at_once() -> None:
    chunks = study(4)
    sched = Scheduler(chunks)
    sched.set_peer_chunks("A", None, 0.0)
    sched.add_path("a", "A", 0.0)
    sched.add_path("a2", "A", 0.0)
    reqs = sched.actions(0.0)
    sched.remove_path("a", 0.5)
    out = sched.actions(0.5)
    assert Cancel(reqs[0].id, "a") in out if reqs[0].path == "a" else Cancel(reqs[1].id, "a") in out
    sched.on_request_end(next(r.id for r in reqs if r.path == "a2"), 0.6)  # frees a2's probe
    lost = next(r for r in reqs if r.path == "a").chunks
    asked = {c for r in sched.actions(0.6) if isinstance(r, Request) for c in r.chunks}
    assert set(lost) <= asked
    assert all(r.path == "a2" for r in sched.actions(0.7) if isinstance(r, Request))


def test_holdings_that_shrink_cancel_and_requeue_the_dropped_work() -> None:
    chunks = study(6)
    digests = list(chunks)
    sched = Scheduler(chunks)
    sched.set_peer_chunks("P", digests, 0.0)
    sched.add_path("p", "P", 0.0)
    [req] = sched.actions(0.0)
    sched.set_peer_chunks("P", [d for d in digests if d not in req.chunks], 1.0)
    out = sched.actions(1.0)
    assert out[0] == Cancel(req.id, "p")
    assert not set(req.chunks) & {c for r in out[1:] for c in r.chunks}
    sched.set_peer_chunks("F", None, 1.0)
    sched.add_path("f", "F", 1.0)
    [again] = [r for r in sched.actions(1.0) if r.path == "f"]
    assert again.chunks == req.chunks  # the only chunk nobody else could serve


def test_a_clean_response_without_a_chunk_means_the_peer_lacks_it() -> None:
    sched = Scheduler(study(1))
    sched.set_peer_chunks("A", None, 0.0)
    sched.add_path("a", "A", 0.0)
    [req] = sched.actions(0.0)
    sched.on_request_end(req.id, 0.5)  # ended without sending it
    assert sched.actions(0.5) == []
    sched.set_peer_chunks("A", None, 1.0)  # fresh holdings: asked again
    assert [r.chunks for r in sched.actions(1.0)] == [req.chunks]


def test_a_chunk_that_lands_after_its_cancel_still_counts() -> None:
    chunks = study(2)
    sched = Scheduler(chunks)
    sched.set_peer_chunks("A", None, 0.0)
    sched.add_path("a", "A", 0.0)
    [req] = sched.actions(0.0)
    sched.remove_path("a", 0.1)
    sched.on_chunk(req.id, req.chunks[0], True, 0.2)
    sched.on_chunk(req.id, next(c for c in chunks if c != req.chunks[0]), False, 0.2)  # ignored
    assert sched.progress(0.2).chunks_done == 1


def test_rate_is_measured_from_whole_chunks_when_bytes_are_not_reported() -> None:
    # An adapter that only reports chunk ends still gets queues sized from the rate.
    paths, peers = sources([1 * MB])
    sched, sim = simulate(STUDY_40MB, paths, peers, report_bytes=CHUNK_BYTES)
    sim.run(until=10.0)
    assert sched.progress(sim.now).paths["r0/adsl0"].rate == pytest.approx(MB, rel=0.03)


@pytest.mark.parametrize(
    "bad",
    [{"queue_seconds": 0}, {"max_batch_chunks": 0}, {"ban_s": -1}, {"endgame_max_copies": 0}],
)
def test_config_rejects_values_out_of_range(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SwarmConfig(**bad)


def test_config_from_the_mesh_section() -> None:
    mesh = MeshConfig(queue_seconds=3.0, stall_timeout_s=4.0, bad_chunk_limit=5, ban_s=60.0)
    config = SwarmConfig.from_mesh(mesh, seed=9)
    assert (config.queue_seconds, config.stall_timeout_s) == (3.0, 4.0)
    assert (config.bad_chunk_limit, config.ban_s, config.seed) == (5, 60.0, 9)


def test_progress_reports_rates_eta_and_endgame() -> None:
    rates = [1 * MB, 1 * MB]
    paths, peers = sources(rates)
    sched, sim = simulate(STUDY_40MB, paths, peers)
    sim.run(until=10.0)
    p = sched.progress(sim.now)
    assert p.chunks_total == 80 and p.bytes_total == TOTAL_40MB
    left = (TOTAL_40MB - p.bytes_done) / (2 * MB)
    assert p.eta_s == pytest.approx(left, rel=0.02)
    assert not p.endgame
    assert set(p.peer_bytes) == {"r0", "r1"} and sum(p.peer_bytes.values()) == p.bytes_done
    sim.run(until=sim.now + left - 1.0)
    assert sched.progress(sim.now).endgame


# -- determinism and cost ---------------------------------------------------------------------


def busy_scenario(seed: int) -> list[tuple[float, str, tuple[bytes, ...] | int]]:
    """A download with partial holders, a death and a stall: its log of actions."""
    chunks = study(120, tag="busy")
    part = frozenset(list(chunks)[::3])
    paths = [
        SimPath("a/0", "a", 1 * MB, events=(LinkEvent(5.0, "die"), LinkEvent(9.0, "revive"))),
        SimPath("a/1", "a", 0.5 * MB),
        SimPath("b/0", "b", 2 * MB, events=(LinkEvent(6.0, "stall"),)),
        SimPath("c/0", "c", 1 * MB),
    ]
    peers = [SimPeer("a"), SimPeer("b"), SimPeer("c", chunks=part)]
    _, sim = simulate(chunks, paths, peers, config=SwarmConfig(seed=seed), downlink=3 * MB)
    assert sim.run()
    log: list[tuple[float, str, tuple[bytes, ...] | int]] = [
        (t, r.path, r.chunks) for t, r in sim.requests
    ]
    log += [(t, c.path, c.id) for t, c in sim.cancels]
    return sorted(log, key=lambda e: (e[0], e[1], str(e[2])))


def test_same_seed_same_run_other_seed_other_run() -> None:
    assert busy_scenario(7) == busy_scenario(7)
    assert busy_scenario(7) != busy_scenario(8)


def test_runs_do_not_depend_on_python_hash_randomisation() -> None:
    code = (
        "import hashlib, test_swarm_core as t;"
        "print(hashlib.sha256(repr(t.busy_scenario(3)).encode()).hexdigest())"
    )
    here = os.path.dirname(__file__)
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env=os.environ | {"PYTHONHASHSEED": str(hs), "PYTHONPATH": here},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hs in (1, 2)
    }
    assert len(outs) == 1


def test_a_4000_chunk_download_over_8_paths_is_cheap() -> None:
    rng = random.Random(1)
    sizes = [CHUNK_BYTES, CHUNK_BYTES, 300_000, 1 << 20]  # CT slices and split instances
    chunks = {hashlib.sha256(b"big%d" % i).digest(): rng.choice(sizes) for i in range(4000)}
    rates = [0.1, 0.2, 0.5, 1, 1, 2, 3, 5]
    paths = [SimPath(f"p{i}", f"peer{i % 6}", r * MB) for i, r in enumerate(rates)]
    peers = [SimPeer(f"peer{i}") for i in range(6)]
    start = time.process_time()
    _, sim = simulate(chunks, paths, peers, report_bytes=128 * 1024)
    assert sim.run()
    cpu = time.process_time() - start
    ratio = sim.finished_at / (sum(chunks.values()) / (sum(rates) * MB))
    report("4000 chunks, 8 paths", cpu_s=cpu, steps=sim.steps, ratio=ratio)
    assert cpu < 1.0
    assert ratio <= 1.03
