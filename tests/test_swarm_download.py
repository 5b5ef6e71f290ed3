"""Swarm downloads between in-process gateways on loopback (real stores, HTTP, verification)."""

from __future__ import annotations

import asyncio

import asynckit
import meshkit
import pytest
import storekit as kit

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
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


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
