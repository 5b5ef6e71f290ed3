"""Wire formats of the mesh HTTP API (/mesh/v1/...), pure encode/decode with size limits.

Binary where volume matters (chunks, `have` queries), zstd-compressed JSON elsewhere:
- POST /mesh/v1/chunks   body: version, flags, N x 32-byte SHA-256 digests (N <= MAX_BATCH);
                         with FLAG_SPANS each digest is followed by start u32, end u32: those
                         bytes of the chunk only (a piece; end <= chunk size).
                         response: one frame per requested digest, in request order:
                         status u8 (0 ok, 1 missing), codec u8 (0 raw, 1 zstd),
                         raw size u32, payload length u32 (big endian), payload.
- POST /mesh/v1/have     body: version, N x 8-byte digest prefixes (N <= MAX_HAVE).
                         response: bitmap, bit i (MSB first) set = a chunk with prefix i held.
- POST /mesh/v1/manifests           JSON {"sop": [...]} -> {"manifests": {sop: canonical}}
- POST /mesh/v1/catalog/pull        JSON {"vv": {...}, "limit": n} -> {"entries", "more"}
- GET  /mesh/v1/hello               JSON {"name", "role", "version"}
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import zstandard

from appliance.mesh.errors import PeerInputError

VERSION = 1
DIGEST = 32
PREFIX = 8
MAX_BATCH = 64  # chunks per request: 32 MiB at most in flight per request
MAX_HAVE = 16384  # prefixes per `have` query (a 1 GB study has ~2000 chunks)
MAX_MANIFESTS = 4096
MAX_JSON_BYTES = 16 << 20  # inflated size of any JSON body we accept
MAX_CHUNK = 8 << 20  # no chunk is larger (chunking.CHUNK_BYTES is 512 KiB)
FLAG_ZSTD = 0x01
FLAG_SPANS = 0x02
SPAN = struct.Struct(">II")

JSON_TYPE = "application/vnd.dicomesh+json+zstd"
CHUNKS_TYPE = "application/vnd.dicomesh.chunks"

FRAME = struct.Struct(">BBII")
OK, MISSING = 0, 1


@dataclass(frozen=True)
class ChunkRequest:
    digests: tuple[bytes, ...]
    zstd: bool
    spans: tuple[tuple[int, int], ...] | None = None  # (start, end) per digest


def encode_chunk_request(
    digests: list[bytes],
    *,
    zstd: bool = True,
    spans: list[tuple[int, int]] | None = None,
) -> bytes:
    if not 0 < len(digests) <= MAX_BATCH or any(len(d) != DIGEST for d in digests):
        raise ValueError("1-64 digests of 32 bytes")
    flags = FLAG_ZSTD if zstd else 0
    if spans is None:
        return bytes((VERSION, flags)) + b"".join(digests)
    if len(spans) != len(digests) or any(not 0 <= a < b <= MAX_CHUNK for a, b in spans):
        raise ValueError("one span 0 <= start < end <= MAX_CHUNK per digest")
    entries = b"".join(d + SPAN.pack(a, b) for d, (a, b) in zip(digests, spans, strict=True))
    return bytes((VERSION, flags | FLAG_SPANS)) + entries


def decode_chunk_request(body: bytes) -> ChunkRequest:
    if len(body) < 2 or body[0] != VERSION:
        raise PeerInputError("chunk request: bad version")
    flags, rest = body[1], body[2:]
    entry = DIGEST + (SPAN.size if flags & FLAG_SPANS else 0)
    count, extra = divmod(len(rest), entry)
    if extra or not 0 < count <= MAX_BATCH:
        raise PeerInputError("chunk request: need 1-64 digests of 32 bytes (with their spans)")
    entries = [rest[i * entry : (i + 1) * entry] for i in range(count)]
    digests = tuple(e[:DIGEST] for e in entries)
    if not flags & FLAG_SPANS:
        return ChunkRequest(digests, bool(flags & FLAG_ZSTD))
    spans = tuple(SPAN.unpack(e[DIGEST:]) for e in entries)
    if any(not 0 <= a < b <= MAX_CHUNK for a, b in spans):
        raise PeerInputError("chunk request: bad span")
    return ChunkRequest(digests, bool(flags & FLAG_ZSTD), spans)


def encode_frame_header(status: int, codec: int, raw_size: int, payload_length: int) -> bytes:
    return FRAME.pack(status, codec, raw_size, payload_length)


def decode_frame_header(header: bytes) -> tuple[int, int, int, int]:
    """(status, codec, raw size, payload length) of a frame; raises PeerInputError."""
    status, codec, raw_size, length = FRAME.unpack(header)
    if status not in (OK, MISSING) or codec not in (0, 1):
        raise PeerInputError("chunk frame: bad status or codec")
    if raw_size > MAX_CHUNK or length > MAX_CHUNK or (status == MISSING and length):
        raise PeerInputError("chunk frame: bad size")
    return status, codec, raw_size, length


def encode_have(prefixes: list[bytes]) -> bytes:
    if len(prefixes) > MAX_HAVE or any(len(p) != PREFIX for p in prefixes):
        raise ValueError("at most 16384 prefixes of 8 bytes")
    return bytes((VERSION,)) + b"".join(prefixes)


def decode_have(body: bytes) -> list[bytes]:
    if not body or body[0] != VERSION:
        raise PeerInputError("have: bad version")
    count, extra = divmod(len(body) - 1, PREFIX)
    if extra or count > MAX_HAVE:
        raise PeerInputError("have: need at most 16384 prefixes of 8 bytes")
    return [body[1 + i * PREFIX : 1 + (i + 1) * PREFIX] for i in range(count)]


def encode_bitmap(bits: list[bool]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


def decode_bitmap(data: bytes, count: int) -> list[bool]:
    if len(data) != (count + 7) // 8:
        raise PeerInputError("have: bitmap length does not match the query")
    return [bool(data[i // 8] & (0x80 >> (i % 8))) for i in range(count)]


def encode_json(obj: Any) -> bytes:
    raw = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return zstandard.ZstdCompressor(level=3).compress(raw)


def decode_json(body: bytes) -> Any:
    """A JSON body from a peer, inflated with a hard size limit; raises PeerInputError."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            raw = reader.read(MAX_JSON_BYTES + 1)
    except zstandard.ZstdError as exc:
        raise PeerInputError(f"json body: {exc}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise PeerInputError("json body too large")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PeerInputError(f"json body: {exc}") from None
