"""The I/O-free core: job records, the job state machine (a table), the backoff schedule
and rule matching. Time is always passed in."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from appliance.forward.config import ForwardConfig, ForwardRule, destination_kind


class State(enum.Enum):
    WAITING = "waiting"  # study-level: waiting for the quiet period
    QUEUED = "queued"  # due at `not_before`
    RUNNING = "running"
    HELD = "held"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Event(enum.Enum):
    STABLE = "stable"  # quiet period over
    START = "start"
    SUCCESS = "success"
    FAILURE = "failure"  # any kind: refused, rejected, timeout, failure status
    HOLD = "hold"
    RELEASE = "release"
    RETRY = "retry"  # manual
    CANCEL = "cancel"
    RESTART = "restart"  # the process restarted while the job ran
    ARRIVAL = "arrival"  # study-level: another instance of the study was stored


class Action(enum.Enum):
    TO_QUEUED = "queued"
    TO_RUNNING = "running"
    TO_DONE = "done"
    BACKOFF = "backoff"  # queued later, or failed when out of tries
    TO_HELD = "held"
    RESET = "reset"  # queued now with a fresh try count
    TO_CANCELLED = "cancelled"
    WAIT = "wait"  # (again) wait for the quiet period from now


S, E, A = State, Event, Action
# (state, event) -> action; pairs not listed are refused (InvalidTransition).
TABLE: dict[tuple[State, Event], Action] = {
    (S.WAITING, E.STABLE): A.TO_QUEUED,
    (S.WAITING, E.ARRIVAL): A.WAIT,
    (S.QUEUED, E.ARRIVAL): A.WAIT,
    (S.WAITING, E.HOLD): A.TO_HELD,
    (S.WAITING, E.CANCEL): A.TO_CANCELLED,
    (S.QUEUED, E.START): A.TO_RUNNING,
    (S.QUEUED, E.HOLD): A.TO_HELD,
    (S.QUEUED, E.CANCEL): A.TO_CANCELLED,
    (S.RUNNING, E.SUCCESS): A.TO_DONE,
    (S.RUNNING, E.FAILURE): A.BACKOFF,
    (S.RUNNING, E.RESTART): A.TO_QUEUED,
    (S.HELD, E.RELEASE): A.TO_QUEUED,
    (S.HELD, E.CANCEL): A.TO_CANCELLED,
    (S.FAILED, E.RETRY): A.RESET,
    (S.FAILED, E.CANCEL): A.TO_CANCELLED,
    (S.CANCELLED, E.RETRY): A.RESET,
}


class InvalidTransition(Exception):
    """The event does not apply to the job's state (e.g. hold a done job)."""


@dataclass(frozen=True)
class Job:
    """One forwarding job: an instance (or a whole study) to one destination."""

    id: str
    rule: str
    destination: str  # AE title of a [dicom] node
    level: str  # "instance" | "study"
    study_uid: str
    sop_instance_uid: str  # "" for study-level jobs
    state: State
    created_at: float
    not_before: float  # when it may run next (quiet period end / backoff end)
    tries: int = 0
    reason: str = ""  # last failure reason
    updated_at: float = 0.0

    def encode(self) -> bytes:
        d = asdict(self)
        d["state"] = self.state.value
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Job:
        d: dict[str, Any] = json.loads(bytes(raw))
        d["state"] = State(d["state"])
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["kind"], d["target"] = destination_kind(self.destination)
        return d


def backoff_delay(tries: int, base_s: float, max_s: float) -> float:
    """Delay after the `tries`-th failed try: base, 2*base, 4*base... capped at max_s."""
    return min(max_s, base_s * (2 ** max(0, tries - 1)))


def transition(job: Job, event: Event, now: float, cfg: ForwardConfig, reason: str = "") -> Job:
    """The job after `event` at time `now`; raises InvalidTransition."""
    action = TABLE.get((job.state, event))
    if action is None:
        raise InvalidTransition(f"job {job.id}: cannot {event.value} when {job.state.value}")
    j = replace(job, updated_at=now)
    if action is A.TO_QUEUED:
        return replace(j, state=S.QUEUED, not_before=now)
    if action is A.TO_RUNNING:
        return replace(j, state=S.RUNNING, tries=job.tries + 1)
    if action is A.TO_DONE:
        return replace(j, state=S.DONE, reason="")
    if action is A.BACKOFF:
        if job.tries >= cfg.max_tries:
            return replace(j, state=S.FAILED, reason=reason)
        delay = backoff_delay(job.tries, cfg.backoff_base_s, cfg.backoff_max_s)
        return replace(j, state=S.QUEUED, reason=reason, not_before=now + delay)
    if action is A.WAIT:
        # DICOM has no end-of-study signal: every new instance restarts the quiet period.
        return replace(j, state=S.WAITING, not_before=now + cfg.quiet_period_s)
    if action is A.TO_HELD:
        return replace(j, state=S.HELD)
    if action is A.RESET:
        return replace(j, state=S.QUEUED, tries=0, not_before=now)
    return replace(j, state=S.CANCELLED)


@dataclass(frozen=True)
class StoredInstance:
    """What the forwarder needs of an instance the store has made durable."""

    sop_instance_uid: str
    study_uid: str
    calling_ae: str
    attrs: dict[str, Any]  # indexed attributes of all levels, keyword -> value


def rule_matches(rule: ForwardRule, inst: StoredInstance) -> bool:
    """All given criteria must match (case-insensitive for AE titles and modality)."""
    if rule.calling_ae and inst.calling_ae.strip().upper() not in {
        a.strip().upper() for a in rule.calling_ae
    }:
        return False
    if rule.modality:
        wanted = {m.strip().upper() for m in rule.modality}
        have = inst.attrs.get("Modality", "")
        values = have if isinstance(have, (list, tuple)) else [have]
        # ModalitiesInStudy at study level may be multi-valued.
        values = [*values, *_as_list(inst.attrs.get("ModalitiesInStudy"))]
        if not wanted & {str(v).strip().upper() for v in values}:
            return False
    for item in rule.attributes:
        key, _, value = item.partition("=")
        have = inst.attrs.get(key.strip())
        if have is None or value.strip() not in {str(v).strip() for v in _as_list(have)}:
            return False
    return True


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def study_key(rule: str, destination: str, study_uid: str) -> str:
    """Stable id of a study-level job: one pending job per (rule, destination, study)."""
    return f"s\x1f{rule}\x1f{destination}\x1f{study_uid}"


def instance_key(rule: str, destination: str, sop_uid: str) -> str:
    """Stable id of an instance-level job: a re-sent instance does not queue a second job
    while the first is pending."""
    return f"i\x1f{rule}\x1f{destination}\x1f{sop_uid}"
