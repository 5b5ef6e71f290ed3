"""The I/O-free core: the state table cell by cell, the backoff schedule, rule matching."""

from __future__ import annotations

import asyncio

import pytest

from appliance.config import ConfigError, load_config
from appliance.dicom.config import DicomConfig, DicomNode
from appliance.forward.config import ForwardConfig, ForwardRule, destination_kind
from appliance.forward.core import (
    TABLE,
    Event,
    InvalidTransition,
    Job,
    State,
    StoredInstance,
    backoff_delay,
    rule_matches,
    transition,
)
from appliance.forward.push import (
    MAX_PUSHES,
    MAX_REMEMBERED,
    PushReceiver,
    PushRequest,
    StallWatch,
    _Push,
    parse_request,
    push_id,
)
from appliance.mesh.errors import PeerInputError
from appliance.mesh.peers import Peer

CFG = ForwardConfig(max_tries=3, backoff_base_s=2.0, backoff_max_s=10.0, quiet_period_s=5.0)


def job(state: State, tries: int = 0) -> Job:
    return Job("j", "r", "DEST", "instance", "1.2", "1.2.3", state, 0.0, 0.0, tries)


# (state, event) -> (new state, not_before, tries) for a job at tries=1, time 100.
EXPECTED = {
    (State.WAITING, Event.STABLE): (State.QUEUED, 100.0, 1),
    (State.WAITING, Event.ARRIVAL): (State.WAITING, 105.0, 1),
    (State.QUEUED, Event.ARRIVAL): (State.WAITING, 105.0, 1),
    (State.WAITING, Event.HOLD): (State.HELD, 0.0, 1),
    (State.WAITING, Event.CANCEL): (State.CANCELLED, 0.0, 1),
    (State.QUEUED, Event.START): (State.RUNNING, 0.0, 2),
    (State.QUEUED, Event.HOLD): (State.HELD, 0.0, 1),
    (State.QUEUED, Event.CANCEL): (State.CANCELLED, 0.0, 1),
    (State.RUNNING, Event.SUCCESS): (State.DONE, 0.0, 1),
    (State.RUNNING, Event.FAILURE): (State.QUEUED, 102.0, 1),
    (State.RUNNING, Event.RESTART): (State.QUEUED, 100.0, 1),
    (State.HELD, Event.RELEASE): (State.QUEUED, 100.0, 1),
    (State.HELD, Event.CANCEL): (State.CANCELLED, 0.0, 1),
    (State.FAILED, Event.RETRY): (State.QUEUED, 100.0, 0),
    (State.FAILED, Event.CANCEL): (State.CANCELLED, 0.0, 1),
    (State.CANCELLED, Event.RETRY): (State.QUEUED, 100.0, 0),
}


def test_every_table_cell_is_tested() -> None:
    assert set(EXPECTED) == set(TABLE)


@pytest.mark.parametrize("cell", sorted(EXPECTED, key=lambda c: (c[0].value, c[1].value)))
def test_cell(cell: tuple[State, Event]) -> None:
    state, event = cell
    new = transition(job(state, tries=1), event, 100.0, CFG, "why")
    assert (new.state, new.not_before, new.tries) == EXPECTED[cell]
    assert new.updated_at == 100.0


@pytest.mark.parametrize("state", list(State))
def test_other_events_are_refused(state: State) -> None:
    for event in Event:
        if (state, event) not in TABLE:
            with pytest.raises(InvalidTransition):
                transition(job(state), event, 1.0, CFG)


