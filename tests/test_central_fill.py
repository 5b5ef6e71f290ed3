"""A clinic filling a study from the central PACS through replicas, in process: real mesh
nodes and stores on loopback; each replica's central PACS is simulated by a broker stand-in
that stores the instances it is asked for one by one (as C-MOVE sub-operations would land),
so the clinic's swarm meets holders and instances that appear while it runs."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter

import asynckit
import meshkit
import storekit as kit
from aiohttp import web
from pydicom.dataset import Dataset

from appliance.central import core
from appliance.central.broker import expect
from appliance.central.config import CentralConfig
from appliance.central.relay import CentralRelay
from appliance.mesh import protocol
from appliance.mesh.describe import holding
from appliance.mesh.peers import PEERS_FILE, Peer, add_peer
from appliance.store.chunking import CHUNK_BYTES


class FakeCentral:
    """The mesh routes of a replica's broker, with a simulated central PACS behind them."""

    def __init__(self, site, items, study: str, delay_s: float, served: Counter) -> None:
        self.site, self.items, self.study = site, {i.uid: i for i in items}, study
        self.delay_s, self.served = delay_s, served
        self.listing = [core.ListedInstance(i.uid, i.inc.series_uid, kit.CT) for i in items]
        self.stopped = False
        self.last_put = 0.0
        self._wanted: set[str] = set()
        self.tasks: set[asyncio.Task] = set()

        self.finds = 0
        self.find_delay_s = 0.0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/mesh/v1/central/find", self._find)
        app.router.add_post("/mesh/v1/central/instances", self._instances)
        app.router.add_post("/mesh/v1/central/retrieve", self._retrieve)

    async def _find(self, request: web.Request) -> web.Response:
        self.finds += 1
        await asyncio.sleep(self.find_delay_s)
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = self.study
        body = {"answers": [core.to_wire(ds)]}
        return web.Response(body=protocol.encode_json(body), content_type=protocol.JSON_TYPE)

    async def _instances(self, request: web.Request) -> web.Response:
        body = {"instances": [i.to_wire() for i in self.listing]}
        return web.Response(body=protocol.encode_json(body), content_type=protocol.JSON_TYPE)

    async def _retrieve(self, request: web.Request) -> web.Response:
        study, wanted, total = core.retrieve_request_from_wire(
            protocol.decode_json(await request.read())
        )
        todo = [i.sop for i in wanted if i.sop not in self._wanted]
        self._wanted.update(todo)
        await expect(self.site.store, study, total)
        task = asyncio.ensure_future(self._put(todo))
        self.tasks.add(task)
        body = {"accepted": len(todo)}
        return web.Response(body=protocol.encode_json(body), content_type=protocol.JSON_TYPE)

    async def _put(self, sops: list[str]) -> None:
        loop = asyncio.get_running_loop()
        for sop in sops:
            await asyncio.sleep(self.delay_s)
            if self.stopped:
                return
            self.served[sop] += 1  # what the central PACS sent
            await loop.run_in_executor(None, self.site.store.put_instance, self.items[sop].inc)
            self.last_put = time.monotonic()


def _replica_peer(site) -> Peer:
    key = base64.b64encode(site.name.encode().ljust(32, b"k")[:32]).decode()
    return Peer(site.name, key, [site.address], "replica", site.port)


