"""Eviction on real stores and catalogs (LMDB in tmp dirs): a replica filled past its limit
with studies of known usage evicts the right ones, keeps what is not held elsewhere and what
was acquired here without confirmation, keeps chunks shared with kept studies, withdraws the
evicted studies from the catalog as other gateways see it in a delta; a dry run changes
nothing; `delete_study` is a compare-and-delete.

Contract (issue 7, replica cache and eviction). Usage is set through the store's own API
(`record_access`, instances' received_at); other gateways are real stores whose catalog
entries reach the replica by a real delta pull.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import asynckit
import pytest
import storekit as kit

from appliance.evict.config import EvictConfig
from appliance.evict.core import DAY, format_plan
from appliance.evict.evictor import Evictor
from appliance.forward.core import Job, State, study_key
from appliance.mesh.catalog import Catalog
from appliance.mesh.describe import describe_study, holding
from appliance.store import Store
from appliance.store.config import StoreConfig

pytestmark = pytest.mark.timeout(60)

NOW = 1_700_000_000.0
FETCHED = ""  # instances a swarm download stores carry no calling AE
MODALITY = "CT1"
CENTRAL = "CENTRAL"
INSTANCE_BYTES = 64 * 1024


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Callable[[str], Store]]:
    opened: list[Store] = []

    def open_store(name: str) -> Store:
        store = Store(StoreConfig(min_free_bytes=0), tmp_path / name)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def items(n: int, *, instances: int = 3, payload: bytes | None = None) -> list[kit.Item]:
    """Study n's instances: `instances` x 64 KiB of noise (or `payload`)."""
    return [
        kit.build(
            sop_uid=kit.uid(n, 1, i),
            series_uid=kit.uid(n, 1),
            study_uid=kit.uid(n),
            patient_id=f"PAT-{n}",
            payload=payload if payload is not None else kit.noise(INSTANCE_BYTES, seed=n * 100 + i),
            instance_number=i + 1,
        )
        for i in range(instances)
    ]


def put(store: Store, study: list[kit.Item], *, ae: str, days_ago: float) -> str:
    """Store a study's instances as received from `ae`, `days_ago` days before NOW."""
    for item in study:
        store.put_instance(replace(item.inc, calling_ae=ae, received_at=NOW - days_ago * DAY))
    return study[0].inc.study_uid


def access(store: Store, study_uid: str, count: int, days_ago: float) -> None:
    for _ in range(count):
        store.record_access([study_uid], when=NOW - days_ago * DAY)
    assert store.ping(10)  # the (unawaited) usage updates committed


def publish_local(cat: Catalog) -> None:
    """What MeshNode publishes for the studies it holds: its desc and hold of each."""
    with cat.store.reader() as r:
        uids = [s.uid for s in r.studies()]
        changes = [
            (kind, uid, payload)
            for uid in uids
            for kind, payload in (("desc", describe_study(r, uid)), ("hold", holding(r, uid)))
        ]
    cat.publish_all(changes)


def pull(dst: Catalog, src: Catalog) -> list:
    """One catalog pull of `dst` from `src` (all pages); returns the entries received."""
    received = []
    while True:
        delta = src.delta(dst.version_vector())
        received.extend(delta.entries)
        dst.apply(delta.entries)
        if not delta.more:
            return received


def snapshot(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every table's raw keys and values."""
    t = store.db.tables
    with store.db.read() as txn:
        return {
            name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=getattr(t, name))]
            for name in t.__dataclass_fields__
        }


def study_bytes(store: Store, uid: str) -> int:
    with store.reader() as r:
        rec = r.study(uid)
        return 0 if rec is None else rec.bytes


def used(store: Store) -> int:
    return store.stats().used_bytes