def test_backoff_doubles_up_to_cap() -> None:
    assert [backoff_delay(n, 2.0, 10.0) for n in range(1, 6)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_failures_back_off_then_fail_with_reason() -> None:
    """A fake clock walks a job through max_tries failures."""
    now, j, delays = 0.0, job(State.QUEUED), []
    while j.state is State.QUEUED:
        now = max(now, j.not_before)
        j = transition(j, Event.START, now, CFG)
        j = transition(j, Event.FAILURE, now, CFG, "connection refused")
        delays.append(j.not_before - now)
    assert j.state is State.FAILED and j.reason == "connection refused" and j.tries == 3
    assert delays == [2.0, 4.0, 0.0]  # the last entry: failed, no further schedule


def test_encode_roundtrip() -> None:
    j = job(State.HELD, 2)
    assert Job.decode(j.encode()) == j


def inst(**attrs: object) -> StoredInstance:
    return StoredInstance("1.2.3", "1.2", "SCANNER1", {"Modality": "CT", **attrs})


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (ForwardRule("a", ["D"]), True),
        (ForwardRule("a", ["D"], calling_ae=["scanner1 "]), True),
        (ForwardRule("a", ["D"], calling_ae=["OTHER"]), False),
        (ForwardRule("a", ["D"], modality=["MR", "ct"]), True),
        (ForwardRule("a", ["D"], modality=["MR"]), False),
        (ForwardRule("a", ["D"], attributes=["StationName=ST1"]), True),
        (ForwardRule("a", ["D"], attributes=["StationName=ST2"]), False),
        (ForwardRule("a", ["D"], attributes=["BodyPartExamined=HEAD"]), False),
        (ForwardRule("a", ["D"], calling_ae=["SCANNER1"], modality=["MR"]), False),
    ],
)
def test_rule_matching(rule: ForwardRule, expected: bool) -> None:
    assert rule_matches(rule, inst(StationName="ST1")) is expected


def test_config_validation() -> None:
    from appliance.forward.config import check_destinations
    from appliance.schema import ConfigError, load

    with pytest.raises(ConfigError) as info:
        load(ForwardConfig, {"rules": [{"name": "a", "destinations": ["X"]},
                                       {"name": "a", "destinations": ["X"],
                                        "attributes": ["nokey"]}]})  # fmt: skip
    text = str(info.value)
    assert "rules[1].name" in text and "rules[1].attributes[0]" in text
    cfg = load(ForwardConfig, {"rules": [{"name": "a", "destinations": ["PACS", "X"]}]})
    assert check_destinations(cfg, ["PACS "]) == [
        ("forward.rules[0].destinations[1]", "'X' is not in [[dicom.nodes]]")
    ]


# -- destinations over the mesh ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("WS1", ("dicom", "WS1")),
        (" dicom:WS1 ", ("dicom", "WS1")),
        ("peer:replica-1", ("peer", "replica-1")),
        ("central", ("central", "")),
        ("CENTRAL", ("dicom", "CENTRAL")),  # an AE title; the keyword is lower case
        ("dicom:central", ("dicom", "central")),
        ("other:x", ("dicom", "other:x")),
    ],
)
def test_destination_kind(given: str, expected: tuple[str, str]) -> None:
    assert destination_kind(given) == expected
    assert (
        Job("j", "r", given, "study", "1.2", "", State.QUEUED, 0.0, 0.0).to_json()["kind"]
        == expected[0]
    )


def _errors(**sections: object) -> list[str]:
    try:
        load_config(None, overrides=sections)
    except ConfigError as exc:
        return list(exc.errors)
    return []


def test_config_checks_every_destination_kind() -> None:
    node = {"nodes": [{"ae_title": "WS1", "host": "127.0.0.1", "port": 11113}]}

    def rule(*destinations: str) -> dict:
        return {"rules": [{"name": "r", "destinations": list(destinations)}]}

    (error,) = _errors(dicom=node, forward=rule("WS1", "peer:Bad_Name"))
    assert error.startswith("forward.rules[0].destinations[1]: 'peer:Bad_Name'") and "a-z" in error
    errors = _errors(dicom=node, forward=rule("WS1", "peer:ok-1", "central", "dicom:WS2"))
    assert errors == [
        'forward.rules[0].destinations[2]: "central" needs [central] enabled',
        "forward.rules[0].destinations[3]: 'WS2' is not in [[dicom.nodes]]",
    ], errors
    # With [central] on and the mesh off, the mesh kinds have nothing to go over.
    errors = _errors(dicom=node, forward=rule("peer:ok-1", "WS1"), mesh={"enabled": False})
    assert errors == ["forward.rules[0].destinations[0]: 'peer:ok-1' needs [mesh] enabled"]
    good = rule("WS1", "dicom:WS1", "peer:ok-1", "central")
    assert _errors(dicom=node, forward=good, central={"enabled": True}) == []


