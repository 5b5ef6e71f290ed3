"""The durable job queue: jobs live in the store's LMDB environment (table `fwd_jobs`) and
every change goes through the store's single writer thread (one durable commit each).

Job ids are `<kind>\\x1f<rule>\\x1f<destination>\\x1f<uid>\\x1f<generation>`: keys sort by
(rule, destination, uid), so finding the pending job of a study is a short prefix scan
inside the same write transaction that updates it (no lost update against the worker)."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable

from appliance.forward.config import ForwardConfig, ForwardRule
from appliance.forward.core import (
    Event,
    InvalidTransition,
    Job,
    State,
    StoredInstance,
    instance_key,
    study_key,
    transition,
)
from appliance.store import Store
from appliance.store.index import WriteOps

log = logging.getLogger(__name__)

_PENDING = {State.WAITING, State.QUEUED, State.HELD, State.RUNNING}


class JobQueue:
    """Thread-safe façade; writes return futures (durable once they resolve)."""

    def __init__(self, store: Store, cfg: ForwardConfig) -> None:
        self.store = store
        self.cfg = cfg

    # -- reads ------------------------------------------------------------------------------

    def jobs(self, state: State | None = None) -> list[Job]:
        """All jobs (optionally in one state), oldest key first."""
        with self.store.db.read() as txn:
            out = [Job.decode(v) for _k, v in txn.cursor(db=self.store.db.tables.fwd_jobs)]
        return [j for j in out if state is None or j.state is state]

    def get(self, job_id: str) -> Job | None:
        with self.store.db.read() as txn:
            raw = txn.get(job_id.encode(), db=self.store.db.tables.fwd_jobs)
            return None if raw is None else Job.decode(raw)

    # -- writes -----------------------------------------------------------------------------

    def submit_enqueue(
        self, inst: StoredInstance, rules: list[ForwardRule], now: float
    ) -> concurrent.futures.Future:
        """Queue jobs for a newly stored instance (never blocks). Future -> ids touched."""
        return self.store.submit_write(lambda ops: self.enqueue_ops(ops, inst, rules, now))

    def enqueue_ops(
        self, ops: WriteOps, inst: StoredInstance, rules: list[ForwardRule], now: float
    ) -> list[str]:
        """Queue jobs inside an open write transaction (so they can share the instance's own
        commit); returns the ids touched."""
        touched: list[str] = []
        for rule in rules:
            for dest in rule.destinations:
                dest = dest.strip()
                if rule.level == "study":
                    key = study_key(rule.name, dest, inst.study_uid)
                else:
                    key = instance_key(rule.name, dest, inst.sop_instance_uid)
                touched.append(_merge(ops, key, rule, dest, inst, now, self.cfg))
        return touched

    def submit_event(
        self, job_id: str, event: Event, now: float, reason: str = ""
    ) -> concurrent.futures.Future:
        """Apply `event` to a job in one commit. Future -> new Job, or the refusal
        (InvalidTransition, KeyError for an unknown id) as a value: the writer would turn a
        raised exception into a StoreError. See `apply_event` for the blocking form."""
        cfg = self.cfg

        def apply(ops: WriteOps) -> Job | InvalidTransition | KeyError:
            job = _get(ops, job_id)
            if job is None:
                return KeyError(job_id)
            try:
                new = transition(job, event, now, cfg, reason)
            except InvalidTransition as exc:
                return exc
            _put(ops, new)
            return new

        return self.store.submit_write(apply)

    def apply_event(
        self, job_id: str, event: Event, now: float, reason: str = "", timeout: float = 30.0
    ) -> Job:
        """Thread side of submit_event: the durable new Job; raises InvalidTransition or
        KeyError."""
        result = self.submit_event(job_id, event, now, reason).result(timeout)
        if isinstance(result, Exception):
            raise result
        return result

    def submit_update(self, fn: Callable[[Job], Job | None]) -> concurrent.futures.Future:
        """Rewrite every job through `fn` (None = unchanged) in one commit. Future -> count."""

        def apply(ops: WriteOps) -> int:
            t = ops.t.fwd_jobs
            changed = [fn(Job.decode(v)) for _k, v in ops.txn.cursor(db=t)]
            for job in changed:
                if job is not None:
                    _put(ops, job)
            return sum(1 for j in changed if j is not None)

        return self.store.submit_write(apply)


def _get(ops: WriteOps, job_id: str) -> Job | None:
    raw = ops.txn.get(job_id.encode(), db=ops.t.fwd_jobs)
    return None if raw is None else Job.decode(raw)


def _put(ops: WriteOps, job: Job) -> None:
    ops.txn.put(job.id.encode(), job.encode(), db=ops.t.fwd_jobs)


def _merge(
    ops: WriteOps,
    key: str,
    rule: ForwardRule,
    dest: str,
    inst: StoredInstance,
    now: float,
    cfg: ForwardConfig,
) -> str:
    """Create or extend the pending job under `key`; returns its id."""
    prefix = (key + "\x1f").encode()
    gens: list[Job] = []
    cur = ops.txn.cursor(db=ops.t.fwd_jobs)
    if cur.set_range(prefix):
        for k, v in cur:
            if not bytes(k).startswith(prefix):
                break
            gens.append(Job.decode(v))
    study = rule.level == "study"
    for job in gens:
        if job.state not in _PENDING:
            continue
        if not study:
            return job.id  # already queued: a re-sent instance is not sent twice
        if job.state in (State.WAITING, State.QUEUED):
            _put(ops, transition(job, Event.ARRIVAL, now, cfg))
            return job.id
        if job.state is State.HELD:
            return job.id  # released later, it sends the whole study as it is then
        # RUNNING: the running send may miss this instance; a new generation follows it.
    generation = int(gens[-1].id.rsplit("\x1f", 1)[1]) + 1 if gens else 0
    job = Job(
        id=f"{key}\x1f{generation:06d}",
        rule=rule.name,
        destination=dest,
        level=rule.level,
        study_uid=inst.study_uid,
        sop_instance_uid="" if study else inst.sop_instance_uid,
        state=State.WAITING if study else State.QUEUED,
        created_at=now,
        not_before=now + cfg.quiet_period_s if study else now,
        updated_at=now,
    )
    _put(ops, job)
    return job.id


def restart_running(queue: JobQueue, now: float) -> concurrent.futures.Future:
    """After a restart no send runs: RUNNING jobs are queued again (at-least-once)."""
    return queue.submit_update(
        lambda j: transition(j, Event.RESTART, now, queue.cfg) if j.state is State.RUNNING else None
    )
