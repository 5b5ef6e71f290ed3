"""The mesh HTTP server: chunks, `have` queries, manifests and catalog pulls for admitted
peers only. Identity is the TCP source address (see peers.py), never a header."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zstandard
from aiohttp import web

from appliance import __version__
from appliance.mesh import protocol
from appliance.mesh.config import MeshConfig
from appliance.mesh.errors import PeerInputError
from appliance.mesh.peers import Peer, PeerRegistry
from appliance.mesh.ratelimit import TokenBucket
from appliance.store import Store
from appliance.store.chunking import MIN_SAVING, Codec

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PEER_KEY = web.RequestKey("peer", Peer)
# A bounded map keyed by addresses peers control: remember which unknown addresses we
# already warned about, at most this many.
_MAX_WARNED = 1024
_IP_FREEBIND = 15  # linux/in.h (Python 3.11's socket module does not name it)


class MeshServer:
    """Serves this gateway's store to admitted peers."""

    def __init__(
        self,
        cfg: MeshConfig,
        registry: PeerRegistry,
        store: Store,
        extra_routes: Callable[[web.Application], None] | None = None,
        *,
        listen: Sequence[str] = (),
        overlay_network: str | None = None,
    ) -> None:
        """`listen`: the addresses to serve on (default `[mesh] address`); with WireGuard
        on, the tunnels' overlay addresses and loopback. `overlay_network`: with WireGuard
        on, connections from outside it (plain underlay) are refused whatever the registry
        says: only a tunnel vouches for a source address."""
        self.cfg = cfg
        self.listen = tuple(listen) or (cfg.address,)
        self._freebind = bool(listen)
        self._overlay = ipaddress.ip_network(overlay_network) if overlay_network else None
        self.registry = registry
        self.store = store
        self.counters: Counter[str] = Counter()
        self.bytes_to_peer: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mesh-serve")
        rate = cfg.upload_kbps * 1000 / 8
        self._bucket = TokenBucket(rate, burst=max(rate / 4, 64 * 1024)) if rate else None
        self.app = web.Application(
            middlewares=[self._identify], client_max_size=protocol.MAX_JSON_BYTES
        )
        self.app.router.add_get("/mesh/v1/hello", self._hello)
        self.app.router.add_post("/mesh/v1/chunks", self._chunks)
        self.app.router.add_post("/mesh/v1/have", self._have)
        self.app.router.add_post("/mesh/v1/manifests", self._manifests)
        if extra_routes is not None:
            extra_routes(self.app)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        port = self.cfg.port
        for address in self.listen:
            sock = _listening_socket(address, port, freebind=self._freebind)
            port = sock.getsockname()[1]  # port 0 (tests): every address on the one chosen
            await web.SockSite(self._runner, sock).start()

    @property
    def port(self) -> int:
        assert self._runner is not None
        server = self._runner.addresses[0]
        return int(server[1])

    @property
    def addresses(self) -> list[str]:
        """The addresses it listens on."""
        assert self._runner is not None
        return [str(a[0]) for a in self._runner.addresses]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._io.shutdown(wait=False, cancel_futures=True)

    # -- identity ---------------------------------------------------------------------------

    @web.middleware
    async def _identify(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        address = request.remote or ""
        if self._overlay is not None and not _inside(address, self._overlay):
            # Not through a tunnel: nothing vouches for this source address.
            self.counters["underlay_refused"] += 1
            if address not in self._warned and len(self._warned) < _MAX_WARNED:
                self._warned.add(address)
                log.warning("mesh request from %s outside the overlay refused (403)", address)
            raise web.HTTPForbidden(text="mesh requests only through the VPN\n")
        peer = self.registry.by_address(address)
        if peer is None:
            self.counters["forbidden"] += 1
            if address not in self._warned and len(self._warned) < _MAX_WARNED:
                self._warned.add(address)
                log.warning("mesh request from unknown address %s refused (403)", address)
            raise web.HTTPForbidden(text="not an admitted peer\n")
        request[PEER_KEY] = peer
        try:
            return await handler(request)
        except PeerInputError as exc:
            self.counters["bad_request"] += 1
            log.debug("bad request from %s: %s", peer.name, exc)
            raise web.HTTPBadRequest(text=f"{exc}\n") from None

    # -- routes ---------------------------------------------------------------------------

    async def _hello(self, request: web.Request) -> web.Response:
        body = {"name": self.cfg.name, "role": self.cfg.role, "version": __version__}
        return _json_response(body)

    async def _have(self, request: web.Request) -> web.Response:
        prefixes = protocol.decode_have(await request.read())
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._io, self._have_blocking, prefixes)
        return web.Response(body=protocol.encode_bitmap(found))

    def _have_blocking(self, prefixes: list[bytes]) -> list[bool]:
        with self.store.reader() as r:
            return r.have_prefixes(prefixes)

    async def _manifests(self, request: web.Request) -> web.Response:
        body = protocol.decode_json(await request.read())
        sops = body.get("sop") if isinstance(body, dict) else None
        if not isinstance(sops, list) or len(sops) > protocol.MAX_MANIFESTS:
            raise PeerInputError("manifests: need a list of at most 4096 SOP Instance UIDs")
        if not all(isinstance(s, str) and 0 < len(s) <= 64 for s in sops):
            raise PeerInputError("manifests: SOP Instance UIDs must be strings")
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._io, self._manifests_blocking, sops)
        return _json_response({"manifests": found})

    def _manifests_blocking(self, sops: list[str]) -> dict[str, str]:
        with self.store.reader() as r:
            out = {}
            for sop in sops:
                manifest = r.manifest(sop)
                if manifest is not None:
                    out[sop] = manifest.encode().decode()
            return out

    async def _chunks(self, request: web.Request) -> web.StreamResponse:
        req = protocol.decode_chunk_request(await request.read())
        peer = request[PEER_KEY]
        response = web.StreamResponse(headers={"Content-Type": protocol.CHUNKS_TYPE})
        await response.prepare(request)
        _limit_unsent(request, self.cfg.max_inflight_upload_bytes)
        loop = asyncio.get_running_loop()
        spans = req.spans or (None,) * len(req.digests)
        for digest, span in zip(req.digests, spans, strict=True):
            frame = await loop.run_in_executor(
                self._io, self._frame_blocking, digest, req.zstd, span
            )
            if self._bucket is not None:
                await self._bucket.take(len(frame))
            await response.write(frame)
            self.bytes_to_peer[peer.name] += len(frame)
        await response.write_eof()
        self.counters["chunk_requests"] += 1
        return response

    def _frame_blocking(self, digest: bytes, zstd_ok: bool, span: tuple[int, int] | None) -> bytes:
        """One response frame: the chunk (or the span of it asked for) as stored, or
        zstd-compressed when that is smaller."""
        with self.store.reader() as r:
            found = r.chunk(digest)
            if found is None:
                self.counters["chunks_missing"] += 1
                return protocol.encode_frame_header(protocol.MISSING, 0, 0, 0)
            codec, stored = found
            payload = bytes(stored)
        if codec == Codec.ZSTD and (not zstd_ok or span is not None):
            payload = zstandard.ZstdDecompressor().decompress(payload)
            codec = Codec.RAW
        if span is not None:
            if span[1] > len(payload):  # asked beyond the chunk: not something we hold
                self.counters["chunks_missing"] += 1
                return protocol.encode_frame_header(protocol.MISSING, 0, 0, 0)
            payload = payload[span[0] : span[1]]
            self.counters["pieces_served"] += 1
        raw_size = len(payload) if codec == Codec.RAW else _zstd_size(payload)
        if codec == Codec.RAW and zstd_ok:
            packed = zstandard.ZstdCompressor(level=1).compress(payload)
            if len(packed) <= len(payload) * (1 - MIN_SAVING):
                payload, codec = packed, Codec.ZSTD
        self.counters["chunks_served"] += 1
        header = protocol.encode_frame_header(protocol.OK, codec, raw_size, len(payload))
        return header + payload


def _listening_socket(address: str, port: int, *, freebind: bool) -> socket.socket:
    """A listening TCP socket on address:port. `freebind` (tunnel addresses): bound even
    while the address is being (re)configured; it serves once the address is back."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if freebind:
            sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _inside(address: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """`address` is in `network` or a loopback address (local tools)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_loopback or ip in network


def _zstd_size(payload: bytes) -> int:
    size = zstandard.frame_content_size(payload)
    return size if size >= 0 else 0


def _limit_unsent(request: web.Request, limit: int) -> None:
    """Keep at most `limit` unsent bytes in the kernel for this connection: the modem's
    buffer, not ours, should hold the queue, and a new request then starts sooner."""
    transport = request.transport
    if transport is None:
        return
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, limit)
    transport.set_write_buffer_limits(high=limit)


def _json_response(obj: Any) -> web.Response:
    return web.Response(body=protocol.encode_json(obj), content_type=protocol.JSON_TYPE)
