"""The QoS probe responder as the gateway runs it: UDP probes (probe_core.py) and a TCP bulk
sink, on the overlay address and the configured LAN addresses only (never the wildcard).

Identity is the source address, as everywhere in the mesh (peers.py): over WireGuard it is
the peer's key. Admitted are the registry's peers and loopback (local tools; a loopback
source cannot arrive from outside: the kernel drops such martians). A stranger's probes get
no answer at all (it cannot even tell the responder exists), its TCP connections are closed
at once; both are counted, and logged once per address.

Bulk sink (`qos measure --flow bulk:S`): an admitted peer connects over TCP to the same
port, sends for a while and half-closes; the sink answers 24 bytes, ">QQQ" = bytes received, the
bytes after its first read and the ns from that read to the last, then closes. It reads
only, bounded in time and in connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
import time
from collections.abc import Callable
from typing import Protocol, cast

from appliance.mesh.peers import Peer
from appliance.qos.config import QosConfig
from appliance.qos.probe_core import ResponderCore

log = logging.getLogger(__name__)

REFRESH_S = 2.0  # the registry file is re-checked at most this often (it reloads live)
BULK_REPLY = struct.Struct(">QQQ")
BULK_MAX_S = 300.0  # one bulk connection is cut after this long
BULK_IDLE_S = 10.0  # ... or after this long without a byte
BULK_MAX_CONNECTIONS = 8
_READ = 256 * 1024


class PeerLookup(Protocol):
    def by_address(self, address: str) -> Peer | None: ...


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, responder: ProbeResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport does not subclass DatagramTransport (3.11).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        # Stamped first thing: what lies between the wire and here (the loop's latency) is
        # part of the measured delay; at the line rates we measure that is well under 1 ms.
        wall_ns = time.time_ns()
        reply = self.responder.core.on_datagram(data, addr[0], wall_ns, time.monotonic())
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("qos probe socket: %s", exc)


class ProbeResponder:
    """Answers QoS probes and bulk transfers from admitted peers on the given addresses."""

    def __init__(
        self,
        cfg: QosConfig,
        addresses: list[str],
        peers: PeerLookup,
        refresh: Callable[[], object] | None = None,
        refresh_s: float = REFRESH_S,
    ) -> None:
        """`refresh` re-reads the peer registry if it changed, at most every `refresh_s`; pass
        it only when nobody else does (the mesh node reloads the registry it owns)."""
        self.cfg = cfg
        self.addresses = list(dict.fromkeys(addresses))
        self._peers = peers
        self._refresh = refresh
        self._refresh_s = refresh_s
        self._refreshed = -refresh_s
        self.core = ResponderCore(self.admitted)
        self._transports: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.Server] = []
        self._bulk: set[asyncio.Task] = set()

    def admitted(self, address: str) -> bool:
        if is_loopback(address):
            return True
        if self._refresh is not None and time.monotonic() - self._refreshed >= self._refresh_s:
            self._refreshed = time.monotonic()
            self._refresh()
        return self._peers.by_address(address) is not None

    @property
    def port(self) -> int:
        """The UDP port actually bound (differs from the config only for port 0 in tests)."""
        return int(self._transports[0].get_extra_info("sockname")[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        port = self.cfg.probe_port  # 0 (tests only): the first address picks, the rest follow
        try:
            for address in self.addresses:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(self), local_addr=(address, port)
                )
                self._transports.append(transport)  # type: ignore[arg-type]
                port = transport.get_extra_info("sockname")[1]
                server = await asyncio.start_server(self._bulk_sink, address, port)
                self._servers.append(server)
        except OSError:
            await self.stop()
            raise
        log.info("qos probe responder on %s port %d", ", ".join(self.addresses), self.port)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._bulk):
            task.cancel()
        await asyncio.gather(*self._bulk, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        for transport in self._transports:
            transport.close()
        self._servers, self._transports = [], []

    async def _bulk_sink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        refused = None
        if not self.admitted(source):
            refused = "unknown_source"
            self.core.warn_once(source)
        elif len(self._bulk) >= BULK_MAX_CONNECTIONS:
            refused = "bulk_refused"
        if refused is not None:
            self.core.counters[refused] += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._bulk.add(task)
        try:
            counts = await asyncio.wait_for(_drain(reader), BULK_MAX_S)
            writer.write(BULK_REPLY.pack(*counts))
            await writer.drain()
            self.core.counters["bulk_transfers"] += 1
        except (TimeoutError, OSError) as exc:
            log.debug("qos bulk from %s ended: %r", source, exc)
        finally:
            self._bulk.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _drain(reader: asyncio.StreamReader) -> tuple[int, int, int]:
    """Read to EOF: (all bytes, bytes after the first read, ns from the first read to the
    last). The first read's bytes arrived before its timestamp, so the rate leaves them out."""
    received = timed = 0
    first = last = 0
    while True:
        data = await asyncio.wait_for(reader.read(_READ), BULK_IDLE_S)
        if not data:
            return received, timed, last - first
        last = time.monotonic_ns()
        if received:
            timed += len(data)
        else:
            first = last
        received += len(data)
