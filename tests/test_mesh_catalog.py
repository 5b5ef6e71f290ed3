"""Gateways on loopback share a catalog: a study stored at one is found at the others by
C-FIND (through a chain, i.e. transitively), and withdrawn studies disappear."""

from __future__ import annotations

import time

import pytest
from dcmtk import findscu, storescu
from nodekit import wait_until


def _study_uids(gw) -> set[str]:
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "NumberOfStudyRelatedInstances"]
    found = findscu(gw.host, gw.port, gw.ae_title, keys)
    return {str(ds.StudyInstanceUID) for ds in found}


@pytest.mark.slow
def test_catalog_reaches_every_gateway_through_a_chain(gateway_factory, small_series):
    # A - B - C: C never talks to A, yet learns A's study through B.
    mesh = {"sync_interval_s": 0.3}
    a = gateway_factory(start=False, mesh={**mesh, "address": "127.0.0.21"})
    b = gateway_factory(start=False, mesh={**mesh, "address": "127.0.0.22"})
    c = gateway_factory(start=False, mesh={**mesh, "address": "127.0.0.23"})
    for x, y in ((a, b), (b, a), (b, c), (c, b)):
        x.admit(y)
    for gw in (a, b, c):
        gw.start()
    run = storescu(a.host, a.port, a.ae_title, small_series.paths)
    assert run.ok
    started = time.monotonic()
    wait_until(lambda: small_series.study_uid in _study_uids(c), timeout=20,
               what="study known at C")  # fmt: skip
    assert time.monotonic() - started < 20
    images = c.find_images(small_series.study_uid, small_series.series_uid)
    assert sorted(str(ds.SOPInstanceUID) for ds in images) == sorted(small_series.sop_uids)


@pytest.mark.slow
def test_unknown_gateway_learns_nothing(gateway_factory, small_series):
    mesh = {"sync_interval_s": 0.3}
    a = gateway_factory(start=False, mesh={**mesh, "address": "127.0.0.31"})
    stranger = gateway_factory(start=False, mesh={**mesh, "address": "127.0.0.32"})
    stranger.admit(a)  # the stranger trusts A, but A never admitted the stranger
    a.start()
    stranger.start()
    assert storescu(a.host, a.port, a.ae_title, small_series.paths).ok
    wait_until(lambda: "refused (403)" in a.log(), timeout=10, what="A refusing the stranger")
    assert small_series.study_uid not in _study_uids(stranger)
