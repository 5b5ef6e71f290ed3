"""The probe responder's I/O-free core: a datagram, its source and the arrival time in, the
reply out. It echoes every probe with its arrival time and keeps, per (source, session,
flow), a bitmap of the sequence numbers that arrived, so the sender learns the forward loss
exactly (RFC 7680) even when echoes are lost on the way back.

Only admitted sources get an answer or a record (the caller decides admission from the
source address, see probe.py); everything else is counted and dropped. Records are keyed
by data peers control, so their number and size are bounded.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.qos import codec

log = logging.getLogger(__name__)

MAX_RECORDS = 64  # (source, session, flow) arrival records kept; the oldest goes first
MAX_SEQ = 1 << 20  # per flow: 2^20 bits = 128 KiB of bitmap at most (1 h at 3.6 ms/packet)
RECORD_IDLE_S = 600.0  # a record nobody sent to for this long is forgotten
MAX_WARNED = 1024  # unknown addresses warned about once each, then logged at debug

RecordKey = tuple[str, int, int]  # source address, session, flow


@dataclass
class ArrivalRecord:
    """Which probes of one flow arrived."""

    bitmap: bytearray = field(default_factory=bytearray)
    received: int = 0
    duplicates: int = 0
    last_seen: float = 0.0

    def mark(self, seq: int) -> None:
        byte, bit = seq >> 3, 1 << (seq & 7)
        if byte >= len(self.bitmap):
            self.bitmap.extend(bytes(byte + 1 - len(self.bitmap)))
        if self.bitmap[byte] & bit:
            self.duplicates += 1  # RFC 7680: a duplicate does not make a second arrival
        else:
            self.bitmap[byte] |= bit
            self.received += 1

    def summary(self, session: int, flow: int, first: int) -> codec.Summary:
        """The bitmap from `first` (a multiple of 8) for SUMMARY_SPAN seqs."""
        start = first >> 3
        chunk = bytes(self.bitmap[start : start + codec.SUMMARY_SPAN // 8])
        return codec.Summary(session, flow, first, self.received, self.duplicates, chunk)


class ResponderCore:
    """Answers probes from admitted sources; counts what it drops."""

    def __init__(self, admitted: Callable[[str], bool]) -> None:
        self._admitted = admitted
        self.records: OrderedDict[RecordKey, ArrivalRecord] = OrderedDict()
        self.counters: Counter[str] = Counter()
        self._warned: set[str] = set()

    def on_datagram(self, data: bytes, source: str, wall_ns: int, now: float) -> bytes | None:
        """The reply to `data` from `source` that arrived at `wall_ns` (ns since the epoch,
        the clock one-way delay is measured on), `now` on a monotonic clock; None: none."""
        if not self._admitted(source):
            self.counters["unknown_source"] += 1
            self.warn_once(source)
            return None
        try:
            msg = codec.decode(data)
        except codec.CodecError as exc:
            self.counters["malformed"] += 1
            log.debug("qos probe from %s dropped: %s", source, exc)
            return None
        if isinstance(msg, codec.Probe):
            return self._on_probe(msg, source, wall_ns, now)
        if isinstance(msg, codec.SummaryRequest):
            self.counters["summaries"] += 1
            record = self.records.get((source, msg.session, msg.flow)) or ArrivalRecord()
            return codec.encode(record.summary(msg.session, msg.flow, msg.first & ~7))
        self.counters["unexpected"] += 1  # echoes and summaries are for senders
        return None

    def _on_probe(self, probe: codec.Probe, source: str, wall_ns: int, now: float) -> bytes:
        self.counters["probes"] += 1
        if probe.seq < MAX_SEQ:
            self._record(source, probe, now).mark(probe.seq)
        else:
            self.counters["seq_out_of_range"] += 1
        echo = codec.Echo(probe.session, probe.flow, probe.seq, probe.sent_ns, wall_ns)
        return codec.encode(echo)

    def _record(self, source: str, probe: codec.Probe, now: float) -> ArrivalRecord:
        key = (source, probe.session, probe.flow)
        record = self.records.get(key)
        if record is None:
            self._expire(now)
            while len(self.records) >= MAX_RECORDS:
                self.records.popitem(last=False)
                self.counters["records_evicted"] += 1
            record = self.records[key] = ArrivalRecord()
        else:
            self.records.move_to_end(key)
        record.last_seen = now
        return record

    def _expire(self, now: float) -> None:
        for key in [k for k, r in self.records.items() if now - r.last_seen > RECORD_IDLE_S]:
            del self.records[key]

    def warn_once(self, source: str) -> None:
        if source in self._warned or len(self._warned) >= MAX_WARNED:
            log.debug("qos probe from unknown address %s ignored", source)
            return
        self._warned.add(source)
        log.warning("qos probe from unknown address %s ignored (not an admitted peer)", source)
