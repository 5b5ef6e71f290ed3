"""The simulator's network: an event clock, drop-tail links, and packets crossing them.

Why our own engine and not SimPy: a drop-tail FIFO link of fixed rate needs no departure
events. When a packet arrives, the link knows when every packet ahead of it will have left
(their transmission ends are a deque of times), so it can decide drop or accept and compute
this packet's own transmission end at once. A packet therefore costs one event per link it
crosses, and none at all on the last link of its path (the arrival time is known). SimPy
models a link as a process with a Store: Event objects and generator resumes per packet and
hop; a bare SimPy model of one M/D/1 link (no statistics) runs ~1.7x slower than this engine
with its statistics (bench/qos_sim.py), and SimPy would be one more firmware dependency.
The clock is a heap of (time, sequence, callback, argument): same-time events run in the
order they were scheduled, so a run is deterministic.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from appliance.qos.models import LinkModel

# ns-2's default DropTail limit, used when a link sets neither queue_packets nor queue_bytes.
DEFAULT_QUEUE_PACKETS = 50

# LinkQueue.transmit() results that are not a transmission end.
TAIL_DROP = -1.0
LINE_LOSS = -2.0


class Engine:
    """Discrete-event clock: callbacks at simulated times (seconds)."""

    __slots__ = ("_heap", "_seq", "events", "now")

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0

    def at(self, time: float, callback: Callable[[Any], None], arg: Any = None) -> None:
        """Call callback(arg) at `time` (not before now)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(time, self.now), self._seq, callback, arg))

    def run(self) -> None:
        """Run until no event is left."""
        heap, pop = self._heap, heapq.heappop
        count = 0
        while heap:
            self.now, _, callback, arg = pop(heap)
            callback(arg)
            count += 1
        self.events += count


class LinkQueue:
    """A link at run time: FIFO drop-tail queue, line rate, random loss, busy-time account.

    Arrivals must be offered in time order (the engine guarantees it). The packet in service
    is the head of `_ends` and does not count toward the queue limit (see LinkModel).
    """

    __slots__ = (
        "_bytes",
        "_ends",
        "_last_end",
        "_rng",
        "arrivals",
        "bits_per_s",
        "busy_s",
        "delay",
        "horizon",
        "limit_bytes",
        "limit_packets",
        "line_losses",
        "loss",
        "model",
        "tail_drops",
    )

    def __init__(self, model: LinkModel, rng: random.Random, horizon: float) -> None:
        self.model = model
        self.bits_per_s = model.capacity_kbps * 1000
        self.delay = model.delay_ms / 1000
        self.loss = model.loss
        if model.queue_bytes is not None:
            self.limit_packets, self.limit_bytes = None, int(model.queue_bytes)
        else:
            limit = model.queue_packets
            self.limit_packets = DEFAULT_QUEUE_PACKETS if limit is None else limit
            self.limit_bytes = None
        self.horizon = horizon  # busy time is counted up to here (utilisation of the run)
        self._rng = rng
        self._ends: deque[tuple[float, int]] = deque()  # (transmission end, bytes) in system
        self._bytes = 0  # bytes in the system, the one in service included
        self._last_end = 0.0
        self.busy_s = 0.0
        self.arrivals = 0
        self.tail_drops = 0
        self.line_losses = 0

    def transmit(self, now: float, size: int) -> float:
        """A packet of `size` bytes arrives: its transmission end, TAIL_DROP or LINE_LOSS."""
        self.arrivals += 1
        ends = self._ends
        while ends and ends[0][0] <= now:  # these have left the link by now
            self._bytes -= ends.popleft()[1]
        if ends:  # the head is in service; the others wait
            if self.limit_packets is not None:
                if len(ends) - 1 >= self.limit_packets:
                    self.tail_drops += 1
                    return TAIL_DROP
            elif self._bytes - ends[0][1] + size > self.limit_bytes:  # type: ignore[operator]
                self.tail_drops += 1
                return TAIL_DROP
        start = self._last_end if self._last_end > now else now
        end = start + 8 * size / self.bits_per_s
        self._last_end = end
        ends.append((end, size))
        self._bytes += size
        horizon = self.horizon
        if start < horizon:
            self.busy_s += (end if end < horizon else horizon) - start
        if self.loss and self._rng.random() < self.loss:
            self.line_losses += 1
            return LINE_LOSS
        return end

    def summary(self, duration: float) -> dict[str, Any]:
        """The link's statistics (JSON keys of `qos simulate`)."""
        capacity = self.model.capacity_kbps
        utilisation = self.busy_s / duration
        return {
            "capacity_kbps": capacity,
            "utilisation": utilisation,
            "remaining_kbps": capacity * (1 - utilisation),
            "carried_kbps": capacity * utilisation,
            "packets": self.arrivals,
            "tail_drops": self.tail_drops,
            "line_losses": self.line_losses,
        }


class Packet:
    """One packet on its way: which flow, how big, when it left the sender, where it is."""

    __slots__ = ("flow", "hop", "sent_at", "size", "tx")

    def __init__(self, flow: Any, size: int, sent_at: float, tx: int) -> None:
        self.flow = flow
        self.size = size
        self.sent_at = sent_at
        self.hop = 0
        self.tx = tx  # per-flow transmission number (elastic flows match ACKs by it)
