"""`qos measure --flow bulk:SECONDS`: TCP throughput of a path, against the responder's bulk
sink (probe.py), like a study transfer (elastic, as fast as TCP goes).

Throughput is goodput at the receiver: payload bytes only (TCP/IP headers, ~4 % of a full
segment, are not counted), from the sink's first read to its last, so the sender's own
buffering does not count. The sender keeps at most BULK_UNSENT bytes unsent (TCP_NOTSENT_LOWAT)
so that it stops on time instead of draining megabytes of socket buffer into a slow line.
`sent`/`received` are bytes; `tcp.srtt_ms` and `tcp.retransmits` come from TCP_INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from typing import Any

from appliance.qos.flows import BulkFlow
from appliance.qos.probe import BULK_REPLY

BULK_CHUNK = 64 * 1024
BULK_UNSENT = 32 * 1024
BULK_REPLY_TIMEOUT_S = 30.0
TCP_INFO_RTT, TCP_INFO_RETRANS = 68, 100  # byte offsets in Linux struct tcp_info


async def bulk_transfer(
    flow: BulkFlow, peer: str, port: int, bind: str | None, start: float
) -> dict[str, Any]:
    """Send as fast as TCP goes for `flow.seconds` from `start` (monotonic clock); its entry
    of the result. Raises OSError, TimeoutError or IncompleteReadError (not admitted: the
    responder closes at once)."""
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    reader, writer = await asyncio.open_connection(
        peer, port, local_addr=(bind, 0) if bind else None
    )
    sock: socket.socket = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, BULK_UNSENT)
    writer.transport.set_write_buffer_limits(high=BULK_UNSENT)
    chunk = bytes(BULK_CHUNK)
    sent = 0
    try:
        end = time.monotonic() + flow.seconds
        while time.monotonic() < end:
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
        srtt_ms, retrans = _tcp_info(sock)
        writer.write_eof()
        reply = await asyncio.wait_for(reader.readexactly(BULK_REPLY.size), BULK_REPLY_TIMEOUT_S)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    received, timed, active_ns = BULK_REPLY.unpack(reply)
    return {
        "kind": "bulk",
        "unit": "bytes",
        "sent": sent,
        "received": received,
        "dropped": sent - received,
        "loss_ratio": 0.0,  # TCP retransmits what the path drops (tcp.retransmits)
        "throughput_kbps": timed * 8e6 / active_ns if active_ns else 0.0,
        "delay_ms": {"mean": None, "p50": None, "p95": None, "max": None},
        "jitter_ms": None,
        "seconds": flow.seconds,
        "tcp": {"srtt_ms": srtt_ms, "retransmits": retrans},
    }


def _tcp_info(sock: socket.socket) -> tuple[float | None, int | None]:
    """Smoothed RTT and segments retransmitted, from Linux TCP_INFO (None elsewhere)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        rtt_us = struct.unpack_from("=I", info, TCP_INFO_RTT)[0]
        retrans = struct.unpack_from("=I", info, TCP_INFO_RETRANS)[0]
    except (OSError, AttributeError, struct.error):
        return None, None
    return rtt_us / 1000, retrans
