"""The LMDB store (appliance.store) on real LMDB environments: durability, index counters,
content-addressed chunks, space limits, map growth, crash safety and the single writer.

Contract (product spec, store): C-STORE success only after chunks, manifest and index entries
are committed in one synced LMDB transaction; a kill -9 leaves the whole instance or nothing;
a full store answers StoreFull (0xA700) with one clear error log line; re-sends are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb
import pytest
import storekit as kit

from appliance.schema import ByteSize
from appliance.store import (
    CommitTimeout,
    CorruptData,
    Manifest,
    PutOutcome,
    Store,
    StoreClosed,
    StoreFull,
)
from appliance.store.chunking import (
    CHUNK_BYTES,
    SINGLE_CHUNK_MAX,
    ChunkRef,
    Codec,
    chunk_spans,
    split_and_hash,
)
from appliance.store.config import StoreConfig
from appliance.store.errors import StoreLocked
from appliance.store.records import UsageRecord

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MiB = 1 << 20
KiB = 1 << 10


def config(**kw: object) -> StoreConfig:
    """A StoreConfig that does not depend on the host's free disk space unless asked."""
    values: dict[str, object] = {"min_free_bytes": ByteSize(0)}
    values.update(kw)
    return StoreConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path) -> Iterator[Store]:
    s = Store(config(), store_dir)
    try:
        yield s
    finally:
        s.close()


def delete(store: Store, sop: str) -> int:
    """Delete an instance through the writer thread; returns its size (0 if absent)."""
    return store._writer.submit(lambda ops, _budget: ops.delete_instance(sop)).result(30)


def chunk_row(store: Store, digest: bytes) -> tuple[int, int, bytes] | None:
    """(refcount, codec, stored bytes) of a chunk straight from the LMDB tables, or None."""
    t = store.db.tables
    with store.db.read() as txn:
        meta = txn.get(digest, db=t.chunk_refs)
        stored = txn.get(digest, db=t.chunks)
        if meta is None and stored is None:
            return None
        assert meta is not None and stored is not None, "chunk and its refcount out of step"
        count, codec = kit.REF.unpack(meta)
        return count, codec, bytes(stored)


def digests(item: kit.Item) -> list[bytes]:
    return [c.digest for c in item.inc.manifest.chunks]


def put_all(store: Store, items: list[kit.Item]) -> None:
    for item in items:
        assert store.put_instance(item.inc) is PutOutcome.STORED


def messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == level and text in r.getMessage() and r.name.startswith("appliance.store")
    ]


# ------------------------------------------------------------------ 1. round trip and index

# (patient, study, series, modality, SOP classes of its instances)
LAYOUT = [
    ("PAT-0001", 1, 1, "CT", [kit.CT, kit.CT, kit.CT]),
    ("PAT-0001", 1, 2, "MR", [kit.MR, kit.MR]),
    ("PAT-0001", 2, 3, "CT", [kit.CT, kit.CT]),
    ("PAT-0001", 2, 4, "CT", [kit.CT]),
    ("PAT-0002", 3, 5, "US", [kit.US, kit.SC]),
]


def layout_items() -> list[kit.Item]:
    items = []
    n = 0
    for pid, study, series, modality, classes in LAYOUT:
        for k, sop_class in enumerate(classes, start=1):
            n += 1
            items.append(
                kit.build(
                    sop_uid=kit.uid(study, series, k),
                    series_uid=kit.uid(study, series),
                    study_uid=kit.uid(study),
                    patient_id=pid,
                    patient_name=f"NAME^{pid[-1]}",
                    sop_class=sop_class,
                    modality=modality,
                    payload=kit.noise(1000 + 38 * n, seed=n),
                    instance_number=k,
                )
            )
    return items


