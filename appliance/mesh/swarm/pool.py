"""Chunk bookkeeping for one download: what is done, what is requested, who may serve what."""

from __future__ import annotations

import heapq
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


class ChunkPool:
    """Chunks by index: done or not, how many live requests carry each, and per usable peer a
    heap of the *fresh* chunks (neither done nor requested) it may serve, rarest first.

    Heap keys are (holders among usable peers, tiebreak): rarest first, ties in a random order
    drawn once per download. Entries go stale when the chunk is taken through another peer and
    are dropped when popped. Any change in who is usable or holds what marks the pool dirty, and
    rebuild() recounts from scratch in O(chunks x usable peers): changes are rare (a partial
    holder's update every few seconds), and exact counts keep the incremental paths simple.
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

    def __len__(self) -> int:
        return len(self.sizes)

    def fresh(self, i: int) -> bool:
        return not self.done[i] and not self.copies[i]

    def mark_done(self, i: int) -> None:
        if self.fresh(i) and self.avail[i] and not self.dirty:
            self.fresh_held -= 1  # arrived on a request we had given up on
        self.done[i] = True
        self.chunks_done += 1
        self.bytes_done += self.sizes[i]

    def take(self, i: int) -> None:
        """One more request carries chunk i."""
        if self.fresh(i) and self.avail[i] and not self.dirty:
            self.fresh_held -= 1
        self.copies[i] += 1

    def release(self, i: int) -> None:
        """One request less carries chunk i; if it is fresh again, offer it to its holders."""
        self.copies[i] -= 1
        if not self.fresh(i) or self.dirty:
            return  # rebuild() recounts everything anyway
        holders = self.avail[i]
        if holders:
            self.fresh_held += 1
        entry = (holders, self.tiebreak[i], i)
        for peer in self.usable:
            if peer.may_serve(i):
                heapq.heappush(peer.heap, entry)

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
