"""Traffic sources at run time: open-loop real-time flows (cbr, onoff, vbr), as over UDP.

A source emits packets into its path until its stop time; what happens to them is recorded
in its FlowRecord. Elastic (TCP-carried) flows are in traffic_tcp.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from appliance.qos.models import CbrFlow, FlowModel, OnOffFlow, VbrFlow
from appliance.qos.network import Engine, LinkQueue, Packet
from appliance.qos.simstats import FlowRecord

Transmit = Callable[[Packet], None]


def draw(rng: random.Random, distribution: str, mean: float, shape: float) -> float:
    """A sample of `distribution` with the given mean (Pareto: with the given shape)."""
    if distribution == "exponential":
        return rng.expovariate(1 / mean)
    if distribution == "pareto":
        # paretovariate() has minimum 1 and mean shape/(shape-1): scale it to `mean`.
        return mean * (shape - 1) / shape * rng.paretovariate(shape)
    return mean


class FlowRuntime:
    """A flow during the run: emits packets into its path, hears their fate."""

    def __init__(
        self,
        model: FlowModel,
        engine: Engine,
        links: list[LinkQueue],
        rng: random.Random,
        record: FlowRecord,
        stop: float,
        transmit: Transmit,
    ) -> None:
        self.model = model
        self.engine = engine
        self.links = links
        self.rng = rng
        self.record = record
        self.stop = stop
        self._transmit = transmit
        self._tx = 0

    def start(self) -> None:
        """Schedule the flow's first event."""
        raise NotImplementedError

    def emit(self, size: int) -> int:
        """Send one packet of `size` bytes now; returns its transmission number."""
        self._tx += 1
        self.record.sent += 1
        self._transmit(Packet(self, size, self.engine.now, self._tx))
        return self._tx

    def on_arrival(self, packet: Packet, arrival: float) -> None:
        """The packet will reach the receiver at `arrival` (known when it enters its last link)."""
        self.record.on_arrival(packet.sent_at, packet.size, arrival)

    def on_drop(self, packet: Packet, now: float) -> None:
        """The packet was dropped (full queue or line loss) at `now`."""
        self.record.on_drop(packet.sent_at)


class CbrSource(FlowRuntime):
    """packet_bytes every interval_ms, or Poisson arrivals of the same mean rate."""

    model: CbrFlow

    def start(self) -> None:
        self._count = 0
        self.engine.at(self.model.start_s, self._tick)

    def _tick(self, _: Any) -> None:
        m = self.model
        if self.engine.now >= self.stop:
            return
        self.emit(m.packet_bytes)
        interval = m.interval_ms / 1000
        if m.arrivals == "poisson":
            nxt = self.engine.now + self.rng.expovariate(1 / interval)
        else:
            self._count += 1  # from the start time, so float errors do not accumulate
            nxt = m.start_s + self._count * interval
        self.engine.at(nxt, self._tick)


class OnOffSource(FlowRuntime):
    """Talk spurts: during an on period packets every interval_ms (at least one), then off."""

    model: OnOffFlow

    def start(self) -> None:
        self._on_end = 0.0
        self.engine.at(self.model.start_s, self._burst)

    def _period(self, mean_ms: float) -> float:
        m = self.model
        return draw(self.rng, m.distribution, mean_ms / 1000, m.shape)

    def _burst(self, _: Any) -> None:
        self._on_end = self.engine.now + self._period(self.model.on_ms)
        self._send_one()

    def _tick(self, _: Any) -> None:
        now = self.engine.now
        if now < self._on_end:
            self._send_one()
        else:
            self.engine.at(self._on_end + self._period(self.model.off_ms), self._burst)

    def _send_one(self) -> None:
        if self.engine.now >= self.stop:
            return
        self.emit(self.model.packet_bytes)
        self.engine.at(self.engine.now + self.model.interval_ms / 1000, self._tick)


class VbrSource(FlowRuntime):
    """Video-like: a frame of lognormal size every 1/frame_rate s, sent as back-to-back packets."""

    model: VbrFlow

    def start(self) -> None:
        m = self.model
        self._count = 0
        # Lognormal with the requested mean and coefficient of variation.
        self._sigma = math.sqrt(math.log1p(m.frame_cv**2))
        self._mu = math.log(m.frame_bytes) - self._sigma**2 / 2
        self.engine.at(m.start_s, self._frame)

    def _frame(self, _: Any) -> None:
        m = self.model
        if self.engine.now >= self.stop:
            return
        size = m.frame_bytes
        if m.frame_cv > 0:
            size = max(1, round(self.rng.lognormvariate(self._mu, self._sigma)))
        full, rest = divmod(size, m.packet_bytes)
        for _i in range(full):
            self.emit(m.packet_bytes)
        if rest:
            self.emit(rest)
        self._count += 1
        self.engine.at(m.start_s + self._count / m.frame_rate, self._frame)
