"""Chunk exchange between gateways on loopback: identity by source address, streamed and
verified chunks, zstd on the wire, `have` and manifests, corrupt data detected."""

from __future__ import annotations

import base64
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asynckit
import pytest
import storekit as kit
from procs import free_port

from appliance.mesh import protocol
from appliance.mesh.client import FetchError, PeerClient
from appliance.mesh.config import MeshConfig
from appliance.mesh.errors import PeerInputError
from appliance.mesh.peers import Peer, PeerRegistry
from appliance.mesh.server import MeshServer
from appliance.store import Store
from appliance.store.chunking import CHUNK_BYTES, decode
from appliance.store.config import StoreConfig

SERVER_ADDR, CLIENT_ADDR, STRANGER_ADDR = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def holder(tmp_path: Path):
    """A store with two instances (one compressible, one multi-chunk of noise)."""
    store = Store(StoreConfig(min_free_bytes=0), tmp_path / "store")
    study, series = kit.uid(1), kit.uid(2)
    items = [
        kit.build(sop_uid=kit.uid(3), series_uid=series, study_uid=study,
                  payload=kit.smooth(400_000)),
        kit.build(sop_uid=kit.uid(4), series_uid=series, study_uid=study,
                  payload=kit.noise(3 * CHUNK_BYTES, seed=4)),
    ]  # fmt: skip
    for item in items:
        store.put_instance(item.inc)
    yield store, items
    store.close()


def _server(store: Store, port: int) -> MeshServer:
    registry = PeerRegistry(Path("/nonexistent"))
    registry.set_peers([Peer("client-gw", _key(), [CLIENT_ADDR], "clinic", 7480)])
    cfg = MeshConfig(name="holder-gw", address=SERVER_ADDR, port=port)
    return MeshServer(cfg, registry, store)


def _client(port: int, source: str, pool: ThreadPoolExecutor) -> PeerClient:
    return PeerClient(Peer("holder-gw", _key(), [SERVER_ADDR], "clinic", port), source, pool)


def test_admitted_peer_gets_verified_chunks(holder):
    store, items = holder
    port = free_port(SERVER_ADDR)
    digests = [c.ref.digest for item in items for c in item.inc.chunks]

    async def body():
        server = _server(store, port)
        await server.start()
        pool = ThreadPoolExecutor(2)
        client = _client(port, CLIENT_ADDR, pool)
        try:
            hello = await client.hello()
            progress: list[int] = []
            got = [f async for f in client.fetch_chunks([*digests, b"\x01" * 32], progress.append)]
            have = await client.have([d[:8] for d in digests] + [b"\2" * 8])
            manifests = await client.manifests([items[0].uid, "1.2.3.999"])
        finally:
            await client.close()
            await server.stop()
            pool.shutdown()
        return hello, got, progress, have, manifests, server

    hello, got, progress, have, manifests, server = asynckit.run(body())
    assert hello["name"] == "holder-gw"
    assert [f.digest for f in got] == [*digests, b"\x01" * 32]
    assert all(f.chunk is not None for f in got[:-1]) and got[-1].missing
    first = got[0]
    assert first.chunk.codec == 1 and first.wire_bytes < items[0].inc.manifest.size  # zstd
    assert sum(progress) == sum(item.inc.manifest.size for item in items)  # chunk bytes
    assert have == [True] * len(digests) + [False]
    assert list(manifests) == [items[0].uid]
    assert manifests[items[0].uid].encode() == items[0].inc.manifest.encode()
    assert server.bytes_to_peer["client-gw"] > 0


def test_unknown_address_is_refused_and_counted(holder):
    store, _ = holder
    port = free_port(SERVER_ADDR)

    async def body():
        server = _server(store, port)
        await server.start()
        pool = ThreadPoolExecutor(1)
        stranger = _client(port, STRANGER_ADDR, pool)
        try:
            with pytest.raises(FetchError, match="403"):
                await stranger.have([b"\0" * 8])
            with pytest.raises(FetchError, match="403"):
                await stranger.manifests(["1.2.3"])
        finally:
            await stranger.close()
            await server.stop()
            pool.shutdown()
        return server.counters["forbidden"]

    assert asynckit.run(body()) == 2


def test_corrupt_stored_chunk_is_detected_by_the_downloader(holder):
    store, items = holder
    digest = items[1].inc.chunks[0].ref.digest
    with store.db.env.begin(write=True) as txn:
        stored = bytearray(txn.get(digest, db=store.db.tables.chunks))
        stored[100] ^= 0xFF
        txn.put(digest, bytes(stored), db=store.db.tables.chunks)
    port = free_port(SERVER_ADDR)

    async def body():
        server = _server(store, port)
        await server.start()
        pool = ThreadPoolExecutor(1)
        client = _client(port, CLIENT_ADDR, pool)
        try:
            return [f async for f in client.fetch_chunks([digest], lambda n: None)]
        finally:
            await client.close()
            await server.stop()
            pool.shutdown()

    (fetched,) = asynckit.run(body())
    assert fetched.corrupt and fetched.chunk is None


def test_pieces_of_a_chunk_put_together_are_the_chunk(holder):
    store, items = holder
    smooth, noisy = items[0].inc.chunks[0], items[1].inc.chunks[0]
    port = free_port(SERVER_ADDR)

    def cut(size: int) -> list[tuple[int, int]]:
        edges = [0, 65536, 3 * 65536, size]
        return list(itertools.pairwise(edges))

    async def body():
        server = _server(store, port)
        await server.start()
        pool = ThreadPoolExecutor(1)
        client = _client(port, CLIENT_ADDR, pool)
        progress: list[int] = []
        try:
            got = {}
            for chunk in (smooth, noisy):
                spans = cut(chunk.ref.size)
                got[chunk.ref.digest] = [
                    await client.fetch_span(chunk.ref.digest, s, progress.append) for s in spans
                ]
            beyond = await client.fetch_span(noisy.ref.digest, (0, CHUNK_BYTES + 1), print)
            unknown = await client.fetch_span(b"\x07" * 32, (0, 10), print)
        finally:
            await client.close()
            await server.stop()
            pool.shutdown()
        return got, progress, beyond, unknown, server.counters["pieces_served"]

    got, progress, beyond, unknown, served = asynckit.run(body())
    for chunk in (smooth, noisy):
        raw = bytes(decode(chunk.codec, chunk.stored, chunk.ref.size))
        assert b"".join(got[chunk.ref.digest]) == raw
    assert sum(progress) == smooth.ref.size + noisy.ref.size  # raw bytes, even when zstd
    assert beyond is None and unknown is None
    assert served == 6


def test_span_requests_round_trip_and_bad_spans_are_refused():
    digests = [bytes([i]) * 32 for i in range(3)]
    spans = [(0, 65536), (65536, 131072), (131072, 140000)]
    body = protocol.encode_chunk_request(digests, zstd=False, spans=spans)
    req = protocol.decode_chunk_request(body)
    assert req.digests == tuple(digests) and req.spans == tuple(spans) and not req.zstd
    assert protocol.decode_chunk_request(protocol.encode_chunk_request(digests)).spans is None
    bad = bytearray(body)
    bad[2 + 32 : 2 + 40] = protocol.SPAN.pack(10, 5)  # end before start
    with pytest.raises(PeerInputError, match="bad span"):
        protocol.decode_chunk_request(bytes(bad))
    with pytest.raises(PeerInputError):
        protocol.decode_chunk_request(body[:-3])
    with pytest.raises(ValueError):
        protocol.encode_chunk_request(digests, spans=spans[:2])
