"""Client side of the mesh API: one PeerClient per path (peer, local source address)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import aiohttp
import zstandard

from appliance.mesh import protocol
from appliance.mesh.errors import MeshError, PeerInputError
from appliance.mesh.peers import Peer
from appliance.store.chunking import ChunkRef, Codec, EncodedChunk

_READ_PIECE = 64 * 1024
# Small JSON/bitmap exchanges must not wait forever on a silently cut line (no RST comes):
# a peer silent this long is treated as unreachable. Chunk streams have no such bound; the
# swarm scheduler detects their stalls from the bytes it sees.
EXCHANGE_TIMEOUT = aiohttp.ClientTimeout(total=30.0, sock_connect=3.0, sock_read=10.0)


class FetchError(MeshError):
    """The peer could not be reached or the exchange broke off. `partial`: the chunk it was
    sending when the stream broke and the raw bytes of it received (unverified), if any."""

    def __init__(self, message: str, partial: tuple[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class StreamedFrame:
    """The frame being read, so that a stream that breaks leaves its received prefix."""

    def __init__(self) -> None:
        self.digest = b""
        self.codec = Codec.RAW
        self.parts: list[bytes] = []

    def start(self, digest: bytes, codec: int) -> None:
        self.digest, self.codec, self.parts = digest, Codec(codec), []

    def prefix(self) -> tuple[bytes, bytes] | None:
        """(digest, raw bytes received) of the frame, None if nothing usable arrived."""
        data = b"".join(self.parts)
        if self.codec == Codec.ZSTD and data:
            try:  # a zstd frame's prefix decodes to a prefix of the chunk
                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            except zstandard.ZstdError:
                return None
        return (self.digest, data) if data else None


@dataclass(frozen=True)
class Fetched:
    """One chunk of a batch: verified (`chunk` set), missing at the peer, or corrupt."""

    digest: bytes
    chunk: EncodedChunk | None  # as received (possibly zstd), verified against `digest`
    missing: bool = False
    corrupt: bool = False
    wire_bytes: int = 0


class PeerClient:
    """Talks to one peer from one local address (so the peer sees our overlay identity)."""

    def __init__(
        self,
        peer: Peer,
        local_address: str,
        verifier: Executor,
        *,
        connect_timeout: float = 3.0,
        max_connections: int = 4,
        connector: aiohttp.BaseConnector | None = None,
        address: str | None = None,
    ) -> None:
        """`connector`: one whose connections already leave through an uplink (bound to
        `local_address` and marked, see appliance.net.binding), instead of one bound to
        `local_address` only. `address`: which of the peer's overlay addresses to talk to
        (default its first; each is the far end of one of its uplink tunnels)."""
        self.peer = peer
        self.local_address = local_address
        self._verifier = verifier
        if connector is None:
            connector = aiohttp.TCPConnector(
                local_addr=(local_address, 0), limit=max_connections, force_close=False
            )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        self.session = aiohttp.ClientSession(
            base_url=_url(peer, address) if address else peer.url,
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
        )

    async def close(self) -> None:
        await self.session.close()

    async def _post(self, path: str, body: bytes, content_type: str) -> bytes:
        try:
            async with self.session.post(
                path, data=body, headers={"Content-Type": content_type}, timeout=EXCHANGE_TIMEOUT
            ) as resp:
                if resp.status != 200:
                    raise FetchError(f"{self.peer.name}{path}: HTTP {resp.status}")
                return await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise FetchError(f"{self.peer.name}{path}: {exc.__class__.__name__} {exc}") from None

    async def _json(self, path: str, obj: Any) -> Any:
        raw = await self._post(path, protocol.encode_json(obj), protocol.JSON_TYPE)
        return protocol.decode_json(raw)

    async def hello(self) -> dict[str, Any]:
        try:
            async with self.session.get("/mesh/v1/hello", timeout=EXCHANGE_TIMEOUT) as resp:
                if resp.status != 200:
                    raise FetchError(f"{self.peer.name}: hello HTTP {resp.status}")
                body = protocol.decode_json(await resp.read())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise FetchError(f"{self.peer.name}: {exc.__class__.__name__} {exc}") from None
        if not isinstance(body, dict):
            raise PeerInputError("hello: not an object")
        return body

    async def have(self, prefixes: list[bytes]) -> list[bool]:
        raw = await self._post(
            "/mesh/v1/have", protocol.encode_have(prefixes), "application/octet-stream"
        )
        return protocol.decode_bitmap(raw, len(prefixes))

    async def manifests(self, sops: list[str]) -> dict[str, str]:
        body = await self._json("/mesh/v1/manifests", {"sop": sops})
        found = body.get("manifests") if isinstance(body, dict) else None
        if not isinstance(found, dict):
            raise PeerInputError("manifests: malformed answer")
        return {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, str)}

    async def post_json(self, path: str, obj: Any) -> Any:
        """A JSON exchange on another route (e.g. the catalog's)."""
        return await self._json(path, obj)

    async def fetch_chunks(
        self,
        digests: list[bytes],
        on_bytes: Callable[[int], None],
        *,
        zstd: bool = True,
        frame: StreamedFrame | None = None,
    ) -> AsyncIterator[Fetched]:
        """Stream a batch: yields each chunk (verified off the event loop) as it completes;
        `on_bytes` sees progress as it arrives, in chunk (uncompressed) bytes: a chunk's
        whole size is reported before it is yielded. Raises FetchError if the exchange fails.
        `frame` (optional) holds the chunk being read, for a caller that cancels the stream
        and wants what arrived of it."""
        body = protocol.encode_chunk_request(digests, zstd=zstd)
        frame = frame or StreamedFrame()
        try:
            async with self.session.post(
                "/mesh/v1/chunks", data=body, headers={"Content-Type": "application/octet-stream"}
            ) as resp:
                if resp.status != 200:
                    raise FetchError(f"{self.peer.name}: chunks HTTP {resp.status}")
                for digest in digests:
                    yield await self._read_frame(resp.content, digest, on_bytes, frame)
        except (TimeoutError, aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            raise FetchError(
                f"{self.peer.name}: {exc.__class__.__name__} {exc}", frame.prefix()
            ) from None

    async def fetch_span(
        self,
        digest: bytes,
        span: tuple[int, int],
        on_bytes: Callable[[int], None],
        *,
        zstd: bool = True,
    ) -> bytes | None:
        """Bytes [start, end) of a chunk (a piece: it cannot be verified alone), or None when
        the peer lacks the chunk. Raises FetchError if the exchange fails, PeerInputError if
        the frame does not decode to exactly that many bytes."""
        body = protocol.encode_chunk_request([digest], zstd=zstd, spans=[span])
        try:
            async with self.session.post(
                "/mesh/v1/chunks", data=body, headers={"Content-Type": "application/octet-stream"}
            ) as resp:
                if resp.status != 200:
                    raise FetchError(f"{self.peer.name}: chunks HTTP {resp.status}")
                header = await resp.content.readexactly(protocol.FRAME.size)
                status, codec, raw_size, length = protocol.decode_frame_header(header)
                if status == protocol.MISSING:
                    return None
                payload = await _read_payload(resp.content, length, raw_size, on_bytes, [])
        except (TimeoutError, aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            raise FetchError(f"{self.peer.name}: {exc.__class__.__name__} {exc}") from None
        want = span[1] - span[0]
        try:
            raw = payload if codec == Codec.RAW else _inflate(payload, want)
        except zstandard.ZstdError as exc:
            raise PeerInputError(f"{self.peer.name}: piece does not decode: {exc}") from None
        if raw_size != want or len(raw) != want:
            raise PeerInputError(f"{self.peer.name}: piece of {len(raw)} bytes, asked {want}")
        return raw

    async def _read_frame(
        self,
        content: aiohttp.StreamReader,
        digest: bytes,
        on_bytes: Callable[[int], None],
        frame: StreamedFrame,
    ) -> Fetched:
        header = await content.readexactly(protocol.FRAME.size)
        status, codec, raw_size, length = protocol.decode_frame_header(header)
        if status == protocol.MISSING:
            return Fetched(digest, None, missing=True, wire_bytes=len(header))
        frame.start(digest, codec)
        payload = await _read_payload(content, length, raw_size, on_bytes, frame.parts)
        frame.parts = []
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._verifier, _verify, digest, codec, raw_size, payload)
        wire = len(header) + length
        if not ok:
            return Fetched(digest, None, corrupt=True, wire_bytes=wire)
        chunk = EncodedChunk(ChunkRef(digest, raw_size), Codec(codec), payload)
        return Fetched(digest, chunk, wire_bytes=wire)


async def _read_payload(
    content: aiohttp.StreamReader,
    length: int,
    raw_size: int,
    on_bytes: Callable[[int], None],
    parts: list[bytes],
) -> bytes:
    """A frame's payload, gathered in `parts`; progress reported in raw bytes, all of them
    before returning."""
    left = length
    reported = 0
    while left:
        piece = await content.read(min(left, _READ_PIECE))
        if not piece:
            raise asyncio.IncompleteReadError(b"", left)
        parts.append(piece)
        left -= len(piece)
        # Progress in chunk bytes: a compressed chunk counts its share of the raw size.
        due = raw_size * (length - left) // length
        if due > reported:
            on_bytes(due - reported)
            reported = due
    if raw_size > reported:
        on_bytes(raw_size - reported)
    return b"".join(parts)


def _url(peer: Peer, host: str) -> str:
    """The peer's mesh server at one of its addresses."""
    return f"http://[{host}]:{peer.port}" if ":" in host else f"http://{host}:{peer.port}"


def _inflate(payload: bytes, size: int) -> bytes:
    return zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)


def _verify(digest: bytes, codec: int, raw_size: int, payload: bytes) -> bool:
    """The payload decodes to `raw_size` bytes whose SHA-256 is `digest`."""
    try:
        raw = (
            payload
            if codec == Codec.RAW
            else zstandard.ZstdDecompressor().decompress(
                payload, max_output_size=protocol.MAX_CHUNK
            )
        )
    except zstandard.ZstdError:
        return False
    return len(raw) == raw_size and hashlib.sha256(raw).digest() == digest