def test_put_read_round_trip_and_index(store_dir: Path) -> None:
    items = layout_items()
    store = Store(config(), store_dir)
    try:
        put_all(store, items)
    finally:
        store.close()
    by_series: dict[str, list[kit.Item]] = {}
    for item in items:
        by_series.setdefault(item.inc.series_uid, []).append(item)

    def size(study: int, series: int | None = None) -> int:
        return sum(
            len(i.raw)
            for i in items
            if i.inc.study_uid == kit.uid(study)
            and (series is None or i.inc.series_uid == kit.uid(study, series))
        )

    def check(s: Store) -> None:
        for item in items:
            assert s.read_instance(item.uid) == item.raw
        assert s.read_instance(kit.uid(9, 9, 9)) is None
        with s.reader() as r:
            p1, p2 = r.patient(kit.pkey("PAT-0001")), r.patient(kit.pkey("PAT-0002"))
            assert p1 is not None and p2 is not None
            assert (p1.n_studies, p1.n_series, p1.n_instances) == (2, 4, 8)
            assert (p2.n_studies, p2.n_series, p2.n_instances) == (1, 1, 2)
            assert p1.attrs == {"PatientName": "NAME^1", "PatientID": "PAT-0001"}

            st1, st2, st3 = (r.study(kit.uid(n)) for n in (1, 2, 3))
            assert st1 is not None and st2 is not None and st3 is not None
            assert (st1.patient_key, st2.patient_key) == (p1.key, p1.key)
            assert st3.patient_key == p2.key
            assert (st1.n_series, st1.n_instances, st1.bytes) == (2, 5, size(1))
            assert (st2.n_series, st2.n_instances, st2.bytes) == (2, 3, size(2))
            assert (st3.n_series, st3.n_instances, st3.bytes) == (1, 2, size(3))
            assert st1.modalities == {"CT": 1, "MR": 1}
            assert st2.modalities == {"CT": 2}
            assert st3.modalities == {"US": 1}
            assert st1.sop_classes == {kit.CT: 3, kit.MR: 2}
            assert st2.sop_classes == {kit.CT: 3}
            assert st3.sop_classes == {kit.US: 1, kit.SC: 1}
            assert st1.attrs["StudyDescription"] == "STORE TEST"

            for study, series, modality, n in [(1, 1, "CT", 3), (1, 2, "MR", 2), (3, 5, "US", 2)]:
                se = r.series(kit.uid(study, series))
                assert se is not None
                assert (se.study_uid, se.n_instances) == (kit.uid(study), n)
                assert se.bytes == size(study, series)
                assert se.attrs["Modality"] == modality

            for item in items:
                rec = r.instance(item.uid)
                assert rec is not None
                assert (rec.series_uid, rec.study_uid) == (item.inc.series_uid, item.inc.study_uid)
                assert rec.sop_class_uid == item.inc.manifest.sop_class_uid
                assert (rec.transfer_syntax, rec.size) == (kit.TS, len(item.raw))
                assert rec.sha256 == item.sha256
                assert rec.calling_ae == kit.CALLING_AE
                assert rec.attrs["SOPInstanceUID"] == item.uid
                assert r.manifest(item.uid) == item.inc.manifest

            assert {s.uid for s in r.studies_of(p1.key)} == {kit.uid(1), kit.uid(2)}
            assert [s.uid for s in r.studies_of(p2.key)] == [kit.uid(3)]
            assert {s.uid for s in r.series_of(kit.uid(1))} == {kit.uid(1, 1), kit.uid(1, 2)}
            assert {s.uid for s in r.series_of(kit.uid(2))} == {kit.uid(2, 3), kit.uid(2, 4)}
            for series_uid, members in by_series.items():
                assert {i.uid for i in r.instances_of(series_uid)} == {i.uid for i in members}
            assert list(r.studies_of(kit.pkey("NOBODY"))) == []
            assert list(r.instances_of(kit.uid(9, 9))) == []
        stats = s.stats()
        assert (stats.patients, stats.studies, stats.series, stats.instances) == (2, 3, 5, 10)
        assert stats.chunks == 10
        assert stats.used_bytes >= sum(len(i.raw) for i in items)
        assert kit.audit(s) == []

    for _ in range(2):  # durable: the same after a reopen, and read-only use changes nothing
        store = Store(config(), store_dir)
        try:
            check(store)
        finally:
            store.close()


def test_async_put_instance(store: Store) -> None:
    item = kit.build(sop_uid=kit.uid(1, 1, 1), series_uid=kit.uid(1, 1), study_uid=kit.uid(1))
    assert asyncio.run(store.async_put_instance(item.inc)) is PutOutcome.STORED
    assert store.read_instance(item.uid) == item.raw


# ------------------------------------------------------------------ 2. re-sends and versions


def one(payload: bytes, n: int = 1, *, series: int = 1, **kw: object) -> kit.Item:
    return kit.build(
        sop_uid=kit.uid(1, series, n),
        series_uid=kit.uid(1, series),
        study_uid=kit.uid(1),
        payload=payload,
        **kw,
    )


def test_resend_of_identical_bytes_is_a_no_op(store: Store) -> None:
    first = one(kit.noise(200_000, 1))
    other = one(kit.noise(50_000, 2), 2)
    put_all(store, [first, other])
    before = store.stats()
    with store.reader() as r:
        record, study, usage = r.instance(first.uid), r.study(kit.uid(1)), r.usage(kit.uid(1))

    again = kit.resend(first)  # a modality re-sending after a lost response
    assert again.raw == first.raw and again.inc.received_at > first.inc.received_at
    assert store.put_instance(again.inc) is PutOutcome.DUPLICATE

    after = store.stats()
    assert after.used_bytes == before.used_bytes
    assert (after.patients, after.studies, after.series, after.instances, after.chunks) == (
        before.patients,
        before.studies,
        before.series,
        before.instances,
        before.chunks,
    )
    with store.reader() as r:
        assert r.instance(first.uid) == record
        assert r.study(kit.uid(1)) == study
        assert r.usage(kit.uid(1)) == usage
    assert kit.audit(store) == []


