"""Wire format of the QoS probes (I/O-free): one fixed 28-byte header, big-endian.

    offset size field
    0      2    magic b"DQ"
    2      1    kind   (PROBE, ECHO, SUMMARY_REQUEST, SUMMARY)
    3      1    flow   id of the flow inside the measurement session (0-255)
    4      4    session  random id chosen by the sender for one `qos measure` run
    8      4    seq    PROBE/ECHO: packet sequence number (from 0, per flow)
                       SUMMARY_REQUEST/SUMMARY: first sequence number the bitmap covers
    12     8    a      PROBE/ECHO: sender's wall clock at sending, ns since the epoch
                       SUMMARY: distinct probes of the flow received so far
    20     8    b      ECHO: responder's wall clock at arrival, ns since the epoch
                       SUMMARY: duplicate probes received so far
    28     ...  PROBE: zero padding up to the flow's packet size; SUMMARY: received-bitmap
                (bit i of byte j = seq first + 8j + i arrived); others: nothing

A PROBE is padded so that the link carries exactly the flow's packet size (see measure.py for
how that size maps to IP/UDP/Ethernet headers); the ECHO is header-only so the reverse path,
often the slower ADSL upstream, carries as little as possible.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"DQ"
HEADER = struct.Struct(">2sBBIIQQ")
HEADER_BYTES = HEADER.size  # 28
# Seqs one SUMMARY covers: 1024 bitmap bytes keep it under any path MTU we meet.
SUMMARY_SPAN = 1024 * 8
MAX_PAYLOAD = 65507  # UDP over IPv4


class CodecError(ValueError):
    """A datagram that is not a well-formed probe message."""


class Kind(IntEnum):
    PROBE = 1
    ECHO = 2
    SUMMARY_REQUEST = 3
    SUMMARY = 4


@dataclass(frozen=True)
class Probe:
    """A measurement packet from the sender."""

    session: int
    flow: int
    seq: int
    sent_ns: int


@dataclass(frozen=True)
class Echo:
    """The responder's answer to one probe: the probe's fields plus its arrival time."""

    session: int
    flow: int
    seq: int
    sent_ns: int
    received_ns: int


@dataclass(frozen=True)
class SummaryRequest:
    """Which probes of a flow arrived, from `first` on (answered with a Summary)."""

    session: int
    flow: int
    first: int


@dataclass(frozen=True)
class Summary:
    """Arrival record of a flow at the responder, for seqs first .. first + 8*len(bitmap)."""

    session: int
    flow: int
    first: int
    received: int
    duplicates: int
    bitmap: bytes

    def arrived(self, seq: int) -> bool:
        i = seq - self.first
        if not 0 <= i < len(self.bitmap) * 8:
            return False
        return bool(self.bitmap[i >> 3] >> (i & 7) & 1)


Message = Probe | Echo | SummaryRequest | Summary


def encode_probe(probe: Probe, payload_bytes: int) -> bytes:
    """A PROBE padded with zeros to `payload_bytes` (the UDP payload size)."""
    if not HEADER_BYTES <= payload_bytes <= MAX_PAYLOAD:
        raise CodecError(f"probe payload must be {HEADER_BYTES}-{MAX_PAYLOAD} bytes")
    head = _pack(Kind.PROBE, probe.flow, probe.session, probe.seq, probe.sent_ns, 0)
    return head + bytes(payload_bytes - HEADER_BYTES)


def encode(msg: Echo | SummaryRequest | Summary) -> bytes:
    """Any message but a PROBE (which needs a size: `encode_probe`)."""
    if isinstance(msg, Echo):
        return _pack(Kind.ECHO, msg.flow, msg.session, msg.seq, msg.sent_ns, msg.received_ns)
    if isinstance(msg, SummaryRequest):
        return _pack(Kind.SUMMARY_REQUEST, msg.flow, msg.session, msg.first, 0, 0)
    if len(msg.bitmap) > SUMMARY_SPAN // 8:
        raise CodecError("summary bitmap too long")
    head = _pack(Kind.SUMMARY, msg.flow, msg.session, msg.first, msg.received, msg.duplicates)
    return head + msg.bitmap


def decode(data: bytes) -> Message:
    """Parse one datagram; raise CodecError for anything else."""
    if len(data) < HEADER_BYTES:
        raise CodecError(f"{len(data)} bytes: shorter than the {HEADER_BYTES}-byte header")
    magic, kind, flow, session, seq, a, b = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("bad magic")
    if kind == Kind.PROBE:
        return Probe(session, flow, seq, a)
    if kind == Kind.ECHO:
        return Echo(session, flow, seq, a, b)
    if kind == Kind.SUMMARY_REQUEST:
        return SummaryRequest(session, flow, seq)
    if kind == Kind.SUMMARY:
        bitmap = bytes(data[HEADER_BYTES:])
        if len(bitmap) > SUMMARY_SPAN // 8:
            raise CodecError("summary bitmap too long")
        return Summary(session, flow, seq, a, b, bitmap)
    raise CodecError(f"unknown kind {kind}")


def _pack(kind: Kind, flow: int, session: int, seq: int, a: int, b: int) -> bytes:
    try:
        return HEADER.pack(MAGIC, kind, flow, session, seq, a, b)
    except struct.error as exc:
        raise CodecError(f"field out of range: {exc}") from None
