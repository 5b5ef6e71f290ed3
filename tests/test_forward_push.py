"""Forwarding to a peer gateway and to the central PACS, end to end: a clinic and a replica
gateway as subprocesses on loopback, Orthanc as the central PACS, DCMTK as modality and
workstation. What the replica holds is checked through its own DICOM node (C-FIND with
catalog listing off, C-GET with the clinic stopped); what the central PACS holds through
Orthanc's REST API, never through our code."""

from __future__ import annotations

import json
import time
import tomllib
import urllib.error
import urllib.request

import pytest
import tomli_w
from dcmtk import getscu, storescu
from dicomfiles import dataset_bytes, sop_instance_uid
from forward_kit import wait_until
from gateway import Gateway
from orthanc import Orthanc
from studygen import SeriesInfo
from test_forward_gateway import forward_cli, jobs

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
FAST = {"backoff_base_s": 0.5, "backoff_max_s": 4.0, "poll_s": 0.1, "quiet_period_s": 1.0,
        "push_poll_s": 0.2, "push_stall_s": 20.0, "max_tries": 1000}  # fmt: skip


def _mesh(address: str, role: str, **more) -> dict:
    return {"address": address, "role": role, "sync_interval_s": 0.3, **more}


def _central(orthanc: Orthanc) -> dict:
    return {"enabled": True, "ae_title": orthanc.ae_title, "host": orthanc.host,
            "port": orthanc.dicom_port, "connect_timeout_s": 2.0}  # fmt: skip


def _pair(
    gateway_factory,
    orthanc: Orthanc,
    rules: list[dict],
    *,
    replica_up: bool = True,
    replica_store: dict | None = None,
    forward: dict | None = None,
):
    """A replica (talks to Orthanc; its C-FIND lists only what it holds) and a clinic whose
    forwarding `rules` may name the replica as "peer:REPLICA"; both admit each other."""
    replica = gateway_factory(
        start=False,
        ae_title="REPL1",
        mesh=_mesh("127.0.0.81", "replica", list_remote_studies=False),
        central=_central(orthanc),
        store=replica_store or {},
    )
    for rule in rules:
        rule["destinations"] = [
            d.replace("REPLICA", replica.mesh_name) for d in rule["destinations"]
        ]
    clinic = gateway_factory(
        ae_title="CLINIC",
        mesh=_mesh("127.0.0.80", "clinic"),
        central=_central(orthanc),
        forward={"rules": rules, **FAST, **(forward or {})},
    )
    replica.admit(clinic, role="clinic")
    clinic.admit(replica, role="replica")
    # The running clinic reloads its registry within seconds: before, a try would fail
    # with "not admitted" rather than with what the test looks at.
    wait_until(lambda: "peer registry: 1 peer(s) admitted" in clinic.log(), 15, "admission")
    if replica_up:
        replica.start()
    return clinic, replica


def _held_by_replica(replica: Gateway, series: SeriesInfo) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in replica.find_images(series.study_uid, "")}


def _in_orthanc(orthanc: Orthanc) -> set[str]:
    return {
        orthanc.rest(f"/instances/{oid}")["MainDicomTags"]["SOPInstanceUID"]
        for oid in orthanc.rest("/instances")
    }


def _by_rule(gw: Gateway) -> dict[str, dict]:
    listed = jobs(gw)
    assert len({j["rule"] for j in listed}) == len(listed), listed  # one study job per rule
    return {j["rule"]: j for j in listed}