def test_same_uid_other_bytes_replaces_and_frees_old_chunks(store: Store) -> None:
    old = one(kit.noise(300_000, 1))
    sibling = one(kit.noise(40_000, 2), 2)
    put_all(store, [old, sibling])
    before = store.stats()

    new = one(kit.noise(120_000, 3))
    assert new.uid == old.uid and new.sha256 != old.sha256
    assert store.put_instance(new.inc) is PutOutcome.REPLACED

    assert store.read_instance(new.uid) == new.raw
    assert chunk_row(store, digests(old)[0]) is None, "old chunk still stored"
    assert chunk_row(store, digests(new)[0])[:2] == (1, Codec.RAW)
    after = store.stats()
    assert (after.patients, after.studies, after.series, after.instances, after.chunks) == (
        before.patients,
        before.studies,
        before.series,
        before.instances,
        before.chunks,
    )
    assert after.used_bytes < before.used_bytes, "the old 300 kB version still takes space"
    with store.reader() as r:
        assert r.instance(new.uid).sha256 == new.sha256
        assert r.series(kit.uid(1, 1)).bytes == len(new.raw) + len(sibling.raw)
        assert r.study(kit.uid(1)).bytes == len(new.raw) + len(sibling.raw)
    assert kit.audit(store) == []


def test_replacing_a_multi_chunk_version_keeps_the_chunks_both_share(store: Store) -> None:
    payload = kit.noise(3 * CHUNK_BYTES, 1)
    old = one(payload)
    new = one(payload[:-4] + b"\x01\x02\x03\x04")
    shared = set(digests(old)) & set(digests(new))
    assert len(shared) == len(digests(old)) - 1, "only the last chunk differs"
    put_all(store, [old])

    assert store.put_instance(new.inc) is PutOutcome.REPLACED
    assert store.read_instance(new.uid) == new.raw
    for digest in shared:
        assert chunk_row(store, digest)[0] == 1
    assert chunk_row(store, digests(old)[-1]) is None
    assert kit.audit(store) == []


def test_replacing_the_only_instance_keeps_the_study_usage(store: Store) -> None:
    old = one(kit.noise(10_000, 1))
    put_all(store, [old])
    store.record_access([kit.uid(1)], when=1000.0)
    assert store.ping(10)
    with store.reader() as r:
        first_stored = r.usage(kit.uid(1)).first_stored

    new = one(kit.noise(10_000, 2))
    assert store.put_instance(new.inc) is PutOutcome.REPLACED
    with store.reader() as r:
        usage = r.usage(kit.uid(1))
    assert usage is not None
    assert (usage.first_stored, usage.last_access, usage.access_count) == (first_stored, 1000, 1)
    assert usage.last_stored == new.inc.received_at
    assert kit.audit(store) == []


# ------------------------------------------------------------------ 3. dedup and deletion


def test_shared_chunks_are_stored_once_and_freed_with_their_last_user(store: Store) -> None:
    payload = kit.noise(5 * CHUNK_BYTES, 7)  # 2.5 MiB of pixels, sent in two instances
    a = one(payload, 1, series=1)
    b = one(payload, 1, series=2)
    shared = set(digests(a)) & set(digests(b))
    assert digests(a)[0] != digests(b)[0], "headers differ"
    assert len(shared) == len(digests(a)) - 1 >= 4

    put_all(store, [a])
    used_a = store.stats().used_bytes
    put_all(store, [b])
    stats = store.stats()
    assert stats.chunks == len(set(digests(a)) | set(digests(b)))
    assert stats.used_bytes - used_a < len(b.raw) // 2, "shared chunks stored twice"
    for digest in shared:
        assert chunk_row(store, digest)[0] == 2
    assert chunk_row(store, digests(b)[0])[0] == 1

    assert delete(store, a.uid) == len(a.raw)
    assert store.read_instance(a.uid) is None
    assert chunk_row(store, digests(a)[0]) is None
    for digest in shared:
        assert chunk_row(store, digest)[0] == 1
    assert store.read_instance(b.uid) == b.raw
    with store.reader() as r:
        assert r.series(kit.uid(1, 1)) is None, "empty series kept"
        assert [s.uid for s in r.series_of(kit.uid(1))] == [kit.uid(1, 2)]
        study = r.study(kit.uid(1))
        assert (study.n_series, study.n_instances, study.bytes) == (1, 1, len(b.raw))
        patient = r.patient(kit.pkey("PAT-0001"))
        assert (patient.n_studies, patient.n_series, patient.n_instances) == (1, 1, 1)
    assert kit.audit(store) == []

    assert delete(store, b.uid) == len(b.raw)
    assert delete(store, b.uid) == 0
    stats = store.stats()
    assert (stats.patients, stats.studies, stats.series, stats.instances, stats.chunks) == (
        0,
        0,
        0,
        0,
        0,
    )
    with store.reader() as r:
        assert r.study(kit.uid(1)) is None and r.series(kit.uid(1, 2)) is None
        assert r.patient(kit.pkey("PAT-0001")) is None
        assert list(r.studies_of(kit.pkey("PAT-0001"))) == []
        assert list(r.series_of(kit.uid(1))) == []
    assert kit.audit(store) == []


