"""Binding sockets to one uplink: source address plus fwmark, so the policy rules of plan.py
send the connection out of that line (an unbound socket would follow the main default route,
i.e. use one line only).

How the mesh client uses it (one aiohttp session per path = (peer, uplink))::

    b = network.bindings()[i]                 # NetworkManager: usable uplinks
    connector = tcp_connector(b, limit=4)     # every connection of the session bound to b
    session = aiohttp.ClientSession(base_url=peer.url, connector=connector)

With WireGuard on, `b.source` is the uplink tunnel's overlay address, so the peer sees our
overlay identity and the packets enter that uplink's tunnel; without it, the uplink's own
address. Raw sockets (UDP measurement, probes): `open_socket(b, socket.SOCK_DGRAM)`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.net.netns import socket_in

SO_MARK = 36  # asm-generic/socket.h (Python 3.11's socket module does not name it)
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the port at connect(), per destination


@dataclass(frozen=True)
class UplinkBinding:
    """What a socket needs to leave through one uplink."""

    uplink: str  # uplink name
    source: str  # address to bind: the tunnel's overlay address, or the uplink's own
    fwmark: int  # routes the socket's packets through the uplink's table (needs CAP_NET_ADMIN)
    netns: str | None = None  # the namespace the sockets belong in (tests); None = ours


def bind_socket(sock: socket.socket, binding: UplinkBinding, port: int = 0) -> None:
    """Mark `sock` with the uplink's fwmark and bind it to the uplink's source address."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, binding.fwmark)
    if port == 0 and sock.type == socket.SOCK_STREAM:
        # Without this, bind() reserves a port for *every* destination: a few thousand
        # connections from one source address would exhaust the ephemeral range.
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((binding.source, port))


def open_socket(
    binding: UplinkBinding, type: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A new IPv4 socket bound to `binding` (may block in a test namespace: use an executor)."""
    sock = socket_in(binding.netns, socket.AF_INET, type, proto)
    try:
        bind_socket(sock, binding)
    except BaseException:
        sock.close()
        raise
    return sock


def socket_factory(binding: UplinkBinding) -> Callable[[Any], socket.socket]:
    """A `socket_factory` for aiohttp.TCPConnector (aiohttp >= 3.10): every connection it
    opens is bound to `binding`. Takes aiohappyeyeballs' addrinfo tuple."""

    def make(addr_info: Any) -> socket.socket:
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        if family != socket.AF_INET:
            raise OSError(f"uplink {binding.uplink}: IPv4 only, got address family {family}")
        sock = socket_in(binding.netns, family, type_, proto)
        try:
            bind_socket(sock, binding)
        except BaseException:
            sock.close()
            raise
        return sock

    return make


def tcp_connector(binding: UplinkBinding, **kwargs: Any) -> Any:
    """An aiohttp.TCPConnector whose connections all leave through `binding`'s uplink."""
    import aiohttp  # the firmware's HTTP stack; imported here to keep this module light

    return aiohttp.TCPConnector(socket_factory=socket_factory(binding), **kwargs)