class Replica:
    """A replica "rep1" with five fetched studies of known usage, one study acquired here and
    one fetched study no one else holds; "clinic-a" holds the first four."""

    def __init__(self, stores: Callable[[str], Store]) -> None:
        self.store = stores("rep1")
        self.site = stores("clinic-a")
        self.cat = Catalog(self.store, "rep1")
        self.site_cat = Catalog(self.site, "clinic-a")
        studies = {n: items(n) for n in range(1, 7)}
        self.hot = put(self.store, studies[1], ae=FETCHED, days_ago=20)
        access(self.store, self.hot, 10, days_ago=1)
        self.cool = put(self.store, studies[2], ae=FETCHED, days_ago=40)
        access(self.store, self.cool, 1, days_ago=20)
        self.cold = put(self.store, studies[3], ae=FETCHED, days_ago=30)
        self.warm = put(self.store, studies[4], ae=FETCHED, days_ago=10)
        access(self.store, self.warm, 3, days_ago=2)
        self.orphan = put(self.store, studies[5], ae=FETCHED, days_ago=60)  # lowest score
        self.acquired = put(self.store, studies[6], ae=MODALITY, days_ago=50)
        for n in (1, 2, 3, 4):
            put(self.site, studies[n], ae=FETCHED, days_ago=5)
        publish_local(self.cat)
        publish_local(self.site_cat)
        pull(self.cat, self.site_cat)
        pull(self.site_cat, self.cat)
        self.one_study = study_bytes(self.store, self.cold)

    def evictor(self, *, slack: int = 0, **kw: object) -> Evictor:
        """Limits: one and a half studies over max_bytes (two must go)."""
        cfg = EvictConfig(
            enabled=True,
            max_bytes=used(self.store) - self.one_study * 3 // 2,  # type: ignore[arg-type]
            min_free_bytes=0,  # type: ignore[arg-type]
            slack_bytes=slack,  # type: ignore[arg-type]
            min_idle_s=3600,
        )
        return Evictor(cfg, self.store, self.cat, clock=lambda: NOW, **kw)  # type: ignore[arg-type]


@pytest.fixture
def replica(stores: Callable[[str], Store]) -> Replica:
    return Replica(stores)


def held(store: Store, uid: str) -> bool:
    with store.reader() as r:
        return r.study(uid) is not None


def test_the_lowest_scores_held_elsewhere_go(replica: Replica) -> None:
    before = used(replica.store)
    evictor = replica.evictor()
    # Exact reasons for every study (a run checks only its victims exactly).
    kept = {d.uid: d.reason for d in evictor.plan(exact=True).kept}
    assert "not retrievable elsewhere" in kept[replica.orphan]
    assert "acquired here, not yet confirmed" in kept[replica.acquired]
    report = evictor.run_once()
    assert report.evicted == (replica.cold, replica.cool)
    assert report.skipped == ()
    assert report.freed_bytes == 2 * replica.one_study
    for uid in (replica.cold, replica.cool):
        assert not held(replica.store, uid)
    for uid in (replica.hot, replica.warm, replica.orphan, replica.acquired):
        assert held(replica.store, uid)
    assert kit.audit(replica.store) == []
    assert used(replica.store) <= before - 2 * len(items(3)) * INSTANCE_BYTES
    assert "held by clinic-a" in report.plan.victims[0].reason


def test_the_catalog_withdraws_evicted_studies(replica: Replica) -> None:
    replica.evictor().run_once()
    # What clinic-a reads in its next pull from rep1: our tombstones for both kinds.
    received = pull(replica.site_cat, replica.cat)
    gone = {(e.kind, e.study_uid) for e in received if e.origin == "rep1" and e.payload is None}
    assert gone == {(k, uid) for uid in (replica.cold, replica.cool) for k in ("desc", "hold")}
    view = replica.site_cat.view(replica.cold)
    assert set(view.holders) == {"clinic-a"} and view.described
    assert set(replica.site_cat.view(replica.hot).holders) == {"rep1", "clinic-a"}
    assert replica.cold not in replica.cat.held_by("rep1")
    # Publishing the same withdrawal again (MeshNode's commit listener) changes nothing.
    assert replica.cat.publish_all([("hold", replica.cold, None)]) == [None]


