"""What `qos measure` sends: flow specs from the command line, and how a flow's packet size
maps to the bytes on the wire.

Packet size. `cbr:SIZE:INTERVAL_MS` takes SIZE as the simulator's `packet_bytes`: the
bytes the link transmits per packet, counted the way the link's shaper counts them. For an
Ethernet-framed link (a veth, a LAN port, the lab's tbf) that is the frame without preamble
and FCS, so

    SIZE = UDP payload + 8 (UDP) + 20 (IPv4; 40 for IPv6) + 14 (Ethernet)

and the probe's UDP payload is SIZE - 42 over IPv4. `link_overhead` (default 14) is the
per-packet layer-2 cost; set it to what your line adds (e.g. 0 for a bare IP tunnel
measured inside it, more for PPPoE/ATM) so SIZE keeps meaning "bytes on this link".
The smallest SIZE is the 28-byte probe header plus the headers: 70 bytes over IPv4/Ethernet.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass

from appliance.qos import codec

ETHERNET_HEADER = 14  # dst, src, ethertype; tc counts it, the FCS and preamble it does not
IP_UDP_HEADER = {4: 20 + 8, 6: 40 + 8}
MAX_FLOWS = 16

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class FlowSpecError(ValueError):
    """A --flow argument that does not parse."""


@dataclass(frozen=True)
class CbrFlow:
    """Constant bit rate: one packet of `packet_bytes` every `interval_ms`."""

    name: str
    packet_bytes: int
    interval_ms: float

    @property
    def offered_kbps(self) -> float:
        return self.packet_bytes * 8 / self.interval_ms

    def count(self, duration_s: float) -> int:
        """Packets sent in `duration_s`: at 0, interval, 2 interval, ... before the end."""
        return max(0, math.ceil((duration_s * 1000 - 1e-9) / self.interval_ms))


@dataclass(frozen=True)
class BulkFlow:
    """TCP as fast as it goes for `seconds` (elastic, like a study transfer)."""

    name: str
    seconds: float


Flow = CbrFlow | BulkFlow


def parse_flow(spec: str, index: int) -> Flow:
    """`[NAME=]cbr:SIZE:INTERVAL_MS` or `[NAME=]bulk:SECONDS`; unnamed flows are called
    cbr1, bulk2, ... after their kind and position (1-based `index`)."""
    name, _, body = spec.rpartition("=")
    kind, *fields = body.split(":")
    name = name or f"{kind}{index}"
    if not _NAME.match(name):
        raise FlowSpecError(f"{spec!r}: flow name must be 1-32 of A-Z a-z 0-9 _ . -")
    try:
        if kind == "cbr" and len(fields) == 2:
            size, interval = int(fields[0]), float(fields[1])
            if size <= 0 or not interval > 0:
                raise FlowSpecError(f"{spec!r}: SIZE and INTERVAL_MS must be > 0")
            return CbrFlow(name, size, interval)
        if kind == "bulk" and len(fields) == 1:
            seconds = float(fields[0])
            if not seconds > 0:
                raise FlowSpecError(f"{spec!r}: SECONDS must be > 0")
            return BulkFlow(name, seconds)
    except ValueError as exc:
        if isinstance(exc, FlowSpecError):
            raise
        raise FlowSpecError(f"{spec!r}: {exc}") from None
    raise FlowSpecError(f"{spec!r}: expected cbr:SIZE:INTERVAL_MS or bulk:SECONDS")


def parse_flows(specs: list[str]) -> list[Flow]:
    """All --flow arguments; names must be unique."""
    if not 1 <= len(specs) <= MAX_FLOWS:
        raise FlowSpecError(f"give 1-{MAX_FLOWS} flows")
    flows = [parse_flow(spec, i) for i, spec in enumerate(specs, 1)]
    names = [f.name for f in flows]
    if len(set(names)) != len(names):
        raise FlowSpecError(f"flow names must be unique: {names}")
    return flows


def ip_version(address: str) -> int:
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        raise FlowSpecError(f"{address!r} is not an IP address") from None


def probe_payload(packet_bytes: int, version: int, link_overhead: int = ETHERNET_HEADER) -> int:
    """The UDP payload that makes the link carry `packet_bytes` per packet."""
    headers = IP_UDP_HEADER[version] + link_overhead
    payload = packet_bytes - headers
    if payload < codec.HEADER_BYTES:
        raise FlowSpecError(
            f"packet size {packet_bytes} B: at least {codec.HEADER_BYTES + headers} B "
            f"({codec.HEADER_BYTES} B probe header + {headers} B IPv{version}/UDP/link headers)"
        )
    if payload > codec.MAX_PAYLOAD:
        raise FlowSpecError(f"packet size {packet_bytes} B: too large for one UDP datagram")
    return payload
