"""Elastic flows (bulk, consult) at run time: a compact TCP model over the simulated path.

The model, chosen to be close to what ns-2's one-way TCP agents (Reno/NewReno, SACK) and a
Linux sender do, while staying small enough to check by hand:
- Data is a sequence of segments of packet_bytes - 40 payload bytes; the sender keeps at most
  min(cwnd, window_packets) packets in flight. Initial window 10 (RFC 6928); slow start
  (+1 per ACK) below ssthresh, congestion avoidance (+1/cwnd per ACK) above (RFC 5681).
- Every packet is acknowledged on its own (ACK per packet, no delayed ACKs). ACKs come back
  after the path's propagation delays only: links are one-directional and the reverse
  direction is taken as uncongested (40-byte ACKs; on ADSL the downlink is the wide way).
- Loss detection SACK-style (RFC 6675): the path is FIFO, so an ACK for a later transmission
  proves every earlier outstanding one was lost; a hole is declared lost after 3 later
  ACKs (the dupack threshold) and retransmitted. One window reduction per round trip
  (NewReno's recovery point): ssthresh = cwnd / 2, cwnd = ssthresh.
- Retransmission timeout per RFC 6298 (SRTT/RTTVAR, minimum 200 ms as Linux and ns-2, doubling
  backoff); on timeout cwnd = 1 and everything outstanding is sent again.
- A sender idle longer than the RTO restarts from the initial window (RFC 5681 4.1).
- bulk: `size_bytes` of payload (or endless until stop_s), optionally paced at peak_kbps.
- consult: a request of uniform size in [min, max]; when its last segment is acknowledged the
  transfer time is recorded and the next request follows a think time.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from appliance.qos.models import TCP_HEADER_BYTES, BulkFlow, ConsultFlow, ElasticFlow
from appliance.qos.network import Packet
from appliance.qos.traffic import FlowRuntime, draw

INITIAL_WINDOW = 10  # RFC 6928
DUPACK_THRESHOLD = 3  # RFC 5681
MIN_RTO_S = 0.2  # Linux's and ns-2's minimum; RFC 6298 says 1 s
INITIAL_RTO_S = 1.0  # RFC 6298
MAX_RTO_S = 60.0


class TcpSender(FlowRuntime):
    """The congestion-controlled sender; subclasses say how much data there is to send."""

    model: ElasticFlow

    def start(self) -> None:
        m = self.model
        self.payload = m.packet_bytes - TCP_HEADER_BYTES
        self.ack_delay = sum(link.delay for link in self.links)  # the reverse path
        self.cwnd = float(INITIAL_WINDOW)
        self.ssthresh = math.inf
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = INITIAL_RTO_S
        self.available = 0  # segments the application has handed to TCP so far
        self.next_new = 0  # next segment never sent
        self.acked = 0  # segments acknowledged
        self._out: deque[tuple[int, int, float]] = deque()  # (tx, segment, sent at), tx order
        self._holes: list[list[int]] = []  # [segment, tx, later ACKs]: presumably lost
        self._stale: dict[int, int] = {}  # tx -> segment given up by a timeout
        self._retx: deque[int] = deque()  # segments to send again
        # Segments a timeout sent again although the first copy may still arrive: the only
        # ones that can be acknowledged twice (a hole is proven lost before it is resent).
        self._timed_out: set[int] = set()
        self._acked_timed_out: set[int] = set()
        self.acked_in_time = 0  # segments acknowledged by the end of the run
        self._recover = 0  # no window reduction for losses of transmissions <= this
        self._last_tx = 0
        self._last_send = -math.inf
        self._rto_at = math.inf
        self._timer_armed = False
        self._pace_at = 0.0
        self._pump_scheduled = False
        self.engine.at(m.start_s, self._begin)

    # -- the application side ------------------------------------------------------------

    def _begin(self, _: Any) -> None:
        raise NotImplementedError

    def offer(self, nbytes: int) -> None:
        """The application hands `nbytes` more payload to TCP."""
        if self.next_new == self.available and self.engine.now - self._last_send > self.rto:
            self.cwnd = min(self.cwnd, INITIAL_WINDOW)  # restart after idle
        self.available += -(-nbytes // self.payload)
        self._pump(None)

    def on_all_acked(self) -> None:
        """Everything offered so far is acknowledged."""

    # -- the network side ----------------------------------------------------------------

    @property
    def pipe(self) -> int:
        return len(self._out) + len(self._holes)

    def _pump(self, _: Any) -> None:
        self._pump_scheduled = False
        engine = self.engine
        now = engine.now
        if now >= self.stop:
            return
        pace_s = 0.0
        if isinstance(self.model, BulkFlow) and self.model.peak_kbps:
            pace_s = 8 * self.model.packet_bytes / (self.model.peak_kbps * 1000)
        limit = min(self.cwnd, self.model.window_packets)
        while self.pipe < limit:
            if self._retx:
                segment = self._retx.popleft()
                if segment in self._acked_timed_out:
                    continue
            elif self.next_new < self.available:
                segment = self.next_new
                self.next_new += 1
            else:
                return
            if pace_s and self._pace_at > now:
                self._retx.appendleft(segment)  # sent first when the pacer allows
                if not self._pump_scheduled:
                    self._pump_scheduled = True
                    engine.at(self._pace_at, self._pump)
                return
            self._pace_at = max(self._pace_at, now) + pace_s
            self._send(segment)

    def _send(self, segment: int) -> None:
        tx = self.emit(self.model.packet_bytes)
        self._last_tx = tx
        now = self.engine.now
        self._last_send = now
        self._out.append((tx, segment, now))
        if not self._timer_armed:
            self._rto_at = now + self.rto
            self._timer_armed = True
            self.engine.at(self._rto_at, self._on_timer)

    def on_arrival(self, packet: Packet, arrival: float) -> None:
        super().on_arrival(packet, arrival)
        self.engine.at(arrival + self.ack_delay, self._on_ack, packet.tx)

    def _on_ack(self, tx: int) -> None:
        now = self.engine.now
        out = self._out
        segment = None
        if out and out[0][0] <= tx:
            while out[0][0] < tx:  # FIFO path: earlier transmissions are lost
                lost_tx, lost_segment, _ = out.popleft()
                self._holes.append([lost_segment, lost_tx, 0])
            _, segment, sent_at = out.popleft()
            self._rtt_sample(now - sent_at)
        elif tx in self._stale:  # arrived although a timeout gave up on it
            segment = self._stale.pop(tx)
        if segment is None:
            return
        if self._stale:
            for old in [t for t in self._stale if t < tx]:
                del self._stale[old]  # earlier than a delivered one: surely lost
        if segment in self._timed_out:
            if segment in self._acked_timed_out:
                return  # the second copy of a segment
            self._acked_timed_out.add(segment)
        self.acked += 1
        if now <= self.record.horizon:
            self.acked_in_time += 1
        if tx > self._recover:  # no growth while recovering from a loss
            self.cwnd += 1 if self.cwnd < self.ssthresh else 1 / self.cwnd
        if self._holes:
            self._count_dupacks()
        self._rto_at = now + self.rto  # RFC 6298 5.3: restart the timer on new data ACKed
        if self.acked == self.available:
            self.on_all_acked()
        self._pump(None)

    def _count_dupacks(self) -> None:
        keep = []
        for hole in self._holes:
            hole[2] += 1
            if hole[2] < DUPACK_THRESHOLD:
                keep.append(hole)
                continue
            segment, tx = hole[0], hole[1]
            if tx > self._recover:  # a new loss episode: one reduction per window
                self.ssthresh = max(self.cwnd / 2, 2.0)
                self.cwnd = self.ssthresh
                self._recover = self._last_tx
            self._retx.append(segment)
        self._holes = keep

    def _rtt_sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(max(MIN_RTO_S, self.srtt + 4 * self.rttvar), MAX_RTO_S)

    def _on_timer(self, _: Any) -> None:
        self._timer_armed = False
        if not self.pipe:
            return
        now = self.engine.now
        if now < self._rto_at:  # ACKs moved the deadline since this event was scheduled
            self._timer_armed = True
            self.engine.at(self._rto_at, self._on_timer)
            return
        if now >= self.stop:
            return
        self.ssthresh = max(self.pipe / 2, 2.0)
        self.cwnd = 1.0
        self.rto = min(2 * self.rto, MAX_RTO_S)
        self._recover = self._last_tx
        resend = sorted([h[0] for h in self._holes] + [seg for _, seg, _ in self._out])
        self._stale.update({tx: seg for tx, seg, _ in self._out})
        self._timed_out.update(resend)
        self._out.clear()
        self._holes.clear()
        self._retx.extendleft(reversed(resend))
        self._pump(None)


class BulkSender(TcpSender):
    """`size_bytes` of payload as fast as TCP (and peak_kbps) allow, or endless."""

    model: BulkFlow

    def start(self) -> None:
        self.completed_at: float | None = None
        super().start()

    def _begin(self, _: Any) -> None:
        size = self.model.size_bytes
        # Endless: offer a segment more than could ever be sent before stop.
        self.offer(size if size is not None else 2**62)

    def on_all_acked(self) -> None:
        self.completed_at = self.engine.now


class ConsultSender(TcpSender):
    """Requests of uniform size, each followed by a think time once it is acknowledged."""

    model: ConsultFlow

    def start(self) -> None:
        self.transfers: list[float] = []  # seconds from request to its last ACK
        self._asked_at = 0.0
        super().start()

    def _begin(self, _: Any) -> None:
        self._request(None)

    def _request(self, _: Any) -> None:
        m = self.model
        if self.engine.now >= self.stop:
            return
        self._asked_at = self.engine.now
        self.offer(self.rng.randint(m.request_bytes_min, m.request_bytes_max))

    def on_all_acked(self) -> None:
        m = self.model
        now = self.engine.now
        self.transfers.append(now - self._asked_at)
        think = draw(self.rng, m.think, m.think_ms / 1000, m.shape)
        self.engine.at(now + think, self._request)