def test_dry_run_changes_nothing_and_says_why(replica: Replica) -> None:
    evictor = replica.evictor()
    before = snapshot(replica.store)
    plan = evictor.plan(exact=True)
    report = evictor.run_once(dry_run=True)
    assert snapshot(replica.store) == before
    assert [v.uid for v in plan.victims] == [replica.cold, replica.cool]
    assert [v.uid for v in report.plan.victims] == [replica.cold, replica.cool]
    assert report.evicted == ()
    text = format_plan(plan)
    assert text.splitlines()[1].startswith("would evict 2 studies")
    assert f"evict {replica.cold}" in text and f"keep  {replica.orphan}" in text
    assert "acquired here" in text and "not needed: score" in text
    assert report.text().splitlines()[1] == text.splitlines()[1]


def test_acquired_here_needs_a_complete_copy_of_every_instance(
    stores: Callable[[str], Store],
) -> None:
    """A site holding an older version of one instance, or fewer instances, confirms
    nothing; the central PACS (by AE title) or a full copy does."""
    store, site = stores("rep1"), stores("clinic-a")
    cat, site_cat = Catalog(store, "rep1"), Catalog(site, "clinic-a")
    replaced, partial, confirmed, from_central = (items(n) for n in (11, 12, 13, 14))
    for study in (replaced, partial, confirmed):
        put(store, study, ae=MODALITY, days_ago=30)
    put(store, from_central, ae=CENTRAL, days_ago=30)
    # clinic-a: study 11 with its last instance in another version (same UID, other bytes),
    # study 12 without its last instance, study 13 in full.
    other = kit.build(
        sop_uid=kit.uid(11, 1, 2),
        series_uid=kit.uid(11, 1),
        study_uid=kit.uid(11),
        patient_id="PAT-11",
        payload=kit.noise(INSTANCE_BYTES, seed=9999),
        instance_number=3,
    )
    put(site, [*replaced[:2], other], ae=FETCHED, days_ago=5)
    put(site, partial[:2], ae=FETCHED, days_ago=5)
    put(site, confirmed, ae=FETCHED, days_ago=5)
    publish_local(cat)
    publish_local(site_cat)
    pull(cat, site_cat)
    cfg = EvictConfig(enabled=True, max_bytes=1, min_free_bytes=0, slack_bytes=0)  # type: ignore[arg-type]
    evictor = Evictor(cfg, store, cat, central_aes=[CENTRAL], clock=lambda: NOW)
    report = evictor.run_once()
    assert set(report.evicted) == {kit.uid(13), kit.uid(14)}
    assert held(store, kit.uid(11)) and held(store, kit.uid(12))
    kept = {d.uid: d.reason for d in report.plan.kept}
    assert kept[kit.uid(11)].startswith("acquired here, not yet confirmed")
    assert kept[kit.uid(12)].startswith("acquired here, not yet confirmed")
    reasons = {v.uid: v.reason for v in report.plan.victims}
    assert reasons[kit.uid(14)].endswith("held by central PACS")
    assert reasons[kit.uid(13)].endswith("held by clinic-a")
    assert kit.audit(store) == []


def test_chunks_shared_with_a_kept_study_stay(stores: Callable[[str], Store]) -> None:
    """Two studies whose multi-chunk instances share their last chunks (same pixel data at
    the same offsets): evicting one leaves the other's bytes whole."""
    store, site = stores("rep1"), stores("clinic-a")
    cat, site_cat = Catalog(store, "rep1"), Catalog(site, "clinic-a")
    pixels = kit.noise(3 * 512 * 1024, seed=7)
    gone, stays = items(21, instances=1, payload=pixels), items(22, instances=1, payload=pixels)
    shared = {c.digest for c in gone[0].inc.manifest.chunks} & {
        c.digest for c in stays[0].inc.manifest.chunks
    }
    assert len(shared) >= 2
    put(store, gone, ae=FETCHED, days_ago=30)
    put(store, stays, ae=FETCHED, days_ago=30)
    put(site, gone, ae=FETCHED, days_ago=5)
    publish_local(cat)
    publish_local(site_cat)
    pull(cat, site_cat)
    cfg = EvictConfig(enabled=True, max_bytes=1, min_free_bytes=0, slack_bytes=0)  # type: ignore[arg-type]
    report = Evictor(cfg, store, cat, clock=lambda: NOW).run_once()
    assert report.evicted == (kit.uid(21),)
    assert store.read_instance(stays[0].uid) == stays[0].raw
    with store.reader() as r:
        for digest in shared:
            assert r.chunk(digest) is not None
        only_gone = {c.digest for c in gone[0].inc.manifest.chunks} - shared
        assert all(r.chunk(d) is None for d in only_gone)
    assert kit.audit(store) == []


