"""Swarm downloads between in-process gateways on loopback (real stores, HTTP, verification)."""

from __future__ import annotations

import asynckit
import meshkit
import pytest
import storekit as kit

from appliance.mesh import protocol
from appliance.store.chunking import CHUNK_BYTES


def _study(store, n: int = 6, multi: int = 1):
    """A study with n single-chunk instances and `multi` 3-chunk instances, stored."""
    study, series = kit.uid(100), kit.uid(101)
    items = [kit.build(sop_uid=kit.uid(200 + i), series_uid=series, study_uid=study,
                       payload=kit.noise(200_000 + 2 * i, seed=i), instance_number=i)
             for i in range(n)]  # fmt: skip
    items += [kit.build(sop_uid=kit.uid(300 + i), series_uid=series, study_uid=study,
                        payload=kit.noise(3 * CHUNK_BYTES - 1000, seed=50 + i))
              for i in range(multi)]  # fmt: skip
    for item in items:
        store.put_instance(item.inc)
    return study, items


async def _until(predicate, timeout: float = 20.0) -> None:
    await asynckit.until(predicate, timeout, 0.05)


@pytest.fixture
def two_sites(tmp_path):
    a = meshkit.make_site(tmp_path, "site-a", "127.0.0.41")
    b = meshkit.make_site(tmp_path, "site-b", "127.0.0.42")
    meshkit.admit(a, b)
    meshkit.admit(b, a)
    yield a, b
    meshkit.close(a, b)


def test_download_from_one_holder_is_complete_and_verified(two_sites):
    a, b = two_sites
    study, items = _study(a.store)

    async def body():
        await a.node.start()
        await b.node.start()
        try:
            await _until(lambda: study in b.node.catalog.remote_studies())
            state = b.node.fetch(study)
            await _until(lambda: state.finished, timeout=30)
            await _until(lambda: b.node.catalog.view(study).holders.get("site-b", {}).get("state")
                         == "complete")  # fmt: skip
            return state
        finally:
            await b.node.stop()
            await a.node.stop()

    state = asynckit.run(body(), max_block_s=0.2)
    assert state.error is None
    assert sorted(state.instances_done) == sorted(i.uid for i in items)
    for item in items:
        assert b.store.read_instance(item.uid) == item.raw
    with b.store.reader() as r:
        assert r.downloads() == [] and r.pinned(study) == set()
        assert r.study(study).n_instances == len(items)
    assert kit.audit(b.store) == []


def _sites(tmp_path, *specs):
    """Sites admitting each other; specs are (name, address, mesh overrides)."""
    sites = [meshkit.make_site(tmp_path, name, addr, **mesh) for name, addr, mesh in specs]
    for site in sites:
        meshkit.admit(site, *[s for s in sites if s is not site])
    return sites


def _big_study(store, n: int = 12):
    study, series = kit.uid(110), kit.uid(111)
    items = [kit.build(sop_uid=kit.uid(400 + i), series_uid=series, study_uid=study,
                       payload=kit.noise(CHUNK_BYTES - 600 + 2 * i, seed=70 + i),
                       instance_number=i)
             for i in range(n)]  # fmt: skip
    for item in items:
        store.put_instance(item.inc)
    return study, items


def _done(state, share: float) -> bool:
    p = state.progress
    return p is not None and p.bytes_total > 0 and p.bytes_done >= share * p.bytes_total


def test_partial_holder_serves_while_downloading(tmp_path):
    # A (slow uplink) holds the study; B starts fetching; C then fetches from A and B and must
    # get chunks from B, which holds them only as a download in progress.
    a, b, c = _sites(tmp_path, ("site-a", "127.0.0.61", {"upload_kbps": 8000}),
                     ("site-b", "127.0.0.62", {}), ("site-c", "127.0.0.63", {}))  # fmt: skip
    study, items = _big_study(a.store)

    async def body():
        for s in (a, b, c):
            await s.node.start()
        try:
            await _until(lambda: study in b.node.catalog.remote_studies())
            b_state = b.node.fetch(study)
            await _until(lambda: _done(b_state, 0.4), timeout=30)
            await _until(lambda: b.node.catalog.view(study).holders.get("site-b") is not None)
            await _until(lambda: "site-b" in c.node.catalog.view(study).holders, timeout=10)
            c_state = c.node.fetch(study)
            await _until(lambda: c_state.finished and b_state.finished, timeout=60)
            return c_state
        finally:
            for s in (c, b, a):
                await s.node.stop()

    try:
        c_state = asynckit.run(body(), max_block_s=0.2)
        assert c_state.error is None
        assert c_state.progress.peer_bytes.get("site-b", 0) > 0, c_state.progress.peer_bytes
        for item in items:
            assert c.store.read_instance(item.uid) == item.raw
        assert kit.audit(c.store) == [] and kit.audit(b.store) == []
    finally:
        meshkit.close(a, b, c)


