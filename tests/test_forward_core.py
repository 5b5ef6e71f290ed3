"""The I/O-free core: the state table cell by cell, the backoff schedule, rule matching."""

from __future__ import annotations

import pytest

from appliance.forward.config import ForwardConfig, ForwardRule
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