def test_busy_and_recently_used_studies_stay(replica: Replica) -> None:
    replica.store.submit_download(replica.cold, b'{"of": 3}').result(10)
    access(replica.store, replica.cool, 1, days_ago=0.001)
    report = replica.evictor().run_once()
    kept = {d.uid: d.reason for d in report.plan.kept}
    assert kept[replica.cold] == "swarm download in progress"
    assert kept[replica.cool].startswith("used 86 s ago")
    assert report.evicted == (replica.warm, replica.hot)


def test_a_study_with_forwarding_pending_stays(replica: Replica) -> None:
    job = Job(
        id=study_key("to-ws1", "WS1", replica.cold), rule="to-ws1", destination="WS1",
        level="study", study_uid=replica.cold, sop_instance_uid="", state=State.QUEUED,
        created_at=NOW, not_before=NOW,
    )  # fmt: skip
    replica.store.submit_write(
        lambda ops: ops.txn.put(job.id.encode(), job.encode(), db=ops.t.fwd_jobs)
    ).result(10)
    report = replica.evictor().run_once()
    assert {d.uid: d.reason for d in report.plan.kept}[replica.cold] == "forwarding pending"
    assert report.evicted == (replica.cool, replica.warm)


def test_delete_study_is_a_compare_and_delete(replica: Replica) -> None:
    with replica.store.reader() as r:
        seen = r.usage(replica.cold)
    assert seen is not None
    access(replica.store, replica.cold, 1, days_ago=0)
    assert replica.store.delete_study(replica.cold, seen) is None
    assert held(replica.store, replica.cold)
    with replica.store.reader() as r:
        now_seen = r.usage(replica.cold)
    assert replica.store.delete_study(replica.cold, now_seen) == replica.one_study
    assert replica.store.delete_study(replica.cold) == 0  # gone already
    assert kit.audit(replica.store) == []


def test_runs_when_new_data_crosses_the_limit(replica: Replica) -> None:
    """The running evictor checks soon after commits; within limits it evicts nothing."""
    evictor = replica.evictor()
    cfg = replace(
        evictor.cfg,
        max_bytes=used(replica.store) + replica.one_study // 2,
        interval_s=3600.0,
        check_after_store_s=0.05,
    )
    evictor.apply(cfg)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await evictor.start()
        try:
            await asyncio.sleep(0.3)
            first = evictor.last_report  # the first periodic run: within limits
            assert first is not None and first.plan.victims == ()
            arrived = items(30)
            await loop.run_in_executor(
                None, lambda: put(replica.store, arrived, ae=FETCHED, days_ago=0)
            )
            for _ in range(100):
                if evictor.last_report is not first:
                    break
                await asyncio.sleep(0.05)
        finally:
            await evictor.stop()

    asynckit.run(main(), max_block_s=0.2)
    assert evictor.last_report is not None
    assert evictor.last_report.evicted == (replica.cold,)
    assert held(replica.store, kit.uid(30))


def test_control_routes_answer_the_plan_and_run(replica: Replica) -> None:
    """What `dicomesh evict` and `dicomesh evict --now` receive over the control socket."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from appliance.evict.control import evict_routes

    evictor = replica.evictor()
    before = snapshot(replica.store)

    async def main() -> tuple[dict, dict]:
        app = web.Application()
        evict_routes(evictor)(app)
        async with TestClient(TestServer(app)) as client:
            plan = await (await client.post("/evict/plan", json={})).json(content_type=None)
            assert snapshot(replica.store) == before
            run = await (await client.post("/evict/run", json={})).json(content_type=None)
        return plan, run

    plan, run = asynckit.run(main(), max_block_s=0.5)
    assert plan["dry_run"] and [v["study"] for v in plan["victims"]] == [replica.cold, replica.cool]
    assert "would evict 2 studies" in plan["text"]
    assert run["evicted"] == [replica.cold, replica.cool] and not run["dry_run"]