def test_corrupt_peer_is_cut_off_and_its_chunks_fetched_elsewhere(tmp_path, caplog):
    a, x, c = _sites(tmp_path, ("site-a", "127.0.0.71", {"upload_kbps": 16000}),
                     ("site-x", "127.0.0.72", {}),
                     ("site-c", "127.0.0.73", {"bad_chunk_limit": 2}))  # fmt: skip
    study, items = _big_study(a.store, n=8)
    for item in items:  # X holds the same study, but every stored chunk is damaged
        x.store.put_instance(item.inc)
    _damage_chunks(x)

    async def body():
        for s in (a, x, c):
            await s.node.start()
        try:
            await _until(lambda: {"site-a", "site-x"} <= set(c.node.catalog.view(study).holders))
            state = c.node.fetch(study)
            await _until(lambda: state.finished, timeout=60)
            return state
        finally:
            for s in (c, x, a):
                await s.node.stop()

    try:
        state = asynckit.run(body(), max_block_s=0.2)
        assert state.error is None
        assert state.progress.peer_bytes.get("site-x", 0) == 0
        assert "site-x" in state.progress.cut_off
        assert sum("sent 2 corrupt chunks" in r.getMessage() for r in caplog.records) == 1
        for item in items:
            assert c.store.read_instance(item.uid) == item.raw
    finally:
        meshkit.close(a, x, c)


def _damage_chunks(site) -> None:
    """Flip a byte every 4 KiB of every chunk `site` stores: whole chunks fail their check, and
    so does any split chunk assembled with a piece of it, whichever piece that was (spoiling
    only the last byte left its other pieces good, and the test then depended on which
    pieces the tail gave it)."""
    tables = site.store.db.tables
    with site.store.db.env.begin(write=True) as txn:
        for key, value in list(txn.cursor(db=tables.chunks)):
            damaged = bytearray(value)
            for at in range(0, len(damaged), 4096):
                damaged[at] ^= 0x55
            txn.put(key, bytes(damaged), db=tables.chunks)


def test_dead_peer_work_moves_to_the_others(tmp_path):
    a, b, c = _sites(tmp_path, ("site-a", "127.0.0.81", {"upload_kbps": 8000}),
                     ("site-b", "127.0.0.82", {"upload_kbps": 8000}),
                     ("site-c", "127.0.0.83", {}))  # fmt: skip
    study, items = _big_study(a.store)
    for item in items:
        b.store.put_instance(item.inc)

    async def body():
        for s in (a, b, c):
            await s.node.start()
        try:
            await _until(lambda: {"site-a", "site-b"} <= set(c.node.catalog.view(study).holders))
            state = c.node.fetch(study)
            await _until(lambda: _done(state, 0.3), timeout=30)
            await b.node.stop()  # B dies: its connections drop, new ones are refused
            await _until(lambda: state.finished, timeout=60)
            return state
        finally:
            for s in (c, a):
                await s.node.stop()

    try:
        state = asynckit.run(body(), max_block_s=0.2)
        assert state.error is None
        for item in items:
            assert c.store.read_instance(item.uid) == item.raw
    finally:
        meshkit.close(a, b, c)