def test_a_chunk_repeated_inside_one_instance_is_counted_per_reference(store: Store) -> None:
    item = one(bytes(4 * CHUNK_BYTES))  # zero pixels: inner chunks are all the same
    zero = hashlib.sha256(bytes(CHUNK_BYTES)).digest()
    assert digests(item).count(zero) == 3
    put_all(store, [item])
    assert chunk_row(store, zero)[0] == 3
    assert store.stats().chunks == len(set(digests(item)))
    assert store.read_instance(item.uid) == item.raw
    delete(store, item.uid)
    assert chunk_row(store, zero) is None
    assert store.stats().chunks == 0


# ------------------------------------------------------------------ 4. chunking and manifests


def test_chunk_spans_at_the_single_chunk_limit() -> None:
    assert chunk_spans(0) == [(0, 0)]
    assert chunk_spans(SINGLE_CHUNK_MAX) == [(0, SINGLE_CHUNK_MAX)]
    assert chunk_spans(SINGLE_CHUNK_MAX + 1) == [
        (0, CHUNK_BYTES),
        (CHUNK_BYTES, CHUNK_BYTES),
        (2 * CHUNK_BYTES, 1),
    ]
    data = kit.noise(SINGLE_CHUNK_MAX + 1)
    chunks, whole = split_and_hash(data)
    assert whole == hashlib.sha256(data).digest()
    assert [c.ref.size for c in chunks] == [CHUNK_BYTES, CHUNK_BYTES, 1]
    assert b"".join(bytes(c.stored) for c in chunks) == data
    assert chunks[2].ref.digest == hashlib.sha256(data[-1:]).digest()


