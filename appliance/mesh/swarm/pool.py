"""Chunk bookkeeping for one download: what is done, what is requested, who may serve what."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.mesh.swarm.paths import PathRecord


class Peer:
    """A peer as the scheduler sees it: holdings, exclusions, health, its rarity heap."""

    __slots__ = (
        "bad",
        "banned_until",
        "bytes",
        "chunks",
        "heap",
        "missing",
        "name",
        "paths",
        "strikes",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.chunks: set[int] | None = set()  # None: holds every chunk
        self.bad: set[int] = set()  # sent corrupt: never again from this peer
        self.missing: set[int] = set()  # a clean response omitted them: until set_peer_chunks
        self.paths: dict[str, PathRecord] = {}
        self.banned_until: float | None = None  # cut off (corrupt chunks) until then
        self.strikes = 0  # corrupt chunks since the last cut-off
        self.bytes = 0  # useful bytes it delivered
        self.heap: list[tuple[int, int, int]] = []  # (holders, tiebreak, chunk), see ChunkPool

    def may_serve(self, i: int) -> bool:
        held = self.chunks is None or i in self.chunks
        return held and i not in self.bad and i not in self.missing


RECEIVED = -1  # a piece state; otherwise the number of live requests carrying the piece


class ChunkPool:
    """Chunks by index: done or not, how many live requests carry each, and per usable peer a
    heap of the *fresh* chunks (neither done nor requested) it may serve, rarest first.

    Heap keys are (holders among usable peers, tiebreak): rarest first, ties in a random order
    drawn once per download. Entries go stale when the chunk is taken through another peer and
    are dropped when popped. Any change in who is usable or holds what marks the pool dirty, and
    rebuild() recounts from scratch in O(chunks x usable peers): changes are rare (a partial
    holder's update every few seconds), and exact counts keep the incremental paths simple.

    A chunk split at the end of a download (see core.py, "Tail") has per-piece states in
    `pieces`; it is fresh while one of its pieces is, and `copies` counts its live piece
    requests. Pieces received wait there, unverified, until the chunk is assembled.
    """

    def __init__(self, chunk_sizes: Mapping[bytes, int], rng: random.Random) -> None:
        self.digests = list(chunk_sizes)
        self.index = {d: i for i, d in enumerate(self.digests)}
        self.sizes = [chunk_sizes[d] for d in self.digests]
        n = len(self.sizes)
        order = list(range(n))
        rng.shuffle(order)
        self.tiebreak = [0] * n
        for rank, i in enumerate(order):
            self.tiebreak[i] = rank
        self.done = [False] * n
        self.copies = [0] * n  # live requests with the chunk still to deliver
        self.avail = [0] * n  # usable peers holding it
        self.usable: list[Peer] = []
        self.fresh_held = 0  # fresh chunks that some usable peer holds
        self.dirty = True
        self.bytes_total = sum(self.sizes)
        self.bytes_done = 0
        self.chunks_done = 0
        self.pieces: dict[int, list[int]] = {}  # split chunk -> piece states
        self.piece_bytes = 0
        self.pieces_received = 0  # bytes of received pieces of chunks not yet done

    def __len__(self) -> int:
        return len(self.sizes)

    def fresh(self, i: int) -> bool:
        if self.done[i]:
            return False
        states = self.pieces.get(i)
        return not self.copies[i] if states is None else 0 in states

    def mark_done(self, i: int) -> None:
        if self.fresh(i) and self.avail[i] and not self.dirty:
            self.fresh_held -= 1  # arrived on a request we had given up on
        self.done[i] = True
        self.chunks_done += 1
        self.bytes_done += self.sizes[i]
        self._forget_pieces(i)

    # -- pieces of split chunks ----------------------------------------------------------

    def split(self, i: int, piece_bytes: int) -> None:
        """Cut fresh, unrequested chunk i into pieces that can be requested separately."""
        self.piece_bytes = piece_bytes
        self.pieces[i] = [0] * math.ceil(self.sizes[i] / piece_bytes)

    def receive_pieces(self, i: int, n: int) -> None:
        """The first n pieces of split chunk i arrived (kept from a broken stream)."""
        for p in range(n):
            self._receive(i, p)

    def unsplit(self, i: int) -> None:
        """The assembled chunk failed verification: fetch it whole again."""
        was = self.fresh(i)
        self._forget_pieces(i)
        self._fresh_changed(i, was)

    def span(self, i: int, a: int, b: int) -> tuple[int, int]:
        """Byte range of pieces [a, b) of chunk i."""
        return a * self.piece_bytes, min(b * self.piece_bytes, self.sizes[i])

    def fresh_run(self, i: int) -> tuple[int, int]:
        """The first run of fresh pieces of split chunk i, as [a, b)."""
        states = self.pieces[i]
        a = states.index(0)
        b = a + 1
        while b < len(states) and states[b] == 0:
            b += 1
        return a, b

    def take_span(self, i: int, a: int, b: int) -> None:
        """One more request carries pieces [a, b) of chunk i."""
        was = self.fresh(i)
        states = self.pieces[i]
        for p in range(a, b):
            states[p] += 1
        self.copies[i] += 1
        self._fresh_changed(i, was)

    def release_span(self, i: int, a: int, b: int, received: bool) -> None:
        """A request no longer carries pieces [a, b): they arrived, or go back to the pool."""
        self.copies[i] -= 1
        states = self.pieces.get(i)
        if states is None:
            return  # the chunk is done
        was = self.fresh(i)
        for p in range(a, b):
            if received:
                self._receive(i, p)
            elif states[p] > 0:
                states[p] -= 1
        self._fresh_changed(i, was)

    def _receive(self, i: int, p: int) -> None:
        states = self.pieces[i]
        if states[p] != RECEIVED:
            states[p] = RECEIVED
            start, end = self.span(i, p, p + 1)
            self.pieces_received += end - start

    def _forget_pieces(self, i: int) -> None:
        states = self.pieces.pop(i, None)
        if states is not None:
            for p, state in enumerate(states):
                if state == RECEIVED:
                    start, end = self.span(i, p, p + 1)
                    self.pieces_received -= end - start

    def _fresh_changed(self, i: int, was: bool) -> None:
        now = self.fresh(i)
        if now == was or self.dirty:
            return  # rebuild() recounts everything anyway
        holders = self.avail[i]
        if holders:
            self.fresh_held += 1 if now else -1
        if now:
            entry = (holders, self.tiebreak[i], i)
            for peer in self.usable:
                if peer.may_serve(i):
                    heapq.heappush(peer.heap, entry)

    def take(self, i: int) -> None:
        """One more request carries chunk i."""
        if self.fresh(i) and self.avail[i] and not self.dirty:
            self.fresh_held -= 1
        self.copies[i] += 1

    def release(self, i: int) -> None:
        """One request less carries chunk i; if it is fresh again, offer it to its holders."""
        was = self.fresh(i)
        self.copies[i] -= 1
        self._fresh_changed(i, was)

    def pick(self, peer: Peer) -> int | None:
        """Pop the rarest fresh chunk `peer` may serve (the caller takes it or puts it back)."""
        heap = peer.heap
        while heap:
            i = heapq.heappop(heap)[2]
            if self.fresh(i) and peer.may_serve(i):
                return i
        return None

    def put_back(self, peer: Peer, i: int) -> None:
        heapq.heappush(peer.heap, (self.avail[i], self.tiebreak[i], i))

    def rebuild(self, usable: list[Peer], everyone: Iterable[Peer]) -> None:
        """Recount holders over the `usable` peers and rebuild their heaps."""
        self.dirty = False
        n = len(self.sizes)
        avail = [sum(1 for p in usable if p.chunks is None)] * n
        for p in usable:
            if p.chunks is not None:
                for i in p.chunks:
                    avail[i] += 1
        fresh = [i for i in range(n) if self.fresh(i)]
        self.avail = avail
        self.fresh_held = sum(1 for i in fresh if avail[i])
        for p in everyone:
            p.heap = []
        tiebreak = self.tiebreak
        for p in usable:
            p.heap = [(avail[i], tiebreak[i], i) for i in fresh if p.may_serve(i)]
            heapq.heapify(p.heap)
        self.usable = usable
