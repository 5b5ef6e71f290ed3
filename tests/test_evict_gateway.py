"""Eviction through running gateways: a clinic acquires a study (storescu), a replica fetches
it from the mesh (`dicomesh fetch`); `dicomesh evict` at each shows who may drop it and why,
the replica evicts, and the clinic's catalog sees the replica's copy withdrawn."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable

import pytest
from dcmtk import storescu
from gateway import DICOMESH, REPO, Gateway
from nodekit import wait_until
from studygen import SeriesInfo

# A byte limit any study crosses; no periodic runs during the test (the CLI drives it).
EVICT = {"enabled": False, "max_bytes": 1, "min_free_bytes": 0, "slack_bytes": 0,
         "min_idle_s": 0}  # fmt: skip


def evict(gw: Gateway, *args: str) -> dict:
    run = subprocess.run(
        [*DICOMESH, "evict", "--config", str(gw.config_path), "--json", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def reason(plan: dict, study: str) -> str:
    return next(k["reason"] for k in plan["kept"] if k["study"] == study)


@pytest.mark.slow
def test_replica_evicts_what_the_clinic_holds_and_the_clinic_keeps_its_own(
    gateway_factory: Callable[..., Gateway], small_series: SeriesInfo
) -> None:
    mesh = {"sync_interval_s": 0.3}
    clinic = gateway_factory(
        start=False, evict=EVICT, mesh={**mesh, "address": "127.0.0.61", "name": "a-clinic"}
    )
    replica = gateway_factory(
        start=False, evict=EVICT, mesh={**mesh, "address": "127.0.0.62", "name": "b-replica"}
    )
    clinic.admit(replica)
    replica.admit(clinic)
    clinic.start()
    replica.start()
    study = small_series.study_uid
    assert storescu(clinic.host, clinic.port, clinic.ae_title, small_series.paths).ok
    wait_until(lambda: replica.find_images(study, small_series.series_uid), timeout=20,
               what="the replica knows the study")  # fmt: skip
    fetch = subprocess.run(
        [*DICOMESH, "fetch", "--config", str(replica.config_path), study],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert fetch.returncode == 0, fetch.stderr

    # The clinic sees the replica's complete copy, but may not rely on it (named after it).
    wait_until(lambda: "b-replica not counted" in reason(evict(clinic), study), timeout=20,
               what="the clinic sees the replica's copy")  # fmt: skip
    assert evict(clinic)["victims"] == []
    # The replica may rely on the clinic's copy: the dry run says so and changes nothing.
    dry = evict(replica)
    assert [v["study"] for v in dry["victims"]] == [study]
    again = evict(replica)
    assert [v["study"] for v in again["victims"]] == [study]
    assert again["used_bytes"] == dry["used_bytes"]

    done = evict(replica, "--now")
    assert [v["study"] for v in done["victims"]] == [study]
    assert evict(replica)["kept"] == [] and evict(replica)["used_bytes"] < dry["used_bytes"]
    # The clinic's catalog drops the replica as a holder (its reason loses the mention),
    # and the clinic still has every instance.
    wait_until(lambda: "not counted" not in reason(evict(clinic), study), timeout=20,
               what="the clinic sees the eviction")  # fmt: skip
    assert len(clinic.find_images(study, small_series.series_uid)) == len(small_series.paths)
