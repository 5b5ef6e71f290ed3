"""A simulated network that drives a swarm Scheduler: discrete events over fluid paths.

Used by the swarm tests and the QoS simulator to predict how long a study takes over a given
set of paths. The model is deliberately simple, so that results can be checked by hand:
- A path serves its requests in order. A request can be served once it reached the peer and
  its first byte came back (issue time + 2 x latency); bytes then flow at the path's rate,
  request after request without a gap when the next one is already there.
- The downloader's downlink is shared by processor sharing: when the active paths' rates add
  up to more than the downlink, each one is slowed in proportion.
- `efficiency` scales every rate (0.957: TCP/IP headers on 1500-byte packets).
- Progress is reported every `report_bytes` and at each chunk's end; the scheduler's actions
  are applied after every batch of simultaneous events and at its deadlines.
- Scripted per path: die (requests fail, new ones are refused after a round trip), stall
  (bytes stop silently, requests hang), revive, rate change. Peers may change holdings over
  time, and a corrupt peer's chunks all fail verification.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from appliance.mesh.swarm.api import Action, Cancel, PeerCutOff, Request
from appliance.mesh.swarm.core import Scheduler

# Progress this close to a report point counts as at it (float rounding of rate x time).
_EPS = 1e-6
# Steps without time advancing before the run is declared stuck (a deadline never cleared).
_MAX_IDLE_STEPS = 10_000


@dataclass(frozen=True)
class LinkEvent:
    """At `at`, a path dies, stalls silently, revives, or changes rate to `rate`."""

    at: float
    kind: Literal["die", "stall", "revive", "rate"]
    rate: float = 0.0


@dataclass(frozen=True)
class SimPath:
    """A path to `peer` that can carry `rate` bytes/s (the peer's uplink share on it)."""

    name: str
    peer: str
    rate: float
    latency: float = 0.02  # one way, seconds
    start: float = 0.0  # when the scheduler learns about it
    events: tuple[LinkEvent, ...] = ()
    line: str | None = None  # our uplink, as the scheduler is told (capacity is `rate` here)


@dataclass(frozen=True)
class SimPeer:
    """A peer's holdings (None: everything), their later changes, and whether it corrupts."""

    name: str
    chunks: frozenset[bytes] | None = None
    updates: tuple[tuple[float, frozenset[bytes] | None], ...] = ()
    corrupt: bool = False


class _Flow:
    """One request as the network carries it."""

    __slots__ = ("chunks", "id", "index", "ready_at", "reported", "sent", "span", "target")

    def __init__(
        self,
        rid: int,
        chunks: tuple[bytes, ...],
        ready_at: float,
        span: tuple[int, int] | None = None,
    ) -> None:
        self.id = rid
        self.chunks = chunks
        self.span = span  # a piece request: these bytes of its one chunk
        self.ready_at = ready_at
        self.index = 0  # chunk being sent
        self.sent = 0.0  # bytes of it sent
        self.reported = 0  # bytes of it reported
        self.target = 0  # bytes of it at the next report point


class _Link:
    __slots__ = ("flows", "latency", "name", "peer", "rate", "speed", "state")

    def __init__(self, spec: SimPath) -> None:
        self.name = spec.name
        self.peer = spec.peer
        self.rate = spec.rate
        self.latency = spec.latency
        self.state = "up"  # up | dead | stalled
        self.flows: deque[_Flow] = deque()
        self.speed = 0.0  # current bytes/s after downlink sharing


class Simulation:
    """Run a Scheduler against simulated paths; all times are simulated seconds."""

    def __init__(
        self,
        scheduler: Scheduler,
        chunk_sizes: Mapping[bytes, int],
        paths: Iterable[SimPath],
        peers: Iterable[SimPeer],
        *,
        downlink: float = math.inf,
        report_bytes: int = 16 * 1024,
        efficiency: float = 1.0,
    ) -> None:
        self.sched = scheduler
        self.sizes = dict(chunk_sizes)
        self.downlink = downlink
        self.report_bytes = report_bytes
        self.efficiency = efficiency
        self.now = 0.0
        self.finished_at: float | None = None if not scheduler.done else 0.0
        self.steps = 0
        self.requests: list[tuple[float, Request]] = []
        self.cancels: list[tuple[float, Cancel]] = []
        self.cut_offs: list[tuple[float, PeerCutOff]] = []
        self.violations: list[str] = []  # requests for chunks the peer did not hold
        self.delivered_by: dict[bytes, str] = {}  # chunk -> path of its first good copy
        self.delivered_at: dict[bytes, float] = {}
        self.cancelled: dict[int, tuple[bytes, ...]] = {}  # request -> chunks it had not sent
        self.wire_bytes: dict[str, int] = {}  # payload bytes per path, wasted ones included
        self._links: dict[str, _Link] = {}
        self._holdings: dict[str, frozenset[bytes] | None] = {}
        self._corrupt: set[str] = set()
        self._refusing: set[int] = set()
        # split chunks: byte ranges received so far, and whether a corrupt peer sent one
        self._pieces: dict[bytes, list[tuple[int, int]]] = {}
        self._tainted: set[bytes] = set()
        self._timers: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._idle_steps = 0
        for peer in peers:
            self._holdings[peer.name] = peer.chunks
            if peer.corrupt:
                self._corrupt.add(peer.name)
            scheduler.set_peer_chunks(peer.name, peer.chunks, 0.0)
            for at, chunks in peer.updates:
                self._at(at, "holdings", (peer.name, chunks))
        for spec in paths:
            self.wire_bytes[spec.name] = 0
            self._at(spec.start, "add", spec)
            for ev in spec.events:
                self._at(ev.at, ev.kind, (spec.name, ev.rate))

    def run(self, until: float = math.inf) -> bool:
        """Advance to `until` or to the end of the download; True when it is complete."""
        while self.finished_at is None and self.now < until:
            if not self._step(until):
                break  # nothing left that could happen
        return self.finished_at is not None

    def _step(self, until: float) -> bool:
        now = self.now
        t_next = until
        if self._timers and self._timers[0][0] < t_next:
            t_next = self._timers[0][0]
        deadline = self.sched.next_deadline()
        if deadline is not None and deadline < t_next:
            t_next = max(deadline, now)
        active = []
        total = 0.0
        for link in self._links.values():
            if link.state != "up" or not link.flows:
                continue
            ready_at = link.flows[0].ready_at
            if ready_at > now:
                if ready_at < t_next:
                    t_next = ready_at
                continue
            active.append(link)
            total += link.rate
        if active:
            share = self.efficiency * (min(1.0, self.downlink / total) if total > 0 else 1.0)
            for link in active:
                link.speed = speed = link.rate * share
                if speed > 0:
                    head = link.flows[0]
                    at = now + (head.target - head.sent) / speed
                    if at < t_next:
                        t_next = at
        if t_next == math.inf:
            return False
        self.steps += 1
        self._idle_steps = self._idle_steps + 1 if t_next == now else 0
        if self._idle_steps > _MAX_IDLE_STEPS:
            raise RuntimeError(f"simulation stuck at {now:.6f}s: time does not advance")
        dt = t_next - now
        self.now = t_next
        changed = False
        for link in active:
            head = link.flows[0]
            head.sent += link.speed * dt
            if head.sent >= head.target - _EPS:
                self._report(link, head)
                changed = True
        while self._timers and self._timers[0][0] <= self.now:
            _, _, kind, arg = heapq.heappop(self._timers)
            self._fire(kind, arg)
            changed = True
        if changed or (deadline is not None and deadline <= self.now):
            self._apply(self.sched.actions(self.now))
        if self.sched.done and self.finished_at is None:
            self.finished_at = self.now
        return True

    def _aim(self, flow: _Flow) -> None:
        """Set the flow's next report point: report_bytes further, or its chunk's end."""
        flow.target = min(flow.reported + self.report_bytes, self._flow_size(flow))

    def _flow_size(self, flow: _Flow) -> int:
        if flow.span is not None:
            return flow.span[1] - flow.span[0]
        return self.sizes[flow.chunks[flow.index]]

    def _report(self, link: _Link, flow: _Flow) -> None:
        digest = flow.chunks[flow.index]
        upto = flow.target
        nbytes = upto - flow.reported
        flow.reported = upto
        flow.sent = float(upto)
        self.wire_bytes[link.name] += nbytes
        self.sched.on_bytes(flow.id, nbytes, self.now)
        if upto < self._flow_size(flow):
            self._aim(flow)
            return
        if flow.span is not None:
            link.flows.popleft()
            self.sched.on_span(flow.id, digest, self.now)
            self._piece_arrived(link, digest, flow.span)
            return
        ok = link.peer not in self._corrupt
        if ok and digest not in self.delivered_by:
            self.delivered_by[digest] = link.name
            self.delivered_at[digest] = self.now
        self.sched.on_chunk(flow.id, digest, ok, self.now)
        flow.index += 1
        flow.sent = 0.0
        flow.reported = 0
        if flow.index == len(flow.chunks):
            link.flows.popleft()
            self.sched.on_request_end(flow.id, self.now)
        else:
            self._aim(flow)

    def _salvage(self, link: _Link, flow: _Flow) -> None:
        """A whole-chunk flow broke off: offer what arrived of its current chunk."""
        if flow.span is not None or not flow.reported:
            return
        digest = flow.chunks[flow.index]
        kept = self.sched.on_partial(digest, flow.reported, self.now)
        if kept:
            self._pieces.setdefault(digest, []).append((0, kept))
            if link.peer in self._corrupt:
                self._tainted.add(digest)

    def _piece_arrived(self, link: _Link, digest: bytes, span: tuple[int, int]) -> None:
        """Assemble a split chunk once its pieces cover it (verification takes no time)."""
        got = self._pieces.setdefault(digest, [])
        got.append(span)
        if link.peer in self._corrupt:
            self._tainted.add(digest)
        covered = 0
        for start, end in sorted(got):
            if start > covered:
                return
            covered = max(covered, end)
        if covered < self.sizes[digest]:
            return
        del self._pieces[digest]
        ok = digest not in self._tainted
        self._tainted.discard(digest)
        if ok and digest not in self.delivered_by:
            self.delivered_by[digest] = link.name
            self.delivered_at[digest] = self.now
        self.sched.on_assembled(digest, ok, self.now)

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Request):
                self._request(action)
            elif isinstance(action, Cancel):
                self.cancels.append((self.now, action))
                self._refusing.discard(action.id)
                flows = self._links[action.path].flows
                for flow in flows:
                    if flow.id == action.id:
                        flows.remove(flow)
                        self.cancelled[flow.id] = flow.chunks[flow.index :]
                        self._salvage(self._links[action.path], flow)
                        break
            else:
                self.cut_offs.append((self.now, action))

    def _request(self, req: Request) -> None:
        self.requests.append((self.now, req))
        link = self._links[req.path]
        held = self._holdings.get(link.peer)
        if held is not None and not held.issuperset(req.chunks):
            self.violations.append(f"{self.now:.3f}s {req.path}: chunk not held by {link.peer}")
        if link.state == "dead":
            self._refusing.add(req.id)
            self._at(self.now + 2 * link.latency, "refuse", req.id)
        else:
            flow = _Flow(req.id, req.chunks, self.now + 2 * link.latency, req.span)
            self._aim(flow)
            link.flows.append(flow)

    def _at(self, at: float, kind: str, arg: Any) -> None:
        # The sequence number keeps same-time timers in scripted order (and never compares args).
        self._seq += 1
        heapq.heappush(self._timers, (at, self._seq, kind, arg))

    def _fire(self, kind: str, arg: Any) -> None:
        now = self.now
        if kind == "add":
            self._links[arg.name] = _Link(arg)
            self.sched.add_path(arg.name, arg.peer, now, arg.line)
        elif kind == "holdings":
            peer, chunks = arg
            self._holdings[peer] = chunks
            self.sched.set_peer_chunks(peer, chunks, now)
        elif kind == "refuse":
            if arg in self._refusing:
                self._refusing.discard(arg)
                self.sched.on_request_end(arg, now, error="connection refused")
        else:
            link = self._links[arg[0]]
            if kind == "die":
                link.state = "dead"
                flows, link.flows = link.flows, deque()
                for flow in flows:
                    self.sched.on_request_end(flow.id, now, error="connection reset")
                    self._salvage(link, flow)
            elif kind == "stall":
                link.state = "stalled"
            elif kind == "revive":
                link.state = "up"
            elif kind == "rate":
                link.rate = arg[1]
