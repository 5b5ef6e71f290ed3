"""Probing one uplink: ICMP echo ("a.b.c.d") or TCP connect ("a.b.c.d:port"), sent through
that uplink only (socket bound to its source address and marked with its fwmark)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time

from appliance.net.binding import UplinkBinding, bind_socket
from appliance.net.health import ProbeResult
from appliance.net.netns import socket_in

_ICMP_ECHO_REQUEST, _ICMP_ECHO_REPLY = 8, 0


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    checksum = _checksum(header + payload)
    return struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, checksum, ident, seq) + payload


def _icmp_socket(binding: UplinkBinding) -> tuple[socket.socket, bool]:
    """A bound ICMP socket; True if raw (replies carry the IP header)."""
    try:
        # Unprivileged "ping" sockets (net.ipv4.ping_group_range) first: the kernel matches
        # replies to us, so we see no one else's ICMP.
        sock, raw = socket_in(binding.netns, socket.AF_INET, socket.SOCK_DGRAM, 1), False
    except PermissionError:
        sock, raw = socket_in(binding.netns, socket.AF_INET, socket.SOCK_RAW, 1), True
    try:
        bind_socket(sock, binding)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, raw


def _is_our_reply(packet: bytes, raw: bool, target: str, ident: int, seq: int) -> bool:
    if raw:
        if len(packet) < 20 or socket.inet_ntoa(packet[12:16]) != target:
            return False
        packet = packet[(packet[0] & 0x0F) * 4 :]
    if len(packet) < 8:
        return False
    kind, _code, _sum, their_ident, their_seq = struct.unpack("!BBHHH", packet[:8])
    # Ping sockets rewrite the identifier to their port: only raw sockets check it.
    return kind == _ICMP_ECHO_REPLY and their_seq == seq and (not raw or their_ident == ident)


async def ping(target: str, binding: UplinkBinding, timeout: float) -> ProbeResult:
    """One ICMP echo to `target` through `binding`'s uplink."""
    loop = asyncio.get_running_loop()
    try:
        sock, raw = await loop.run_in_executor(None, _icmp_socket, binding)
    except OSError:
        return ProbeResult(False)
    ident, seq = os.getpid() & 0xFFFF, int.from_bytes(os.urandom(2), "big")
    answered: asyncio.Future[float] = loop.create_future()

    def readable() -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while not answered.done():
                packet = sock.recv(2048)
                if _is_our_reply(packet, raw, target, ident, seq):
                    answered.set_result(time.monotonic())

    try:
        loop.add_reader(sock.fileno(), readable)
        sent = time.monotonic()
        sock.sendto(echo_request(ident, seq, b"dicomesh-probe"), (target, 0))
        done = await asyncio.wait_for(answered, timeout)
        return ProbeResult(True, done - sent)
    except (OSError, TimeoutError):
        return ProbeResult(False)
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


async def tcp_connect(host: str, port: int, binding: UplinkBinding, timeout: float) -> ProbeResult:
    """A TCP handshake with `host:port` through `binding`'s uplink; a refusal is an answer."""
    loop = asyncio.get_running_loop()
    try:
        sock = await loop.run_in_executor(
            None, socket_in, binding.netns, socket.AF_INET, socket.SOCK_STREAM
        )
    except OSError:
        return ProbeResult(False)
    try:
        bind_socket(sock, binding)
        sock.setblocking(False)
        sent = time.monotonic()
        # A refusal is an RST that came back over the line: the line works.
        with contextlib.suppress(ConnectionRefusedError):
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        return ProbeResult(True, time.monotonic() - sent)
    except (OSError, TimeoutError):
        return ProbeResult(False)
    finally:
        sock.close()


async def probe_any(targets: list[str], binding: UplinkBinding, timeout: float) -> ProbeResult:
    """Probe every target at once; the uplink works if any answers (fastest answer's RTT)."""
    if not targets:
        return ProbeResult(False)
    runs = []
    for target in targets:
        host, _, port = target.partition(":")
        runs.append(
            tcp_connect(host, int(port), binding, timeout) if port else ping(host, binding, timeout)
        )
    results = await asyncio.gather(*runs)
    rtts = [r.rtt_s for r in results if r.ok and r.rtt_s is not None]
    return ProbeResult(True, min(rtts)) if rtts else ProbeResult(False)