def test_push_requests_are_checked() -> None:
    instances = {"1.2.3.4": "ab" * 32}
    pid = push_id("1.2.3", "here", instances)
    req = parse_request({"study": "1.2.3", "to": "here", "push": pid, "instances": instances})
    assert req.instances == instances
    assert parse_request({"study": "1.2.3", "to": "central", "push": pid}).instances is None
    bad = [
        [],
        {"study": "1.2 3", "to": "here", "push": pid},
        {"study": "1.2.3", "to": "elsewhere", "push": pid},
        {"study": "1.2.3", "to": "here", "push": "12"},
        {"study": "1.2.3", "to": "here", "push": pid, "instances": {}},
        {"study": "1.2.3", "to": "here", "push": pid, "instances": {"1.2": "zz"}},
        {"study": "1.2.3", "to": "here", "push": pid, "instances": {"1 2": "ab" * 32}},
        # The id must be the content's: another study under the same id is refused.
        {"study": "1.2.4", "to": "here", "push": pid, "instances": instances},
    ]
    for body in bad:
        with pytest.raises(PeerInputError):
            parse_request(body)
    assert push_id("1.2.3", "central", instances) != pid


def test_stall_watch() -> None:
    watch = StallWatch(10.0)
    assert not watch.stalled(("fetching", 0), 0.0)
    assert not watch.stalled(("fetching", 0), 10.0)
    assert watch.stalled(("fetching", 0), 10.5)
    assert not watch.stalled(("fetching", 1), 11.0)  # progress restarts the clock
    assert not watch.stalled(("fetching", 1), 20.0)
    assert watch.stalled(("fetching", 1), 21.5)


def test_push_receiver_refuses_and_forgets() -> None:
    """What a receiver answers before touching its store, and how much it remembers."""
    peer = Peer("clinic-a", "a" * 43 + "=", ["10.90.1.1"])
    instances = {"1.2.3.4": "ab" * 32}
    pid = push_id("1.2.3", "central", instances)
    full = PushRequest("1.2.3", "central", pid, instances)

    def answer(receiver: PushReceiver, req: PushRequest) -> dict:
        return asyncio.run(receiver.answer(peer, req))

    closed = PushReceiver(ForwardConfig(accept_push=False), None, None, DicomConfig(), None)  # type: ignore[arg-type]
    got = answer(closed, full)
    assert got["state"] == "refused" and "accept_push" in got["reason"]
    clinic = PushReceiver(ForwardConfig(), None, None, DicomConfig(), None)  # type: ignore[arg-type]
    got = answer(clinic, full)
    assert got["state"] == "refused" and "central PACS" in got["reason"]
    central = DicomNode("PACS", "127.0.0.1", 104)
    replica = PushReceiver(ForwardConfig(), None, None, DicomConfig(), central)  # type: ignore[arg-type]
    assert answer(replica, PushRequest("1.2.3", "central", pid, None))["state"] == "unknown"

    # At most MAX_PUSHES pushes and MAX_REMEMBERED instances, least recent forgotten first.
    for i in range(MAX_PUSHES + 10):
        replica._remember(f"{i:064x}", _Push("1.2.3", "here", {"1.2": b""}, "clinic-a"))
    assert len(replica._pushes) == MAX_PUSHES and f"{0:064x}" not in replica._pushes
    big = {f"1.2.{n}": b"" for n in range(MAX_REMEMBERED // 2 + 1)}
    replica._remember("a" * 64, _Push("1.2.3", "here", big, "clinic-a"))
    replica._remember("b" * 64, _Push("1.2.3", "here", big, "clinic-a"))
    assert list(replica._pushes) == ["b" * 64]
    asyncio.run(replica.stop())
    for r in (closed, clinic):
        asyncio.run(r.stop())
