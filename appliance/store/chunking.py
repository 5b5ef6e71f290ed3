"""Splitting instances into content-addressed chunks, and the chunk storage codecs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum

import zstandard

# Chunk size: 512 KiB. The swarm pulls chunks over ADSL uplinks of ~800 kbit/s, where one
# 512 KiB chunk takes ~5 s from a single peer: small enough that the end game (re-requesting
# the last chunks from a faster peer) wastes little, and that a partial holder has something
# to serve after seconds; large enough that per-chunk overhead (request, LMDB key, manifest
# entry: ~100 B) stays below 0.1 %. A 1 GB study is ~2000 chunks. Whole instances up to
# SINGLE_CHUNK_MAX stay one chunk: a CT/MR slice (130-530 KB) is then exactly one chunk, so
# it needs one hash, one LMDB value and one request, while large multi-frame objects
# (mammography, XA cine, 10-500 MB) are split so several peers can serve one instance.
CHUNK_BYTES = 512 * 1024
SINGLE_CHUNK_MAX = 1024 * 1024


class Codec(IntEnum):
    """How a chunk's bytes are stored; the chunk key is always the hash of the raw bytes."""

    RAW = 0
    ZSTD = 1


# zstd level 1: the fastest level that still gains on 12-bit CT noise (~0.53 ratio measured);
# we only keep the compressed form when it saves at least MIN_SAVING of the bytes.
_ZSTD_LEVEL = 1
MIN_SAVING = 0.10


def chunk_spans(size: int) -> list[tuple[int, int]]:
    """The (offset, length) of each chunk of an instance of `size` bytes."""
    if size <= SINGLE_CHUNK_MAX:
        return [(0, size)]
    return [(off, min(CHUNK_BYTES, size - off)) for off in range(0, size, CHUNK_BYTES)]


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One entry of a manifest: the SHA-256 of the raw chunk bytes and their length."""

    digest: bytes
    size: int


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """A chunk ready for the writer: its reference and the bytes to store with their codec.

    `stored=None` refers to a chunk that must already be in the store (pinned by a swarm
    download); writing it when absent is an error, never an empty chunk."""

    ref: ChunkRef
    codec: Codec
    stored: bytes | memoryview | None


def split_and_hash(data: bytes, *, compress: bool = False) -> tuple[list[EncodedChunk], bytes]:
    """Chunks of `data` (zero-copy views when stored raw) and the SHA-256 of all of it."""
    view = memoryview(data)
    spans = chunk_spans(len(data))
    chunks = []
    for off, length in spans:
        part = view[off : off + length]
        ref = ChunkRef(hashlib.sha256(part).digest(), length)
        chunks.append(_encode(ref, part) if compress else EncodedChunk(ref, Codec.RAW, part))
    # A single-chunk instance's hash is its chunk's hash: hash once on the hot path.
    whole = chunks[0].ref.digest if len(spans) == 1 else hashlib.sha256(view).digest()
    return chunks, whole


def _encode(ref: ChunkRef, raw: memoryview) -> EncodedChunk:
    packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw)
    if len(packed) <= len(raw) * (1 - MIN_SAVING):
        return EncodedChunk(ref, Codec.ZSTD, packed)
    return EncodedChunk(ref, Codec.RAW, raw)


def decode(codec: int, stored: bytes | memoryview, size: int) -> bytes | memoryview:
    """The raw bytes of a stored chunk."""
    if codec == Codec.RAW:
        return stored
    if codec == Codec.ZSTD:
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=size)
    raise ValueError(f"unknown chunk codec {codec}")