def _study(n: int):
    study, series = kit.uid(700), kit.uid(701)
    items = [kit.build(sop_uid=kit.uid(800 + i), series_uid=series, study_uid=study,
                       payload=kit.noise(CHUNK_BYTES // 2 + 2 * i, seed=90 + i),
                       instance_number=i)
             for i in range(n)]  # fmt: skip
    return study, items


def _setup(tmp_path, items, study, delay_s: float):
    clinic = meshkit.make_site(tmp_path, "clinic", "127.0.0.81")
    replicas = [meshkit.make_site(tmp_path, f"repl{i}", f"127.0.0.{82 + i}") for i in (1, 2)]
    for site in (clinic, *replicas):
        for other in (clinic, *replicas):
            if other is not site:
                peer = _replica_peer(other) if other in replicas else other.peer
                add_peer(site.state_dir / PEERS_FILE, peer)
    served: Counter[str] = Counter()
    fakes = [FakeCentral(r, items, study, delay_s, served) for r in replicas]
    for replica, fake in zip(replicas, fakes, strict=True):
        replica.node.add_routes(fake.routes)
    cfg = CentralConfig(enabled=True, stall_s=1.5, relay_timeout_s=2.0, find_timeout_s=2.0)
    relay = CentralRelay(cfg, clinic.node, clinic.store, broker=None)
    clinic.node.central_fetch = relay.fetch
    return clinic, replicas, fakes, relay, served


async def _until(predicate, timeout: float = 30.0) -> None:
    await asynckit.until(predicate, timeout, 0.05)


def test_clinic_swarms_replicas_while_they_fill(tmp_path):
    study, items = _study(16)
    clinic, replicas, fakes, relay, served = _setup(tmp_path, items, study, delay_s=0.25)

    async def body():
        sites = [clinic, *replicas]
        for site in sites:
            await site.node.start()
        try:
            state = clinic.node.fetch(study)
            first = None
            while not state.finished:
                if first is None and state.instances_done:
                    first = time.monotonic()
                await asyncio.sleep(0.02)
            return state, first
        finally:
            await relay.stop()
            for fake in fakes:
                fake.stopped = True
                await asyncio.gather(*fake.tasks, return_exceptions=True)
            for site in sites:
                await site.node.stop()

    try:
        state, first = asynckit.run(body(), max_block_s=0.2)
        assert state.error is None
        assert sorted(state.instances_done) == sorted(i.uid for i in items)
        for item in items:
            assert clinic.store.read_instance(item.uid) == item.raw
        # The central PACS sent each instance once, half of them to each replica.
        assert set(served) == {i.uid for i in items} and max(served.values()) == 1
        # The first instance reached the clinic while the replicas were still filling.
        assert first is not None and first < max(f.last_put for f in fakes)
        with clinic.store.reader() as r:
            assert r.downloads() == []  # held complete: no partial record left
        assert kit.audit(clinic.store) == []
    finally:
        meshkit.close(clinic, *replicas)


def test_share_of_a_replica_that_dies_goes_to_the_other(tmp_path):
    study, items = _study(10)
    clinic, replicas, fakes, relay, served = _setup(tmp_path, items, study, delay_s=0.1)
    dying = fakes[1]

    async def body():
        sites = [clinic, *replicas]
        for site in sites:
            await site.node.start()
        try:
            state = clinic.node.fetch(study)
            # The second replica dies after sending two instances of its share.
            await _until(lambda: sum(served[s] for s in dying._wanted) >= 2)
            dying.stopped = True
            await replicas[1].node.stop()
            await _until(lambda: state.finished, timeout=40)
            return state
        finally:
            await relay.stop()
            for fake in fakes:
                fake.stopped = True
                await asyncio.gather(*fake.tasks, return_exceptions=True)
            for site in (clinic, replicas[0]):
                await site.node.stop()

    try:
        state = asynckit.run(body(), max_block_s=0.2)
        assert state.error is None, state.error
        assert sorted(state.instances_done) == sorted(i.uid for i in items)
        for item in items:
            assert clinic.store.read_instance(item.uid) == item.raw
        # Only what the dead replica had (and the clinic had not yet) is asked again.
        assert max(served.values()) <= 2
    finally:
        meshkit.close(clinic, *replicas)


def test_find_asks_one_replica_and_the_others_only_when_it_is_slow(tmp_path):
    study, items = _study(1)
    clinic, replicas, fakes, relay, _served = _setup(tmp_path, items, study, delay_s=0.1)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""

    async def body():
        sites = [clinic, *replicas]
        for site in sites:
            await site.node.start()
        try:
            await _until(lambda: all(s.online for s in clinic.node.peer_state.values())
                         and len(clinic.node.peer_state) == 2)  # fmt: skip
            fast = await relay.find(query, "study")
            asked_fast = sum(f.finds for f in fakes)
            slow_one = fakes[(relay._turn + 1) % 2]  # the next first choice
            slow_one.find_delay_s = 5.0
            started = time.monotonic()
            hedged = await relay.find(query, "study")
            return fast, asked_fast, hedged, time.monotonic() - started
        finally:
            await relay.stop()
            for site in sites:
                await site.node.stop()

    try:
        fast, asked_fast, hedged, seconds = asynckit.run(body(), max_block_s=0.2)
        assert [str(ds.StudyInstanceUID) for ds in fast] == [study] and asked_fast == 1
        # The first choice is slow: after half the timeout the other one answers.
        assert [str(ds.StudyInstanceUID) for ds in hedged] == [study]
        assert 0.9 < seconds < 2.0 and sum(f.finds for f in fakes) == 3
    finally:
        meshkit.close(clinic, *replicas)


def test_a_swarm_round_of_a_filling_study_keeps_it_partial(tmp_path):
    """A round that got every described instance of a study still expecting more (from the
    central PACS) leaves its record: the holding stays partial, with the expected total."""
    study, items = _study(4)
    holder = meshkit.make_site(tmp_path, "holder", "127.0.0.91")
    getter = meshkit.make_site(tmp_path, "getter", "127.0.0.92")
    meshkit.admit(holder, getter)
    meshkit.admit(getter, holder)
    for item in items[:3]:
        holder.store.put_instance(item.inc)

    async def body():
        await holder.node.start()
        await getter.node.start()
        try:
            await expect(getter.store, study, len(items))
            await _until(lambda: getter.node.catalog.view(study).described)
            state = getter.node.swarm_fetch(study)
            await _until(lambda: state.finished)
            return state
        finally:
            await getter.node.stop()
            await holder.node.stop()

    try:
        state = asynckit.run(body(), max_block_s=0.2)
        assert state.error is None and len(state.instances_done) == 3
        with getter.store.reader() as r:
            assert r.downloads() == [study]
            size = sum(i.inc.manifest.size for i in items[:3])
            assert holding(r, study) == {"state": "partial", "instances": 3, "of": 4, "bytes": size}
    finally:
        meshkit.close(holder, getter)
