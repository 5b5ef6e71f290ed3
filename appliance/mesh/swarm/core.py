"""The swarm scheduler: which chunks to ask which path for, and when. I/O-free.

A study is a set of chunks (SHA-256 digest -> size). Peers hold some of them; a *path* is one
way to reach a peer (peer, local uplink), named by a string. The adapter (swarm/download.py)
feeds the scheduler events stamped with the current time and carries out its actions:

    sched = Scheduler(chunk_sizes, have=stored, config=SwarmConfig.from_mesh(cfg.mesh))
    sched.set_peer_chunks("r1", None, now); sched.add_path("r1/adsl0", "r1", now)
    while not sched.done:
        for action in sched.actions(now): Request -> send that batch on that path;
            Cancel -> abort that request; PeerCutOff -> log it (emitted once per cut-off)
        wait for I/O or until sched.next_deadline(), then report what happened:
        on_bytes / on_chunk / on_request_end, set_peer_chunks, add_path / remove_path

Event contract:
- on_bytes(id, n): n payload bytes of request `id` arrived, counted in chunk bytes (report
  decompressed progress for a chunk that travels compressed); all of a chunk's bytes are
  reported before its on_chunk. Drives the rate meter and stall detection.
- on_chunk(id, digest, ok): that chunk arrived whole; ok=False: it failed verification.
  A request whose chunks have all arrived is finished; its end event is then optional.
- on_span(id, digest): a piece request (Request.span set) delivered all of its bytes; they
  cannot be verified alone. on_assembled(digest, ok): the adapter put a split chunk's pieces
  together and checked it (ok=False: it failed; it is then fetched whole, from one path).
- on_partial(digest, nbytes) -> kept: after the end (or cancel) of a stream that broke
  part-way through a chunk, its first nbytes having arrived. Unless another request already
  carries the chunk, it is split and the whole pieces among those bytes count as received;
  the adapter keeps the first `kept` bytes for assembly. For a Cancel, report it when
  carrying the Cancel out: a chunk a stalled path was part-way through is held back from the
  other paths until then (until the next actions() call at the latest).
- on_request_end(id, error): the response is over. error=None: chunks it did not deliver
  are re-queued and taken as no longer held by that peer until its next set_peer_chunks.
  error set (refused, reset, timeout): the path backs off and its other requests are cancelled.
- After a Cancel (or remove_path) events for that request are ignored, except that a chunk
  which still arrives and verifies counts as done (the adapter has stored it).

How it decides:
- Rarest first: a path takes, among chunks nobody is fetching, those held by the fewest
  usable peers (not cut off, with a path not backing off); ties are broken by a seeded random
  order drawn per download, so holders of a popular study do not all serve the same chunks.
- Queues in seconds: a path's budget is rate x queue_seconds. When the bytes it still has to
  deliver fall below half the budget it is topped up to the budget (at least one chunk) in
  requests of <= max_batch_chunks: ~2 requests in flight, the next one sent queue_seconds/2
  before the line would idle, so no round trip is lost between requests. The rate is measured
  while the path has work (paths.RateMeter); a new path sends one chunk first. Near the end a
  slow path leaves a chunk to a path that would deliver it clearly sooner.
- Endgame: when no unrequested chunk is left that a usable peer holds, a path with spare budget
  duplicates the outstanding chunk expected to arrive last, if it would itself deliver it at
  least endgame_min_gain_s sooner, one chunk per request and at most endgame_max_copies copies,
  and never over one of our lines already carrying it (paths on one line share its rate).
  When a chunk arrives, every other request whose remaining chunks are all done is cancelled.
- Stalls and failures: a path silent for stall_timeout_s with work outstanding, or whose
  request fails, backs off (path_retry_s, doubling, +-10 % seeded jitter); its requests are
  cancelled and their chunks re-queued at once, except a chunk it was part-way through (at
  least one piece in), which waits for the adapter's on_partial so its start is kept. After
  the backoff one probe chunk is sent; once bytes flow the path gets work again at its last
  measured rate.
- Corrupt chunks: the chunk is re-queued, never again from that peer; at bad_chunk_limit strikes
  the peer is cut off for ban_s (its requests cancelled, PeerCutOff emitted), then allowed again.
- Tail: whole chunks leave the paths finishing up to one chunk apart (0.5 s for 512 KiB at
  1 MB/s, all of it lost when the count does not divide evenly). So when a chunk would not fit
  in a path's share of the remaining time (its rate x time to the estimated end, minus what it
  still has queued), the chunk is split into pieces of piece_bytes and the path takes only the
  pieces that fit; the rest stays fresh for the other paths. A piece that fits nowhere goes to
  the path that would deliver it first. Pieces are not duplicated in the endgame; a path that fails
  gives its pieces back like chunks. A split chunk that fails verification after assembly
  cannot be blamed on one peer: it is fetched whole again, where the corruption rules apply.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable, Mapping

from appliance.mesh.swarm.api import (
    Action,
    Cancel,
    PathStatus,
    PeerCutOff,
    Progress,
    Request,
    SwarmConfig,
)
from appliance.mesh.swarm.paths import TRANSITIONS, PathEvent, PathRecord, PathState, RateMeter
from appliance.mesh.swarm.pool import ChunkPool, Peer

__all__ = [
    "Action",
    "Cancel",
    "PathStatus",
    "PeerCutOff",
    "Progress",
    "Request",
    "Scheduler",
    "SwarmConfig",
]


class _Request:
    __slots__ = ("id", "path", "pending", "progress", "span", "span_bytes")

    def __init__(self, rid: int, path: PathRecord) -> None:
        self.id = rid
        self.path = path
        self.pending: deque[int] = deque()  # chunks not yet delivered, in response order
        self.progress = 0  # bytes received of pending[0]
        self.span: tuple[int, int] | None = None  # pieces [a, b) of its one chunk
        self.span_bytes = 0


class Scheduler:
    """Plans one study's download over many paths; see the module docstring for the contract."""

    def __init__(
        self,
        chunk_sizes: Mapping[bytes, int],
        have: Iterable[bytes] = (),
        config: SwarmConfig | None = None,
    ) -> None:
        self.config = config = config or SwarmConfig()
        self._rng = random.Random(config.seed)
        self._pool = pool = ChunkPool(chunk_sizes, self._rng)
        self._carriers: dict[int, list[_Request]] = {}  # chunk -> requests still owing it
        self._paths: dict[str, PathRecord] = {}
        self._peers: dict[str, Peer] = {}
        self._requests: dict[int, _Request] = {}
        self._next_id = 1
        self._out: list[Action] = []
        self._horizon: float | None = None  # _end_estimate(), cached per actions() call
        self._timers_from = -math.inf  # no timer (stall, retry, cut-off) is due before this
        self._duplicate_bytes = 0
        self._corrupt_bytes = 0
        self._whole_only: set[int] = set()  # split chunks that failed assembly
        # Pieces delivered per split chunk, credited to their paths once it is assembled.
        self._piece_credit: dict[int, list[tuple[PathRecord, int]]] = {}
        # Heads of streams cancelled part-way by a backoff, kept from the other paths until the
        # adapter salvages them (on_partial) or the next actions() call.
        self._held: list[int] = []
        for d in have:
            i = pool.index.get(d)
            if i is not None and not pool.done[i]:
                pool.mark_done(i)

    # -- inputs --------------------------------------------------------------------------

    def add_path(self, path: str, peer: str, now: float, line: str | None = None) -> None:
        """A new way to reach `peer` over our uplink `line` (None: unknown); it starts with
        one probe chunk."""
        old = self._paths.get(path)
        if old is not None:
            if old.peer == peer and old.line == line:
                return
            self.remove_path(path, now)
        meter = RateMeter(self.config.initial_rate, self.config.rate_window_s)
        rec = self._paths[path] = PathRecord(path, peer, meter, now, line)
        self._peer(peer).paths[path] = rec
        self._pool.dirty = True

    def remove_path(self, path: str, now: float) -> None:
        """Forget a path: its requests are cancelled and their chunks re-queued at once."""
        rec = self._paths.pop(path, None)
        if rec is None:
            return
        for req in list(rec.requests.values()):
            self._cancel(req)
        del self._peers[rec.peer].paths[path]
        self._pool.dirty = True

    def set_peer_chunks(self, peer: str, chunks: Iterable[bytes] | None, now: float) -> None:
        """What `peer` holds now (None: all); requests for chunks it dropped are cancelled."""
        p = self._peer(peer)
        pool = self._pool
        if chunks is None:
            new = None
        else:
            new = {pool.index[d] for d in chunks if d in pool.index}
            for rec in p.paths.values():
                for req in list(rec.requests.values()):
                    if any(j not in new and not pool.done[j] for j in req.pending):
                        self._cancel(req)
        p.chunks = new
        p.missing.clear()
        pool.dirty = True

    def on_bytes(self, request_id: int, nbytes: int, now: float) -> None:
        """Payload bytes of a request arrived (progress inside its current chunk)."""
        req = self._requests.get(request_id)
        if req is None or nbytes <= 0:
            return
        path = req.path
        self._data(path, now)
        path.meter.add(nbytes, now)
        if req.pending:
            add = min(nbytes, self._owed(req, req.pending[0]) - req.progress)
            req.progress += add
            path.progress += add

    def on_chunk(self, request_id: int, chunk: bytes, ok: bool, now: float) -> None:
        """A chunk of a request arrived whole; ok=False: it failed verification."""
        pool = self._pool
        i = pool.index.get(chunk)
        if i is None:
            return
        req = self._requests.get(request_id)
        if req is None or req.span is not None or i not in req.pending:
            if ok and not pool.done[i]:
                self._complete(i, None)
            return
        path = req.path
        peer = self._peers[path.peer]
        self._data(path, now)
        if req.pending[0] == i and req.progress < pool.sizes[i]:
            # Bytes the adapter did not report one by one still measure the path.
            path.meter.add(pool.sizes[i] - req.progress, now)
        if ok:
            if pool.done[i]:
                self._duplicate_bytes += pool.sizes[i]
            else:
                path.failures = 0
                self._complete(i, req)
        else:
            self._corrupt_bytes += pool.sizes[i]
            peer.bad.add(i)  # before _drop re-queues it, so this peer is not asked again
            peer.strikes += 1
        self._drop(req, i)
        if not req.pending:
            self._close(req)
        else:
            self._cancel_if_moot(req)
        if not ok and peer.strikes >= self.config.bad_chunk_limit and peer.banned_until is None:
            self._cut_off(peer, now)

    def on_span(self, request_id: int, chunk: bytes, now: float) -> None:
        """A piece request delivered all its bytes (not verified: see on_assembled)."""
        req = self._requests.get(request_id)
        i = self._pool.index.get(chunk)
        if req is None or req.span is None or i is None or i not in req.pending:
            return
        path = req.path
        self._data(path, now)
        size = req.span_bytes
        if req.progress < size:
            path.meter.add(size - req.progress, now)
        path.failures = 0
        # Unverified until assembled: a spoiled piece must not count as useful bytes.
        self._piece_credit.setdefault(i, []).append((path, size))
        self._drop(req, i, received=True)
        self._close(req)

    def on_partial(self, chunk: bytes, nbytes: int, now: float) -> int:
        """A stream broke `nbytes` into chunk; returns how many leading bytes are kept (whole
        pieces: the rest of the chunk is then fetched as pieces, from any path)."""
        cfg = self.config
        pool = self._pool
        i = pool.index.get(chunk)
        if i is not None and i in self._held:
            self._held.remove(i)
            pool.release(i)
        if i is None or pool.done[i] or i in pool.pieces or i in self._whole_only:
            return 0
        if not cfg.piece_bytes or pool.copies[i]:
            return 0  # already asked of another path (a stall is noticed after a re-queue)
        whole = nbytes // cfg.piece_bytes
        if whole == 0 or whole * cfg.piece_bytes >= pool.sizes[i]:
            return 0
        pool.split(i, cfg.piece_bytes)
        pool.receive_pieces(i, whole)
        pool.dirty = True
        return whole * cfg.piece_bytes

    def on_assembled(self, chunk: bytes, ok: bool, now: float) -> None:
        """A split chunk's pieces were put together and checked against its digest."""
        pool = self._pool
        i = pool.index.get(chunk)
        if i is None or pool.done[i]:
            return
        if ok:
            for path, size in self._piece_credit.pop(i, ()):
                path.delivered += size
                self._peers[path.peer].bytes += size
            self._complete(i, None)
        else:
            self._piece_credit.pop(i, None)
            self._corrupt_bytes += pool.sizes[i]
            self._whole_only.add(i)
            pool.unsplit(i)

    def on_request_end(self, request_id: int, now: float, error: str | None = None) -> None:
        """A response is over: cleanly (undelivered chunks re-queued) or failed (path backs off)."""
        req = self._requests.get(request_id)
        if req is None:
            return
        path = req.path
        if error is None:
            done = self._pool.done
            self._peers[path.peer].missing.update(j for j in req.pending if not done[j])
            self._close(req)
        else:
            self._close(req)
            self._transition(path, PathEvent.ERROR, now)

    # -- outputs -------------------------------------------------------------------------

    def actions(self, now: float) -> list[Action]:
        """What to do now: call after every batch of events and at next_deadline()."""
        held, self._held = self._held, []
        for i in held:  # not salvaged since the last call: fetched again like any chunk
            self._pool.release(i)
        self._tick(now)
        if self._pool.dirty:
            self._rebuild()
        if not self.done:
            # Only paths below their refill mark (half the budget, see _fill) need planning.
            half = self.config.queue_seconds / 2
            backoff, peers = PathState.BACKOFF, self._peers
            paths = [
                p
                for p in self._paths.values()
                if (not p.requests or p.remaining < p.meter.rate * half)
                and p.state is not backoff
                and peers[p.peer].banned_until is None
            ]
            if len(paths) > 1:
                # Fastest first: they get the rarest chunks, which then spread soonest.
                paths.sort(key=lambda p: (-p.meter.rate, p.name))
            self._horizon = None
            for path in paths:
                self._fill(path, now)
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        """When actions() must be called again even if no event arrives (stall, retry, ban)."""
        if self.done:
            return None
        soonest = self._soonest_timer()
        return None if soonest == math.inf else soonest

    def _soonest_timer(self) -> float:
        # Stall deadlines only move later as bytes arrive; new timers lower _timers_from
        # where they are set (_new_request, _enter_backoff, _cut_off).
        stall = self.config.stall_timeout_s
        soonest = math.inf
        for peer in self._peers.values():
            if peer.banned_until is not None and peer.banned_until < soonest:
                soonest = peer.banned_until
        for path in self._paths.values():
            if path.state is PathState.BACKOFF:
                at = path.retry_at
            elif path.requests:
                at = path.last_activity + stall
            else:
                continue
            if at < soonest:
                soonest = at
        return soonest

    @property
    def done(self) -> bool:
        """Every chunk is held."""
        return self._pool.chunks_done == len(self._pool)

    def progress(self, now: float) -> Progress:
        """A snapshot for progress bars, ETA and reports."""
        pool = self._pool
        if pool.dirty:
            self._rebuild()
        paths = {
            name: PathStatus(
                peer=p.peer,
                state=p.state,
                rate=p.meter.rate,
                queued_bytes=p.remaining,
                requests=len(p.requests),
                delivered_bytes=p.delivered,
                retry_at=p.retry_at if p.state is PathState.BACKOFF else None,
            )
            for name, p in self._paths.items()
        }
        usable = [p for p in self._paths.values() if self._usable_path(p)]
        rate = sum(p.meter.rate for p in usable if p.requests) or sum(p.meter.rate for p in usable)
        left = pool.bytes_total - pool.bytes_done
        eta = 0.0 if not left else (left / rate if rate > 0 else None)
        return Progress(
            bytes_total=pool.bytes_total,
            bytes_done=pool.bytes_done,
            chunks_total=len(pool),
            chunks_done=pool.chunks_done,
            paths=paths,
            peer_bytes={name: p.bytes for name, p in self._peers.items()},
            eta_s=eta,
            endgame=not self.done and not pool.fresh_held and bool(self._requests),
            cut_off={
                name: p.banned_until
                for name, p in self._peers.items()
                if p.banned_until is not None and p.banned_until > now
            },
            duplicate_bytes=self._duplicate_bytes,
            corrupt_bytes=self._corrupt_bytes,
        )

    # -- planning ------------------------------------------------------------------------

    def _fill(self, path: PathRecord, now: float) -> None:
        """Top the path's queue up to its budget: fresh chunks first, else endgame duplicates."""
        probing = path.state is PathState.PROBING
        if probing and path.requests:
            return
        cfg = self.config
        pool = self._pool
        peer = self._peers[path.peer]
        budget = 1.0 if probing else max(path.meter.rate * cfg.queue_seconds, 1.0)
        # Refill at half the budget, to the full budget: requests of >= budget/2, so ~2 are in
        # flight and the next one is on its way queue_seconds/2 before the line would idle.
        while path.remaining < budget / 2:
            want = budget - path.remaining
            req = None
            size = 0
            deferred = False
            while size < want and (req is None or len(req.pending) < cfg.max_batch_chunks):
                i = pool.pick(peer)
                if i is None:
                    break
                share = self._tail_share(path, i, now)
                if share is None:  # the whole chunk
                    if self._better_elsewhere(path, i, now):
                        pool.put_back(peer, i)
                        deferred = True
                        break
                    if req is None:
                        req = self._new_request(path, now)
                    self._attach(req, i)
                    size += pool.sizes[i]
                    continue
                pool.put_back(peer, i)  # popped from this heap only: others still offer it
                if not share:
                    deferred = True  # no piece fits here now; another path takes them
                    break
                if req is not None:
                    break  # a piece request carries one chunk: the batch goes first
                req = self._new_request(path, now)
                self._attach_span(req, i, *share)
                break
            if req is None:
                if pool.fresh_held or deferred:
                    return  # fresh chunks remain, held by others: not the endgame yet
                i = self._pick_duplicate(path, peer, now)
                if i is None:
                    return
                req = self._new_request(path, now)
                self._attach(req, i)
            chunks = tuple(pool.digests[j] for j in req.pending)
            span = pool.span(req.pending[0], *req.span) if req.span else None
            self._out.append(Request(req.id, path.name, chunks, span))
            if probing:
                return

    def _tail_share(self, path: PathRecord, i: int, now: float) -> tuple[int, int] | None:
        """Whether the path takes chunk i whole (None), pieces [a, b) of it, or nothing (())."""
        cfg = self.config
        pool = self._pool
        split = i in pool.pieces
        if not split and (
            not cfg.piece_bytes or pool.sizes[i] <= cfg.piece_bytes or i in self._whole_only
        ):
            return None
        a, b = pool.fresh_run(i) if split else (0, 0)
        size = pool.sizes[i] if not split else pool.span(i, a, b)[1] - pool.span(i, a, b)[0]
        fit = self._share_bytes(path, now)
        if fit >= size:
            return (a, b) if split else None
        n = int(fit // cfg.piece_bytes)
        if n <= 0:
            if not self._first_to_finish(path, i, now):
                return ()
            n = 1
        if not split:
            pool.split(i, cfg.piece_bytes)
            a, b = pool.fresh_run(i)
        return a, min(b, a + n)

    def _share_bytes(self, path: PathRecord, now: float) -> float:
        """What the path can still deliver by the estimated end, beyond its queue."""
        rate = max(path.meter.rate, 1.0)
        return (self._end_estimate(now) - now) * rate - path.remaining

    def _first_to_finish(self, path: PathRecord, i: int, now: float) -> bool:
        """Whether, among usable paths that may serve chunk i, this one would deliver one more
        piece first (after its queue): the pieces left over by the shares go there."""
        piece = self.config.piece_bytes

        def done_at(p: PathRecord) -> tuple[float, str]:
            return (p.remaining + piece) / max(p.meter.rate, 1.0), p.name

        mine = done_at(path)
        for other in self._paths.values():
            if other is path or not self._usable_path(other):
                continue
            if self._peers[other.peer].may_serve(i) and done_at(other) < mine:
                return False
        return True

    def _better_elsewhere(self, path: PathRecord, i: int, now: float) -> bool:
        """Near the end, leave chunk i to a faster path that would deliver it clearly sooner.

        Without this a slow path takes one of the last chunks and the whole download waits
        for it (5 s for 512 KiB at 100 KB/s), or the endgame has to fetch it twice.
        """
        size = self._pool.sizes[i]
        rate = max(path.meter.rate, 1.0)
        here = now + (path.remaining + size) / rate
        if here <= self._end_estimate(now):
            return False
        gain = self.config.endgame_min_gain_s
        for other in self._paths.values():
            if other.meter.rate <= rate or not self._usable_path(other):
                continue
            if not self._peers[other.peer].may_serve(i):
                continue
            if now + (other.remaining + size) / other.meter.rate + gain < here:
                return True
        return False

    def _end_estimate(self, now: float) -> float:
        """When the download would end if every usable path kept its pace (once per actions())."""
        if self._horizon is None:
            usable = [p for p in self._paths.values() if self._usable_path(p)]
            rate = sum(p.meter.rate for p in usable)
            pool = self._pool
            left = pool.bytes_total - pool.bytes_done - pool.pieces_received
            left -= sum(p.progress for p in usable)
            self._horizon = now + left / rate if rate > 0 else math.inf
        return self._horizon

    def _pick_duplicate(self, path: PathRecord, peer: Peer, now: float) -> int | None:
        """Endgame: the outstanding chunk expected last that this path would bring sooner."""
        cfg = self.config
        pool = self._pool
        rate, queued = self._line_load(path)
        here = now + queued / rate + cfg.endgame_min_gain_s
        best, best_eta = None, 0.0
        for other in self._paths.values():
            if other is path or not other.requests:
                continue
            # Progress is known as of its last report; a path silent for longer than its
            # rate explains is taken to need at least as long again.
            start = other.last_activity
            late = now + (now - other.last_activity)
            other_rate = max(other.meter.rate, 1.0)
            # Its line drains every queue on it by then at the latest: a path's own rate
            # swings as flows on one line trade shares, and alone it made chunks look late
            # that were not (their copies lost the race: bytes wasted).
            line_rate, line_queued = self._line_load(other)
            drained = now + line_queued / line_rate
            ahead = 0
            for req in other.requests.values():
                ahead -= req.progress
                for j in req.pending:
                    ahead += self._owed(req, j)
                    if pool.done[j] or pool.copies[j] >= cfg.endgame_max_copies:
                        continue
                    if req.span is not None or j in pool.pieces:
                        continue  # pieces are not duplicated
                    eta = max(min(start + ahead / other_rate, drained), late)
                    if eta <= best_eta or here + pool.sizes[j] / rate >= eta:
                        continue
                    if not peer.may_serve(j) or any(
                        r.path is path or (path.line is not None and r.path.line == path.line)
                        for r in self._carriers[j]
                    ):
                        # A copy on the line already carrying the chunk only halves both
                        # streams there: no sooner, and the loser's bytes are wasted.
                        continue
                    best, best_eta = j, eta
        return best

    def _line_load(self, path: PathRecord) -> tuple[float, float]:
        """(rate, bytes queued) of the path's line: all our usable paths over that uplink
        share it, so a copy sent there arrives after all of their queues, not just this
        path's (the path alone when its line is unknown)."""
        if path.line is None:
            return max(path.meter.rate, 1.0), float(path.remaining)
        same = [p for p in self._paths.values() if p.line == path.line and self._usable_path(p)]
        same = same or [path]
        return max(sum(p.meter.rate for p in same), 1.0), float(sum(p.remaining for p in same))

    # -- requests ------------------------------------------------------------------------

    def _new_request(self, path: PathRecord, now: float) -> _Request:
        req = _Request(self._next_id, path)
        self._next_id += 1
        if not path.requests:
            path.last_activity = now  # the stall clock starts when work does
            path.meter.start(now)
            self._timers_from = min(self._timers_from, now + self.config.stall_timeout_s)
        path.requests[req.id] = req
        self._requests[req.id] = req
        return req

    def _attach(self, req: _Request, i: int) -> None:
        self._pool.take(i)
        self._carriers.setdefault(i, []).append(req)
        req.pending.append(i)
        req.path.queued += self._pool.sizes[i]

    def _attach_span(self, req: _Request, i: int, a: int, b: int) -> None:
        pool = self._pool
        pool.take_span(i, a, b)
        self._carriers.setdefault(i, []).append(req)
        req.pending.append(i)
        req.span = (a, b)
        start, end = pool.span(i, a, b)
        req.span_bytes = end - start
        req.path.queued += req.span_bytes

    def _owed(self, req: _Request, i: int) -> int:
        """Bytes request `req` delivers for chunk i."""
        return req.span_bytes if req.span is not None else self._pool.sizes[i]

    def _drop(self, req: _Request, i: int, *, received: bool = False) -> None:
        """Chunk i is no longer owed by req (it arrived, or arrived corrupt)."""
        if req.pending[0] == i:
            req.pending.popleft()
            req.path.progress -= req.progress
            req.progress = 0
        else:
            req.pending.remove(i)
        self._unlink(req, i, received=received)

    def _unlink(self, req: _Request, i: int, *, received: bool = False) -> None:
        req.path.queued -= self._owed(req, i)
        carriers = self._carriers[i]
        carriers.remove(req)
        if not carriers:
            del self._carriers[i]
        if req.span is None:
            self._pool.release(i)
        else:
            self._pool.release_span(i, *req.span, received)

    def _close(self, req: _Request) -> None:
        """Forget a request; its undelivered chunks go back to the pool."""
        del self._requests[req.id]
        path = req.path
        del path.requests[req.id]
        path.progress -= req.progress
        req.progress = 0
        pending, req.pending = req.pending, deque()
        for i in pending:
            self._unlink(req, i)
        if not path.requests:
            path.meter.pause()

    def _cancel(self, req: _Request) -> None:
        self._out.append(Cancel(req.id, req.path.name))
        self._close(req)

    def _cancel_if_moot(self, req: _Request) -> None:
        """Cancel a request whose remaining chunks all arrived elsewhere."""
        done = self._pool.done
        if req.id in self._requests and req.pending and all(done[j] for j in req.pending):
            self._cancel(req)

    def _complete(self, i: int, req: _Request | None) -> None:
        self._pool.mark_done(i)
        self._piece_credit.pop(i, None)  # credited already, or the chunk came whole instead
        if req is not None:
            size = self._pool.sizes[i]
            req.path.delivered += size
            self._peers[req.path.peer].bytes += size
        for other in list(self._carriers.get(i, ())):
            if other is not req:
                self._cancel_if_moot(other)

    def _rebuild(self) -> None:
        usable = [p for p in self._peers.values() if self._usable_peer(p)]
        self._pool.rebuild(usable, self._peers.values())

    # -- health --------------------------------------------------------------------------

    def _peer(self, name: str) -> Peer:
        peer = self._peers.get(name)
        if peer is None:
            peer = self._peers[name] = Peer(name)
        return peer

    def _usable_peer(self, peer: Peer) -> bool:
        return peer.banned_until is None and any(
            p.state is not PathState.BACKOFF for p in peer.paths.values()
        )

    def _usable_path(self, path: PathRecord) -> bool:
        return path.state is not PathState.BACKOFF and self._peers[path.peer].banned_until is None

    def _data(self, path: PathRecord, now: float) -> None:
        path.last_activity = now
        if path.state is not PathState.ACTIVE:
            self._transition(path, PathEvent.DATA, now)

    def _transition(self, path: PathRecord, event: PathEvent, now: float) -> None:
        new = TRANSITIONS.get((path.state, event))
        if new is None or new is path.state:
            return
        old, path.state = path.state, new
        if new is PathState.BACKOFF:
            self._enter_backoff(path, now)
        if PathState.BACKOFF in (old, new):
            self._pool.dirty = True  # the peer may have become (un)usable

    def _enter_backoff(self, path: PathRecord, now: float) -> None:
        for req in list(path.requests.values()):
            head = self._salvageable(req)
            self._cancel(req)
            if head is not None:
                # Its received start can be kept (on_partial) only while no other request
                # carries the chunk: the Cancel is carried out after this actions() call, so the
                # chunk is held back until then instead of going to another path at once.
                self._pool.take(head)
                self._held.append(head)
        path.failures += 1
        cfg = self.config
        delay = min(cfg.path_retry_s * 2 ** min(path.failures - 1, 30), cfg.path_retry_max_s)
        # Jitter: gateways that lost the same peer together should not retry in lockstep.
        path.retry_at = now + delay * self._rng.uniform(0.9, 1.1)
        self._timers_from = min(self._timers_from, path.retry_at)
        path.meter.reset()

    def _salvageable(self, req: _Request) -> int | None:
        """The chunk a whole-chunk request is part-way through, if at least one piece of it
        arrived and on_partial could keep it."""
        piece = self.config.piece_bytes
        if not piece or req.span is not None or not req.pending or req.progress < piece:
            return None
        i = req.pending[0]
        pool = self._pool
        if pool.done[i] or i in pool.pieces or i in self._whole_only or pool.copies[i] != 1:
            return None
        return i

    def _cut_off(self, peer: Peer, now: float) -> None:
        peer.banned_until = now + self.config.ban_s
        self._timers_from = min(self._timers_from, peer.banned_until)
        self._out.append(PeerCutOff(peer.name, peer.banned_until, peer.strikes))
        peer.strikes = 0
        for path in peer.paths.values():
            for req in list(path.requests.values()):
                self._cancel(req)
        self._pool.dirty = True

    def _tick(self, now: float) -> None:
        """Timers: cut-offs that expired, backoffs that expired, paths that went silent."""
        if now < self._timers_from:
            return  # the common case: called after every event, with nothing due
        for peer in self._peers.values():
            if peer.banned_until is not None and peer.banned_until <= now:
                peer.banned_until = None
                self._pool.dirty = True
        stall = self.config.stall_timeout_s
        for path in list(self._paths.values()):
            if path.state is PathState.BACKOFF:
                if path.retry_at <= now:
                    self._transition(path, PathEvent.RETRY, now)
            elif path.requests and now >= path.last_activity + stall:  # as next_deadline()
                self._transition(path, PathEvent.STALL, now)
        self._timers_from = self._soonest_timer()