def test_restart_resumes_without_fetching_verified_chunks_again(tmp_path):
    a, b = _sites(tmp_path, ("site-a", "127.0.0.91", {"upload_kbps": 8000}),
                  ("site-b", "127.0.0.92", {}))  # fmt: skip
    study, items = _big_study(a.store)
    total = sum(item.inc.manifest.size for item in items)

    async def first_part():
        await a.node.start()
        await b.node.start()
        await _until(lambda: study in b.node.catalog.remote_studies())
        state = b.node.fetch(study)
        await _until(lambda: _done(state, 0.5), timeout=30)
        await b.node.stop()  # the gateway goes down mid-download
        return a.node.server.bytes_to_peer["site-b"]

    async def second_part(b2):
        await b2.node.start()  # resumes the recorded download by itself
        try:
            await _until(lambda: b2.node._downloads.get(study) is not None, timeout=10)
            state = b2.node._downloads[study].state
            await _until(lambda: state.finished, timeout=60)
            return state, a.node.server.bytes_to_peer["site-b"]
        finally:
            await b2.node.stop()
            await a.node.stop()

    async def both():
        sent_before = await first_part()
        b.store.close()
        b2 = meshkit.make_site(tmp_path, "site-b", "127.0.0.92", port=b.port)
        try:
            state, sent_total = await second_part(b2)
        finally:
            b2.store.close()
        return sent_before, state, sent_total, b2

    try:
        sent_before, state, sent_total, b2 = asynckit.run(both(), max_block_s=0.2)
        assert state.error is None
        assert sent_before >= 0.4 * total
        # Everything verified before the restart was kept: A sent about the study once.
        assert sent_total < 1.25 * total, (sent_total, total)
        b2_store = meshkit.Store(b2.store.cfg, b2.state_dir / "store")
        try:
            for item in items:
                assert b2_store.read_instance(item.uid) == item.raw
        finally:
            b2_store.close()
    finally:
        a.store.close()


def _pieces_test_sites(tmp_path, spoiled: bool):
    """Two holders uploading at 2 MB/s each, a downloader that never cuts site-x off, and a
    study of 13 chunks: the last ones are split. With `spoiled`, every piece site-x serves
    is damaged (see _spoil_pieces)."""
    a, x, c = _sites(tmp_path, ("site-a", "127.0.0.81", {"upload_kbps": 16000}),
                     ("site-x", "127.0.0.82", {"upload_kbps": 16000}),
                     ("site-c", "127.0.0.83", {"bad_chunk_limit": 1000}))  # fmt: skip
    study, items = _big_study(a.store, n=13)
    for item in items:
        x.store.put_instance(item.inc)
    if spoiled:
        _spoil_pieces(x)
    return (a, x, c), study, items


def _spoil_pieces(site) -> None:
    """`site` flips the last byte of every piece (span) it serves; its whole chunks stay
    intact. So every split chunk it contributes a piece to fails its check, whichever piece it
    was given, and it never runs out of chunks it may serve (whole chunks from a peer that
    spoils them are not asked of it again, and could leave it no piece to serve at all)."""
    server = site.node.server
    frame_of = server._frame_blocking

    def spoiled(digest: bytes, zstd_ok: bool, span: tuple[int, int] | None) -> bytes:
        if span is None:
            return frame_of(digest, zstd_ok, span)
        frame = frame_of(digest, False, span)  # raw: the last byte is the piece's last byte
        if len(frame) <= protocol.FRAME.size:
            return frame  # MISSING: nothing to spoil
        return frame[:-1] + bytes([frame[-1] ^ 0x55])

    server._frame_blocking = spoiled


def _fetch_from_both(sites, study):
    c = sites[2]

    async def body():
        for s in sites:
            await s.node.start()
        try:
            await _until(lambda: {"site-a", "site-x"} <= set(c.node.catalog.view(study).holders))
            state = c.node.fetch(study)
            await _until(lambda: state.finished, timeout=60)
            return state
        finally:
            for s in reversed(sites):
                await s.node.stop()

    return asynckit.run(body(), max_block_s=0.2)


def test_the_last_chunks_come_in_pieces_from_both_holders(tmp_path):
    sites, study, items = _pieces_test_sites(tmp_path, spoiled=False)
    a, x, c = sites
    try:
        state = _fetch_from_both(sites, study)
        assert state.error is None
        assert a.node.server.counters["pieces_served"] > 0
        assert x.node.server.counters["pieces_served"] > 0
        for item in items:
            assert c.store.read_instance(item.uid) == item.raw
        assert kit.audit(c.store) == []
    finally:
        meshkit.close(*sites)


def test_a_split_chunk_spoiled_by_one_piece_is_fetched_whole(tmp_path, caplog):
    sites, study, items = _pieces_test_sites(tmp_path, spoiled=True)
    x, c = sites[1:]
    caplog.set_level("INFO", logger="appliance.mesh.swarm.download")
    try:
        state = _fetch_from_both(sites, study)
        assert state.error is None
        assert x.node.server.counters["pieces_served"] > 0
        assert any("failed its check" in r.getMessage() for r in caplog.records)
        # Nobody is blamed for a spoiled assembly: its chunk is fetched whole instead.
        assert state.progress.corrupt_bytes > 0 and "site-x" not in state.progress.cut_off
        for item in items:
            assert c.store.read_instance(item.uid) == item.raw
        assert kit.audit(c.store) == []
    finally:
        meshkit.close(*sites)
