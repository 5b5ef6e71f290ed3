"""The forwarding queue end to end: a real Store on a tmp dir, a real pynetdicom C-STORE SCP
process as destination on a free loopback port, short backoff settings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from forward_kit import destination, instance, received, wait_until
from procs import free_port

from appliance.dicom.config import DicomConfig, DicomNode
from appliance.forward.config import ForwardConfig, ForwardRule
from appliance.forward.core import InvalidTransition, State
from appliance.forward.forwarder import Forwarder
from appliance.forward.sender import dicom_destinations
from appliance.store import Store
from appliance.store.config import StoreConfig
from appliance.store.errors import StoreError
from appliance.store.index import PutOutcome, WriteOps

FAST = dict(backoff_base_s=0.2, backoff_max_s=1.0, poll_s=0.05, quiet_period_s=0.5)


def dicom_cfg(port: int) -> DicomConfig:
    return DicomConfig(
        ae_title="GATEWAY",
        acse_timeout_s=2.0,
        dimse_timeout_s=5.0,
        network_timeout_s=5.0,
        nodes=[DicomNode("DEST", "127.0.0.1", port)],
    )


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(StoreConfig(min_free_bytes=0), tmp_path / "store")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def make(store: Store, port: int) -> Iterator[Callable[..., Forwarder]]:
    made: list[Forwarder] = []

    def factory(rules: list[ForwardRule], **kw: object) -> Forwarder:
        cfg = ForwardConfig(rules=rules, **{**FAST, **kw})  # type: ignore[arg-type]
        fw = Forwarder(store, cfg, dicom_destinations(dicom_cfg(port)))
        fw.attach()
        fw.start()
        made.append(fw)
        return fw

    yield factory
    for fw in made:
        fw.stop()


def ingest(store: Store, fw: Forwarder, study: str, **kw: str) -> str:
    """What the C-STORE handler does: one durable commit (the forwarder's hook queues the
    jobs in it)."""
    _raw, inc = instance(study, **kw)
    store.put_instance(inc)
    return inc.manifest.sop_instance_uid


def states(fw: Forwarder) -> list[State]:
    return [j.state for j in fw.jobs()]


def test_rules_route_and_send_bytes_unchanged(store: Store, make, port: int, tmp_path: Path):
    out = tmp_path / "rx"
    fw = make([ForwardRule("ct", ["DEST"], modality=["CT"])])
    with destination(port, out):
        ct = ingest(store, fw, "1.2.826.0.1.1", modality="CT")
        ingest(store, fw, "1.2.826.0.1.2", modality="MR")  # no rule: not forwarded
        wait_until(lambda: states(fw) == [State.DONE], 20, "CT job done")
    assert received(out) == [ct]
    assert len(fw.jobs()) == 1


def test_destination_down_then_up(store: Store, make, port: int, tmp_path: Path):
    out = tmp_path / "rx"
    fw = make([ForwardRule("all", ["DEST"])], max_tries=50)
    uids = [ingest(store, fw, "1.2.826.0.2") for _ in range(3)]
    # Down: connection refused -> retried with growing delays.
    wait_until(lambda: all(j.tries >= 3 for j in fw.jobs()), 20, "3 tries each")
    job = fw.jobs()[0]
    assert job.state in (State.QUEUED, State.RUNNING) and "no association" in job.reason
    assert job.not_before - job.updated_at >= 0.2 * 2 ** (job.tries - 1) - 1e-6 or (
        job.state is State.RUNNING
    )
    with destination(port, out):
        wait_until(lambda: states(fw) == [State.DONE] * 3, 20, "all done")
    assert sorted(received(out)) == sorted(uids)


def test_failure_status_then_max_tries_then_manual_retry(
    store: Store, make, port: int, tmp_path: Path
):
    out = tmp_path / "rx"
    fw = make([ForwardRule("all", ["DEST"])], max_tries=2)
    with destination(port, out, status=0xA700):
        uid = ingest(store, fw, "1.2.826.0.3")
        wait_until(lambda: states(fw) == [State.FAILED], 20, "failed")
    job = fw.jobs()[0]
    assert job.tries == 2 and job.reason == "C-STORE status 0xA700"
    with destination(port, out):
        fw.retry(job.id)
        wait_until(lambda: states(fw) == [State.DONE], 20, "done after retry")
    assert received(out) == [uid]


def test_hold_release_cancel(store: Store, make, port: int, tmp_path: Path):
    out = tmp_path / "rx"
    # A long quiet period keeps the study jobs WAITING while the test acts on them.
    fw = make([ForwardRule("st", ["DEST"], level="study")], quiet_period_s=0.3)
    a = ingest(store, fw, "1.2.826.0.4.1")
    ingest(store, fw, "1.2.826.0.4.2")
    wait_until(lambda: len(fw.jobs()) == 2, 10, "two study jobs")
    ja, jb = sorted(fw.jobs(), key=lambda j: j.study_uid)
    fw.hold(ja.id)
    fw.cancel(jb.id)
    with pytest.raises(InvalidTransition):
        fw.release(jb.id)
    with pytest.raises(KeyError):
        fw.hold("nope")
    with destination(port, out):
        time.sleep(1.0)  # held/cancelled jobs must not run although their quiet period ended
        assert received(out) == []
        assert [fw.queue.get(ja.id).state, fw.queue.get(jb.id).state] == [  # type: ignore[union-attr]
            State.HELD,
            State.CANCELLED,
        ]
        fw.release(ja.id)
        wait_until(lambda: fw.queue.get(ja.id).state is State.DONE, 20, "released job done")  # type: ignore[union-attr]
    assert received(out) == [a]


def test_study_waits_for_quiet_period(store: Store, make, port: int, tmp_path: Path):
    out = tmp_path / "rx"
    fw = make([ForwardRule("st", ["DEST"], level="study")], quiet_period_s=1.0)
    with destination(port, out):
        t0 = time.monotonic()
        uids = []
        for _ in range(4):  # one instance every 0.3 s: never quiet for 1 s
            uids.append(ingest(store, fw, "1.2.826.0.5"))
            time.sleep(0.3)
            assert states(fw) == [State.WAITING]
        wait_until(lambda: states(fw) == [State.DONE], 20, "study sent")
        elapsed = time.monotonic() - t0
    assert elapsed >= 0.9 + 1.0 - 0.05  # last instance at ~0.9 s, then 1 s quiet
    assert sorted(received(out)) == sorted(uids)  # one association, the whole study
    assert len(fw.jobs()) == 1


def test_jobs_are_durable_with_the_instance(store: Store, make, port: int, tmp_path: Path):
    """The instance and its jobs share one commit: once put_instance returns (the C-STORE
    answer), the jobs are on disk, and a re-send queues nothing twice."""
    out = tmp_path / "rx"
    fw = make([ForwardRule("all", ["DEST"])], poll_s=30.0)
    _raw, inc = instance("1.2.826.0.6")
    with destination(port, out):
        assert store.put_instance(inc) is not PutOutcome.DUPLICATE
        assert [j.sop_instance_uid for j in fw.jobs()] == [inc.manifest.sop_instance_uid]
        # Poll is 30 s: only the commit listener's wake-up can make this in time.
        wait_until(lambda: states(fw) == [State.DONE], 20, "done")
    assert received(out) == [inc.manifest.sop_instance_uid]
    assert store.put_instance(inc) is PutOutcome.DUPLICATE
    assert len(fw.jobs()) == 1


def test_a_failing_hook_refuses_the_instance(store: Store, make) -> None:
    """Nothing is acknowledged whose jobs could not be written."""
    fw = make([ForwardRule("all", ["DEST"])])

    def broken(ops: WriteOps, inc: object) -> None:
        raise RuntimeError("disk said no")

    store.add_instance_hook(broken)
    _raw, inc = instance("1.2.826.0.7")
    with pytest.raises(StoreError):
        store.put_instance(inc)
    assert fw.jobs() == []
    with store.reader() as r:
        assert r.instance(inc.manifest.sop_instance_uid) is None