def test_multi_chunk_instance_splits_and_reassembles(store: Store) -> None:
    item = one(kit.noise(3 * CHUNK_BYTES + 1234, 4))
    size = len(item.raw)
    assert size > SINGLE_CHUNK_MAX
    put_all(store, [item])
    with store.reader() as r:
        manifest = r.manifest(item.uid)
    assert manifest is not None
    sizes = [c.size for c in manifest.chunks]
    assert sizes == [CHUNK_BYTES] * (size // CHUNK_BYTES) + [size % CHUNK_BYTES]
    assert sum(sizes) == manifest.size == size
    assert manifest.sha256 == hashlib.sha256(item.raw).digest()
    for n, ref in enumerate(manifest.chunks):
        part = item.raw[n * CHUNK_BYTES : (n + 1) * CHUNK_BYTES]
        assert ref.digest == hashlib.sha256(part).digest()
        assert chunk_row(store, ref.digest)[2] == part
    assert store.read_instance(item.uid) == item.raw
    assert Manifest.decode(manifest.encode()) == manifest
    assert manifest.digest == hashlib.sha256(manifest.encode()).digest()


def test_manifest_canonical_encoding_golden() -> None:
    h = hashlib.sha256(b"hello").digest()
    m = Manifest(
        "1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", 5, h, (ChunkRef(h, 5),)
    )
    hx = h.hex()
    golden = (
        f'{{"chunks":[["{hx}",5]],"sha256":"{hx}","size":5,'
        '"sop_class_uid":"1.2.840.10008.5.1.4.1.1.2","sop_instance_uid":"1.2.3",'
        '"transfer_syntax":"1.2.840.10008.1.2.1","v":1}'
    ).encode()
    assert m.encode() == golden
    assert m.digest == hashlib.sha256(golden).digest()
    assert Manifest.decode(golden) == m
    assert Manifest.decode(memoryview(golden)).digest == m.digest
    with pytest.raises(ValueError):
        Manifest.decode(golden.replace(b'"v":1', b'"v":2'))


# ------------------------------------------------------------------ 5. zstd


def test_zstd_keeps_compressible_chunks_small_and_incompressible_raw(store: Store) -> None:
    small = one(kit.smooth(300_000), 1, compress=True)
    large = one(kit.smooth(3 * CHUNK_BYTES, 5), 2, compress=True)
    noisy = one(kit.noise(300_000, 3), 3, compress=True)
    put_all(store, [small, large, noisy])

    for item in (small, large):
        for ref in item.inc.manifest.chunks:
            _, codec, stored = chunk_row(store, ref.digest)
            assert codec == Codec.ZSTD
            assert len(stored) < ref.size // 2
    (ref,) = noisy.inc.manifest.chunks
    _, codec, stored = chunk_row(store, ref.digest)
    assert codec == Codec.RAW and len(stored) == ref.size == len(noisy.raw)
    for item in (small, large, noisy):
        assert store.read_instance(item.uid) == item.raw
    assert store.stats().used_bytes < len(noisy.raw) + (len(small.raw) + len(large.raw)) // 2
    # The same pixels received uncompressed in another instance reuse the compressed chunks.
    twin = one(kit.smooth(3 * CHUNK_BYTES, 5), 2, series=2)
    shared = set(digests(twin)) & set(digests(large))
    assert len(shared) >= 2
    assert store.put_instance(twin.inc) is PutOutcome.STORED
    for digest in shared:  # counted per reference: these pixels repeat every 512 KiB
        refs = digests(large).count(digest) + digests(twin).count(digest)
        assert chunk_row(store, digest)[:2] == (refs, Codec.ZSTD)
    assert store.read_instance(twin.uid) == twin.raw
    assert kit.audit(store) == []


# ------------------------------------------------------------------ 6. quota


def test_quota_refuses_cleanly_logs_once_and_recovers(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.store")
    store = Store(config(max_bytes=ByteSize(2 * MiB)), store_dir)
    try:
        items = [one(kit.noise(300_000, n), n) for n in range(1, 25)]
        acked: list[kit.Item] = []
        refused: list[int] = []
        for n, item in enumerate(items):
            try:
                assert store.put_instance(item.inc) is PutOutcome.STORED
                acked.append(item)
            except StoreFull:
                refused.append(n)
        assert 3 <= len(acked) < len(items)
        assert refused == list(range(len(acked), len(items))), "a later put got through"
        assert len(messages(caplog, logging.ERROR, "store full")) == 1
        assert store.stats().full_reason is not None

        # Still serving: reads, pings, usage updates, and idempotent re-sends.
        assert store.ping(10)
        for item in acked:
            assert store.read_instance(item.uid) == item.raw
        resend = kit.resend(acked[0])
        assert store.put_instance(resend.inc) is PutOutcome.DUPLICATE
        with pytest.raises(StoreFull):
            store.put_instance(items[-1].inc)
        assert len(messages(caplog, logging.ERROR, "store full")) == 1
        assert messages(caplog, logging.INFO, "accepts instances again") == []

        for item in acked[:3]:
            delete(store, item.uid)
        assert store.put_instance(items[-1].inc) is PutOutcome.STORED
        assert len(messages(caplog, logging.INFO, "accepts instances again")) == 1
        assert store.stats().full_reason is None
        assert store.read_instance(items[-1].uid) == items[-1].raw
        assert kit.audit(store) == []
    finally:
        store.close()


def test_resend_is_acknowledged_while_full(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.store")
    stored = [one(kit.noise(100_000, n), n) for n in range(1, 4)]
    store = Store(config(), store_dir)
    put_all(store, stored)
    store.close()
    store = Store(config(max_bytes=ByteSize(64 * KiB)), store_dir)  # quota lowered below use
    try:
        for n in range(3):
            with pytest.raises(StoreFull):
                store.put_instance(one(kit.noise(2000, 10 + n), 10 + n).inc)
            resend = kit.resend(stored[n])
            assert store.put_instance(resend.inc) is PutOutcome.DUPLICATE
        assert len(messages(caplog, logging.ERROR, "store full")) == 1
        assert messages(caplog, logging.INFO, "accepts instances again") == []
        assert store.stats().full_reason is not None
    finally:
        store.close()


# ------------------------------------------------------------------ 7. map growth


def test_map_grows_under_concurrent_readers(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.store")
    store = Store(config(), store_dir, map_size=2 * MiB)
    try:
        start = store.db.map_size
        assert start == 2 * MiB
        first = one(kit.noise(100_000, 1))
        put_all(store, [first])

        stop = threading.Event()
        errors: list[BaseException] = []
        reads = [0]

        def read_loop() -> None:
            try:
                while not stop.is_set():
                    assert store.read_instance(first.uid) == first.raw
                    with store.reader() as r:  # long reads: hashing big instances
                        for rec in r.all_instances():
                            assert r.instance_bytes(rec.uid) is not None
                    store.stats()
                    reads[0] += 1
            except BaseException as exc:
                errors.append(exc)

        readers = [threading.Thread(target=read_loop) for _ in range(4)]
        for t in readers:
            t.start()
        try:
            big = [one(kit.noise(3 * MiB // 2, n), n) for n in range(2, 6)]
            put_all(store, big)
        finally:
            stop.set()
            for t in readers:
                t.join(30)
        assert errors == []
        assert reads[0] > 0
        assert store.db.map_size > start + 6 * MiB
        assert messages(caplog, logging.INFO, "map grown")
        for item in [first, *big]:
            assert store.read_instance(item.uid) == item.raw
        assert kit.audit(store) == []
    finally:
        store.close()


# ------------------------------------------------------------------ 8. a real full disk


def _mount_tmpfs(where: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB filesystem of its own, unmounted after the test whatever happens."""
    yield from _mount_tmpfs(tmp_path / "tmpfs", "24m")


@pytest.fixture
def tmpfs64(tmp_path: Path) -> Iterator[Path]:
    yield from _mount_tmpfs(tmp_path / "tmpfs64", "64m")


def disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(store: Store, seed: int, *, series: int = 1) -> tuple[dict[str, bytes], StoreFull]:
    """Put random-sized instances until five in a row are refused; returns the acked ones."""
    rng = random.Random(seed)
    acked: dict[str, bytes] = {}
    refusals: list[StoreFull] = []
    n = 0
    while len(refusals) < 5:
        n += 1
        assert n < 400, "the store never filled up"
        size = rng.choice([20_000, 250_000, 700_000, 1_400_000, 2_600_000])
        item = one(kit.noise(size, seed * 1000 + n), n, series=series)
        try:
            assert store.put_instance(item.inc) is PutOutcome.STORED  # nothing else escapes
        except StoreFull as exc:
            refusals.append(exc)
        else:
            acked[item.uid] = item.raw
            refusals.clear()
    return acked, refusals[0]


def verify(store: Store, acked: dict[str, bytes]) -> None:
    for sop, raw in acked.items():
        assert store.read_instance(sop) == raw, sop
    assert kit.audit(store) == []


def test_full_disk_refuses_and_the_store_survives(tmpfs: Path) -> None:
    directory = tmpfs / "store"
    store = Store(config(), directory)
    try:
        acked, _ = fill(store, 1)
        assert sum(map(len, acked.values())) > 12 * MiB, "gave up long before the disk was full"
        assert disk_free(tmpfs) < 3 * MiB
        assert store.ping(10)
        verify(store, acked)
        store.close()

        store = Store(config(), directory)
        verify(store, acked)
        big_first = sorted(acked, key=lambda sop: -len(acked[sop]))
        for sop in big_first[:4]:
            assert delete(store, sop) > 0
            del acked[sop]
        fresh = one(kit.noise(600_000, 99), 999, series=2)
        assert store.put_instance(fresh.inc) is PutOutcome.STORED
        acked[fresh.uid] = fresh.raw
        verify(store, acked)
        store.close()

        store = Store(config(), directory)
        verify(store, acked)
    finally:
        store.close()


def test_enospc_at_commit_is_store_full_and_nothing_is_lost(tmpfs64: Path) -> None:
    directory = tmpfs64 / "store"
    store = Store(config(), directory)
    filler = tmpfs64 / "filler"
    try:
        acked = {}
        for n in range(1, 4):
            item = one(kit.noise(200_000, n), n)
            put_all(store, [item])
            acked[item.uid] = item.raw
        # 40 MiB in 80 chunks: each chunk's overflow pages take a page more than its bytes,
        # so the write needs ~300 KiB more than the space check estimates. Leave room for
        # the estimate only: the check passes and LMDB's write fails with ENOSPC.
        big = one(kit.noise(40 * MiB, 50), 50)
        room = len(big.raw) + 96 * KiB
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, disk_free(tmpfs64) - room)
        assert abs(disk_free(tmpfs64) - room) < 64 * KiB
        with pytest.raises(StoreFull, match="disk full"):
            store.put_instance(big.inc)
        assert store.read_instance(big.uid) is None
        assert store.ping(10)
        verify(store, acked)

        filler.unlink()
        item = one(kit.noise(300_000, 60), 60)
        put_all(store, [item])
        acked[item.uid] = item.raw
        verify(store, acked)
        store.close()

        store = Store(config(), directory)
        verify(store, acked)
    finally:
        store.close()


def test_free_space_reserve_refuses_before_the_disk_is_full(tmpfs: Path) -> None:
    reserve = 4 * MiB
    store = Store(config(min_free_bytes=ByteSize(reserve)), tmpfs / "store")
    try:
        acked, refusal = fill(store, 2)
        assert "reserve" in str(refusal)
        assert sum(map(len, acked.values())) > 8 * MiB
        assert disk_free(tmpfs) > reserve - 512 * KiB
        # The disk really has room left: other writers on it still work.
        (tmpfs / "other").write_bytes(bytes(2 * MiB))
        verify(store, acked)
    finally:
        store.close()


# ------------------------------------------------------------------ 9. kill -9

CHILD = textwrap.dedent(
    """\
    import hashlib, random, sys
    from pathlib import Path

    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    import storekit as kit
    from appliance.schema import ByteSize
    from appliance.store import Store
    from appliance.store.chunking import CHUNK_BYTES
    from appliance.store.config import StoreConfig

    directory, round_no = Path(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(round_no)
    store = Store(StoreConfig(min_free_bytes=ByteSize(0)), directory)
    shared = kit.noise(3 * CHUNK_BYTES, 999)  # identical in every round: chunks shared
    live = {}

    def say(*words):
        print(*words, flush=True)

    say("ready")
    n = 0
    while True:
        n += 1
        roll = rng.random()
        if live and roll < 0.15:
            sop = rng.choice(sorted(live))
            say("i", sop, "-")
            store._writer.submit(lambda ops, _b, s=sop: ops.delete_instance(s)).result()
            del live[sop]
            say("c", sop)
            continue
        if live and roll < 0.3:
            sop = rng.choice(sorted(live))
            study, series = live[sop]
        else:
            sop = kit.uid(round_no, n, 0)
            study, series = rng.randrange(3), rng.randrange(2)
        if rng.random() < 0.3:
            payload = shared + kit.noise(2 * rng.randrange(1, 40_000), rng.randrange(1 << 30))
        else:
            payload = kit.noise(2 * rng.randrange(1, 100_000), rng.randrange(1 << 30))
        item = kit.build(
            sop_uid=sop,
            series_uid=kit.uid(study, series, 0),
            study_uid=kit.uid(study, 0, 0),
            patient_id=f"PAT-000{study % 2}",
            payload=payload,
        )
        say("i", sop, item.sha256.hex())
        store.put_instance(item.inc)
        live[sop] = (study, series)
        say("c", sop)
        assert store.read_instance(sop) == item.raw  # keeps reader slots in use
    """
)


def test_kill_9_leaves_whole_instances_or_nothing(tmp_path: Path, store_dir: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(9)
    # sop -> acceptable SHA-256s (None: absent); an unconfirmed last operation may have landed.
    expected: dict[str, set[str | None]] = {}
    confirmed = 0
    for round_no in range(1, 6):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(REPO), str(TESTS), str(store_dir), str(round_no)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout.readline() == "ready\n", proc.stderr.read()
            lines = []
            for _ in range(rng.randrange(1, 60)):  # let it run a random number of steps
                line = proc.stdout.readline()
                assert line, f"child died: {proc.stderr.read()}"
                lines.append(line)
            time.sleep(rng.uniform(0, 0.05))  # ... and stop it at a random moment after
            proc.kill()
            proc.wait(10)
            rest = proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
        text = "".join(lines) + rest
        complete = text.split("\n")[:-1]  # a line cut by the kill is not a promise
        pending: tuple[str, str | None] | None = None
        for line in complete:
            kind, sop, *digest = line.split()
            if kind == "i":
                pending = (sop, None if digest == ["-"] else digest[0])
            else:
                assert kind == "c" and pending is not None and pending[0] == sop, line
                expected[sop] = {pending[1]}
                pending = None
                confirmed += 1
        if pending is not None:
            expected.setdefault(pending[0], {None}).add(pending[1])

        store = Store(config(), store_dir)  # no StoreLocked: the flock died with the child
        try:
            assert proc.pid not in _pids_of(store), "stale reader slot kept"
            for sop, acceptable in expected.items():
                data = store.read_instance(sop)
                found = None if data is None else hashlib.sha256(data).hexdigest()
                assert found in acceptable, f"round {round_no}: {sop} is {found}"
                expected[sop] = {found}
            assert kit.audit(store) == [], f"round {round_no}"
        finally:
            store.close()
    assert confirmed >= 10, "the child hardly wrote anything"


def _pids_of(store: Store) -> set[int]:
    lines = store.db.env.readers().splitlines()[1:]
    return {int(line.split()[0]) for line in lines if line.strip()}


# ------------------------------------------------------------------ 10. group commit


def test_concurrent_puts_share_commits(store: Store) -> None:
    commits = 0
    real = store.db.used_bytes
    count_lock = threading.Lock()

    def counting_used_bytes(txn: lmdb.Transaction) -> int:
        nonlocal commits
        with count_lock:
            commits += 1
        return real(txn)

    store.db.used_bytes = counting_used_bytes  # type: ignore[method-assign]
    threads, per_thread = 16, 6
    items = [
        one(kit.noise(20_000, 100 * t + k), 100 * t + k, series=t)
        for t in range(threads)
        for k in range(per_thread)
    ]
    barrier = threading.Barrier(threads)

    def work(t: int) -> list[PutOutcome]:
        barrier.wait()
        return [store.put_instance(i.inc) for i in items[t * per_thread : (t + 1) * per_thread]]

    with ThreadPoolExecutor(threads) as pool:
        outcomes = [o for result in pool.map(work, range(threads)) for o in result]
    assert outcomes == [PutOutcome.STORED] * len(items)
    n = len(items)
    assert 0 < commits < n
    for item in items:
        assert store.read_instance(item.uid) == item.raw
    assert kit.audit(store) == []


def test_concurrent_copies_of_one_instance_are_stored_once(store: Store) -> None:
    item = one(kit.noise(3 * CHUNK_BYTES, 3))
    copies = [kit.resend(item) for _ in range(8)]
    barrier = threading.Barrier(len(copies))

    def send(copy: kit.Item) -> PutOutcome:
        barrier.wait()
        return store.put_instance(copy.inc)

    with ThreadPoolExecutor(len(copies)) as pool:
        outcomes = list(pool.map(send, copies))
    assert sorted(o.value for o in outcomes) == ["duplicate"] * 7 + ["stored"]
    assert store.stats().instances == 1
    assert all(chunk_row(store, d)[0] == 1 for d in digests(item))
    assert kit.audit(store) == []


def test_commit_timeout_may_still_land_and_a_resend_is_idempotent(store: Store) -> None:
    release = threading.Event()
    blocker = store._writer.submit(lambda _ops, _budget: release.wait(30))
    item = one(kit.noise(50_000, 1))
    with pytest.raises(CommitTimeout):
        store.put_instance(item.inc, timeout=0.2)
    release.set()
    assert blocker.result(30) is True
    assert store.ping(10)
    assert store.read_instance(item.uid) == item.raw
    assert store.put_instance(kit.resend(item).inc) is PutOutcome.DUPLICATE


# ------------------------------------------------------------------ 11. usage statistics


def test_record_access_updates_usage_until_the_study_goes(store: Store) -> None:
    a = one(kit.noise(10_000, 1), 1)
    b = one(kit.noise(10_000, 2), 2)
    other = kit.build(
        sop_uid=kit.uid(2, 1, 1), series_uid=kit.uid(2, 1), study_uid=kit.uid(2), payload=b"ab"
    )
    put_all(store, [a, b, other])
    with store.reader() as r:
        usage = r.usage(kit.uid(1))
    assert usage == UsageRecord(a.inc.received_at, b.inc.received_at, 0.0, 0)

    store.record_access([kit.uid(1), kit.uid(1)], when=2000.0)
    store.record_access([kit.uid(1), kit.uid(9)], when=1500.0)  # older stamp, unknown study
    assert store.ping(10)
    with store.reader() as r:
        assert r.usage(kit.uid(1)) == UsageRecord(a.inc.received_at, b.inc.received_at, 2000.0, 2)
        assert r.usage(kit.uid(2)).access_count == 0
        assert r.usage(kit.uid(9)) is None

    delete(store, a.uid)
    with store.reader() as r:
        assert r.usage(kit.uid(1)).access_count == 2
    delete(store, b.uid)
    with store.reader() as r:
        assert r.usage(kit.uid(1)) is None
        assert r.usage(kit.uid(2)) is not None
    assert kit.audit(store) == []


# ------------------------------------------------------------------ 12. locking, corruption


def test_second_store_on_the_same_directory_is_refused(store: Store, store_dir: Path) -> None:
    item = one(b"xy")
    put_all(store, [item])
    with pytest.raises(StoreLocked):
        Store(config(), store_dir)
    assert store.put_instance(one(b"zz", 2).inc) is PutOutcome.STORED
    assert store.read_instance(item.uid) == item.raw


def _overwrite_chunk(store: Store, digest: bytes, change: object) -> None:
    t = store.db.tables
    with store.db.env.begin(write=True) as txn:
        stored = txn.get(digest, db=t.chunks)
        txn.put(digest, change(stored), db=t.chunks)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
def test_altered_chunk_bytes_are_corrupt_data(store: Store, compress: bool) -> None:
    victim = one(kit.smooth(2 * CHUNK_BYTES + 100_000), 1, compress=compress)
    bystander = one(kit.smooth(100_000, 3), 2, compress=compress)
    put_all(store, [victim, bystander])
    middle = digests(victim)[1]

    def flip(stored: bytes) -> bytes:
        return stored[:50] + bytes([stored[50] ^ 0x01]) + stored[51:]

    _overwrite_chunk(store, middle, flip)
    with pytest.raises(CorruptData):
        store.read_instance(victim.uid)
    if compress:
        _overwrite_chunk(store, middle, lambda stored: stored[: len(stored) // 2])
        with pytest.raises(CorruptData):
            store.read_instance(victim.uid)
    assert store.read_instance(bystander.uid) == bystander.raw


# ------------------------------------------------------------------ 13. close


def test_close_commits_queued_writes_then_refuses(store_dir: Path) -> None:
    store = Store(config(), store_dir)
    items = [one(kit.noise(30_000, n), n) for n in range(1, 41)]
    futures = [store.submit_instance(i.inc) for i in items]
    store.close()
    assert [f.result(0) for f in futures] == [PutOutcome.STORED] * len(items)
    with pytest.raises(StoreClosed):
        store.put_instance(one(b"zz", 99).inc)
    assert store.ping(1) is False
    store.record_access([kit.uid(1)])  # not awaited: must not raise either

    reopened = Store(config(), store_dir)
    try:
        for item in items:
            assert reopened.read_instance(item.uid) == item.raw
        assert kit.audit(reopened) == []
    finally:
        reopened.close()


def test_refused_open_releases_the_directory(store_dir: Path) -> None:
    store = Store(config(), store_dir)
    with store.db.env.begin(write=True) as txn:
        txn.put(b"schema", b"99", db=store.db.tables.meta)
    store.close()
    for _ in range(2):  # the second attempt must fail the same way, not with StoreLocked
        with pytest.raises(RuntimeError, match="schema"):
            Store(config(), store_dir)


def test_close_twice_leaves_other_files_alone(store_dir: Path, tmp_path: Path) -> None:
    store = Store(config(), store_dir)
    store.close()
    # The next files opened take the descriptor numbers the store just released.
    files = [open(tmp_path / f"f{n}", "wb") for n in range(8)]  # noqa: SIM115
    try:
        store.close()
        for f in files:
            os.fstat(f.fileno())  # EBADF if close() closed a descriptor it no longer owns
    finally:
        for f in files:
            with contextlib.suppress(OSError):
                f.close()