@pytest.mark.slow
def test_rules_forward_to_a_peer_and_to_the_central_pacs(gateway_factory, tmp_path, small_series):
    rules = [
        {"name": "ct-replica", "destinations": ["peer:REPLICA"], "modality": ["CT"],
         "level": "study"},
        {"name": "ct-central", "destinations": ["central"], "modality": ["CT"],
         "level": "study"},
        {"name": "mr-replica", "destinations": ["peer:REPLICA"], "modality": ["MR"]},
    ]  # fmt: skip
    with Orthanc(tmp_path / "pacs") as pacs:
        clinic, replica = _pair(gateway_factory, pacs, rules)
        assert _in_orthanc(pacs) == set()
        assert storescu(clinic.host, clinic.port, clinic.ae_title, small_series.paths).ok
        want = set(small_series.sop_uids)

        # Each job is done only once its destination holds every instance: checked at
        # the moment it reads done, without waiting any longer.
        def done(rule: str) -> bool:
            return _by_rule(clinic).get(rule, {}).get("state") == "done"

        wait_until(lambda: done("ct-replica"), 60, "the peer job done")
        assert _held_by_replica(replica, small_series) == want
        wait_until(lambda: done("ct-central"), 60, "the central job done")
        assert _in_orthanc(pacs) == want
        assert pacs.rest("/statistics")["CountInstances"] == len(want)

        by_rule = _by_rule(clinic)
        assert set(by_rule) == {"ct-replica", "ct-central"}  # the MR rule matched nothing
        assert by_rule["ct-replica"]["kind"] == "peer"
        assert by_rule["ct-replica"]["target"] == replica.mesh_name
        assert by_rule["ct-central"]["kind"] == "central"
        listing = forward_cli(clinic, "list")
        assert listing.returncode == 0, listing.stderr
        rows = {line.split("\t")[2] for line in listing.stdout.splitlines()}
        assert rows == {f"peer:{replica.mesh_name}", "central"}
        # The replica stored into the PACS (the clinic never talked to it).
        assert "into the central PACS: 6/6 instance(s)" in replica.log()

        # Only admitted peers may push: 127.0.0.1 is not one of them.
        body = json.dumps({"study": small_series.study_uid, "to": "here", "push": "0" * 64})
        req = urllib.request.Request(
            f"http://{replica.mesh_address}:{replica.mesh_port}/mesh/v1/forward/push",
            data=body.encode(), method="POST",
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            _NO_PROXY.open(req, timeout=10)
        assert refused.value.code == 403

    # The replica holds the bytes itself: retrieved from it with the clinic gone.
    clinic.stop()
    out = tmp_path / "got"
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={small_series.study_uid}"]
    got = getscu(replica.host, replica.port, replica.ae_title, keys, out, timeout=60)
    assert got.returncode == 0, got.stderr[-2000:]
    received = {sop_instance_uid(p): p for p in out.iterdir()}
    assert set(received) == want
    originals = {sop_instance_uid(p): p for p in small_series.paths}
    for uid, path in received.items():
        assert dataset_bytes(path) == dataset_bytes(originals[uid])
    for gw in (clinic, replica):
        assert "PHANTOM" not in gw.log() and "DCMESH-TEST" not in gw.log()


def _set(gw: Gateway, section: str, **values: object) -> None:
    """Change settings in a (stopped) gateway's config file."""
    config = tomllib.loads(gw.config_path.read_text())
    config.setdefault(section, {}).update(values)
    gw.config_path.write_text(tomli_w.dumps(config))


@pytest.mark.slow
def test_peer_down_then_refusing_then_accepting(gateway_factory, tmp_path, small_series):
    rules = [{"name": "to-replica", "destinations": ["peer:REPLICA"], "level": "study"}]
    with Orthanc(tmp_path / "pacs") as pacs:
        clinic, replica = _pair(gateway_factory, pacs, rules, replica_up=False)
        assert storescu(clinic.host, clinic.port, clinic.ae_title, small_series.paths).ok

        # Down: each try fails with the reason, and the delay before the next one doubles
        # (0.5, 1, 2, 4 s: backoff_base_s, capped at backoff_max_s).
        delays: dict[int, float] = {}

        def record() -> bool:
            (job,) = jobs(clinic)
            if job["state"] == "queued" and job["tries"] > 0:
                assert "unreachable" in job["reason"], job
                delays[job["tries"]] = round(job["not_before"] - job["updated_at"], 2)
            return len(delays) >= 3 and max(delays) >= 4

        wait_until(record, 60, "three failed tries")
        assert [delays[t] for t in sorted(delays)][:3] == [
            min(4.0, 0.5 * 2 ** (t - 1)) for t in sorted(delays)[:3]
        ], delays
        assert replica.proc is None  # never started so far

        # Up but refusing: a clear reason, still retried.
        _set(replica, "forward", accept_push=False)
        replica.start()
        wait_until(lambda: "accept_push" in jobs(clinic)[0]["reason"], 60, "refusal seen")
        (job,) = jobs(clinic)
        assert job["state"] in ("queued", "running") and "refused" in job["reason"]
        assert _held_by_replica(replica, small_series) == set()

        # Accepting: the job completes, and only then.
        replica.stop()
        _set(replica, "forward", accept_push=True)
        replica.start()
        wait_until(lambda: jobs(clinic)[0]["state"] == "done", 60, "the job done")
        assert _held_by_replica(replica, small_series) == set(small_series.sop_uids)
        assert _in_orthanc(pacs) == set()  # a peer destination never reaches the PACS


@pytest.mark.slow
def test_a_stalled_peer_fails_the_try_and_a_stop_interrupts_it(
    gateway_factory, tmp_path, small_series
):
    """The replica accepts the push but cannot store anything (its disk reserve is larger
    than any disk): no progress fails the try; a stop during a try ends it at once and the
    job runs again after the restart."""
    rules = [{"name": "to-replica", "destinations": ["peer:REPLICA"], "level": "study"}]
    with Orthanc(tmp_path / "pacs") as pacs:
        clinic, replica = _pair(
            gateway_factory, pacs, rules,
            replica_store={"min_free_bytes": 1 << 60}, forward={"push_stall_s": 2.0},
        )  # fmt: skip
        assert storescu(clinic.host, clinic.port, clinic.ae_title, small_series.paths).ok
        wait_until(lambda: "no progress for 2 s" in jobs(clinic)[0]["reason"], 60, "a stall")
        (job,) = jobs(clinic)
        assert "fetching, 0/6 held" in job["reason"], job
        assert "push from" in replica.log()
        assert _held_by_replica(replica, small_series) == set()

        clinic.stop()
        _set(clinic, "forward", push_stall_s=300.0)
        clinic.start()
        wait_until(lambda: jobs(clinic)[0]["state"] == "running", 60, "a try running")
        tries = jobs(clinic)[0]["tries"]
        started = time.monotonic()
        assert clinic.stop() == 0
        assert time.monotonic() - started < 10
        assert "interrupted by stop" in clinic.log()
        clinic.start()
        wait_until(lambda: "1 interrupted job(s) queued again" in clinic.log(), 30, "requeued")
        wait_until(lambda: jobs(clinic)[0]["tries"] > tries, 30, "the next try")
        assert jobs(clinic)[0]["state"] in ("running", "queued")


@pytest.mark.slow
def test_a_replica_stores_into_the_central_pacs_itself(gateway_factory, tmp_path, small_series):
    """On a gateway that talks to the central PACS, "central" is a direct C-STORE."""
    with Orthanc(tmp_path / "pacs") as pacs:
        rules = [{"name": "to-central", "destinations": ["central"], "level": "study"}]
        replica = gateway_factory(
            ae_title="REPL1",
            mesh=_mesh("127.0.0.82", "replica"),
            central=_central(pacs),
            forward={"rules": rules, **FAST},
        )
        assert storescu(replica.host, replica.port, replica.ae_title, small_series.paths).ok
        wait_until(lambda: jobs(replica)[0]["state"] == "done", 60, "the job done")
        assert _in_orthanc(pacs) == set(small_series.sop_uids)
        assert "push from" not in replica.log()
