"""The forwarder: `on_stored` (called by the DICOM node after a durable commit; enqueue
only), a scheduler thread that promotes due jobs, and a small pool of sender threads
(pynetdicom blocks). State lives only in LMDB; in-memory is just which ids are sending."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.forward.config import DICOM, ForwardConfig, destination_kind
from appliance.forward.core import (
    Event,
    InvalidTransition,
    Job,
    State,
    StoredInstance,
    rule_matches,
)
from appliance.forward.queue import JobQueue, restart_running
from appliance.forward.sender import Destination, Outcome
from appliance.store import Store
from appliance.store.index import WriteOps
from appliance.store.records import IncomingInstance

log = logging.getLogger(__name__)

MAX_SENDING = 2  # associations at once; a small box on a slow line sends few at once
_WRITE_TIMEOUT_S = 30.0


class Forwarder:
    """Store-and-forward queue of one gateway. Thread-safe."""

    def __init__(
        self,
        store: Store,
        cfg: ForwardConfig,
        destinations: dict[str, Destination],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = JobQueue(store, cfg)
        self.store = store
        self.cfg = cfg
        self.destinations = destinations
        # Peer gateways and the central PACS (appliance/forward/push.py), set once the mesh
        # runs: (kind, target) -> Destination, None if unknown.
        self.mesh_destinations: Callable[[str, str], Destination | None] | None = None
        self.clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sending: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None

    # -- fed by the store ---------------------------------------------------------------------

    def attach(self) -> None:
        """Queue jobs inside each stored instance's own write transaction: the C-STORE is
        acknowledged only once its jobs are durable too, so a crash between the two cannot
        lose a job. The commit listener wakes the scheduler for them."""
        self.store.add_instance_hook(self._enqueue_hook)
        self.store.add_commit_listener(lambda _studies: self._wake.set())

    def _enqueue_hook(self, ops: WriteOps, inc: IncomingInstance) -> None:
        self.enqueue_ops(ops, stored_instance(inc))

    def on_stored(self, inst: StoredInstance) -> None:
        """Queue the jobs of an instance already durable in its own commit (instances that
        did not come through the hook, e.g. imported). Never blocks, never raises."""
        try:
            rules = [r for r in self.cfg.rules if rule_matches(r, inst)]
            if not rules:
                return
            fut = self.queue.submit_enqueue(inst, rules, self.clock())
            fut.add_done_callback(self._enqueued)
        except Exception:
            log.exception("forward: instance %s not queued", inst.sop_instance_uid)

    def enqueue_ops(self, ops: WriteOps, inst: StoredInstance) -> None:
        """Queue jobs inside an open write transaction."""
        rules = [r for r in self.cfg.rules if rule_matches(r, inst)]
        if rules:
            self.queue.enqueue_ops(ops, inst, rules, self.clock())

    def _enqueued(self, fut: concurrent.futures.Future) -> None:
        if (exc := fut.exception()) is not None:
            log.error("forward: jobs not queued: %s", exc)
        else:
            self._wake.set()

    # -- API for the CLI / web page -----------------------------------------------------------

    def jobs(self, state: State | None = None) -> list[Job]:
        return self.queue.jobs(state)

    def retry(self, job_id: str) -> Job:
        return self._event(job_id, Event.RETRY)

    def hold(self, job_id: str) -> Job:
        return self._event(job_id, Event.HOLD)

    def release(self, job_id: str) -> Job:
        return self._event(job_id, Event.RELEASE)

    def cancel(self, job_id: str) -> Job:
        return self._event(job_id, Event.CANCEL)

    def _event(self, job_id: str, event: Event) -> Job:
        """Raises KeyError (unknown id) or InvalidTransition."""
        job = self.queue.apply_event(job_id, event, self.clock(), timeout=_WRITE_TIMEOUT_S)
        log.info("forward job %s: %s -> %s", _short(job_id), event.value, job.state.value)
        self._wake.set()
        return job

    def set_destinations(self, destinations: dict[str, Destination]) -> None:
        """New `[dicom] nodes` (admin page): the next try of every job uses them. A send in
        progress finishes with the node it started with."""
        self.destinations = dict(destinations)  # one reference swap: atomic for _send
        self._wake.set()

    def set_mesh_destinations(self, resolve: Callable[[str, str], Destination | None]) -> None:
        """How "peer:NAME" and "central" destinations are reached (before start)."""
        self.mesh_destinations = resolve

    @property
    def stopping(self) -> threading.Event:
        """Set when the forwarder stops: long sends (peer destinations) give up after their
        current exchange."""
        return self._stop

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        n = restart_running(self.queue, self.clock()).result(_WRITE_TIMEOUT_S)
        if n:
            log.info("forward: %d interrupted job(s) queued again", n)
        self._pool = concurrent.futures.ThreadPoolExecutor(MAX_SENDING, "forward-send")
        self._thread = threading.Thread(target=self._run, name="forward", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop scheduling; sends in progress finish (or are retried after restart)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    # -- scheduler ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # a bad record must not stop forwarding for good
                log.exception("forward: scheduler pass failed")
            self._wake.wait(self.cfg.poll_s)
            self._wake.clear()

    def _tick(self) -> None:
        now = self.clock()
        for job in self.queue.jobs():
            if self._stop.is_set():
                return
            if job.not_before > now:
                continue
            if job.state is State.WAITING:
                self._try_event(job.id, Event.STABLE, now)
            elif job.state is State.QUEUED:
                with self._lock:
                    if len(self._sending) >= MAX_SENDING or job.id in self._sending:
                        continue
                started = self._try_event(job.id, Event.START, now)
                if started is None:
                    continue
                assert self._pool is not None
                with self._lock:
                    self._sending[job.id] = self._pool.submit(self._send, started)

    def _try_event(self, job_id: str, event: Event, now: float) -> Job | None:
        try:
            # The START commit is durable before the send: a crash counts the try.
            return self.queue.apply_event(job_id, event, now, timeout=_WRITE_TIMEOUT_S)
        except (InvalidTransition, KeyError):
            return None  # changed meanwhile (held, cancelled)

    def _send(self, job: Job) -> None:
        try:
            dest = self._destination(job.destination)
            if dest is None:
                outcome = Outcome(False, f"unknown destination {job.destination}")
            else:
                try:
                    outcome = dest.send(self.store, job)
                except Exception as exc:  # every failure kind gets the same retry schedule
                    outcome = Outcome(False, f"{type(exc).__name__}: {exc}")
            if outcome.interrupted and self._stop.is_set():
                # Left running in the store: the next start queues it again (restart_running).
                log.info("forward job %s: interrupted by stop", _short(job.id))
                return
            event = Event.SUCCESS if outcome.ok else Event.FAILURE
            new = self.queue.apply_event(
                job.id, event, self.clock(), outcome.reason, timeout=_WRITE_TIMEOUT_S
            )
            log.info("forward job %s (study %s) to %s: try %d %s, %d instance(s), %d bytes%s",
                     _short(job.id), job.study_uid, job.destination, job.tries, new.state.value,
                     outcome.sent, outcome.sent_bytes,
                     f": {outcome.reason}" if outcome.reason else "")  # fmt: skip
        except Exception:
            log.exception("forward job %s: result not recorded", _short(job.id))
        finally:
            with self._lock:
                self._sending.pop(job.id, None)
            self._wake.set()

    def _destination(self, name: str) -> Destination | None:
        kind, target = destination_kind(name)
        if kind == DICOM:
            return self.destinations.get(target)
        resolve = self.mesh_destinations
        return resolve(kind, target) if resolve is not None else None


def stored_instance(inc: IncomingInstance) -> StoredInstance:
    """From the store's IncomingInstance (what the C-STORE handler committed)."""
    attrs: dict[str, Any] = {}
    for level in (inc.attrs.study, inc.attrs.series, inc.attrs.instance):
        attrs.update(level)
    return StoredInstance(inc.manifest.sop_instance_uid, inc.study_uid, inc.calling_ae, attrs)


def _short(job_id: str) -> str:
    """Job ids hold UIDs and rule names, never patient data; \\x1f shown as '/'."""
    return job_id.replace("\x1f", "/")
