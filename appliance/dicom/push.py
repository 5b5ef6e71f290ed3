"""Send a study to a known DICOM node on request (the page's "send to"): the C-MOVE
sub-operation path without a C-MOVE request. The same instance order (held ones first, the
rest as the mesh delivers them), the same contexts (`retrieve.move_contexts`), the same
stored bytes (`RawInstance`, fast path) and one association from our AE to the node, with
C-STORE sub-operation counts as in PS3.4 C.4.2.1.6 (completed, warning, failed, remaining).

A job runs on its own thread (pynetdicom blocks); its counters are read by the page.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pynetdicom.status import code_to_category

from appliance.dicom import query, retrieve
from appliance.dicom.config import DicomNode

if TYPE_CHECKING:
    from appliance.dicom.scp import DicomNodeServer

log = logging.getLogger(__name__)

MAX_RUNNING = 4  # each holds an association and a thread; a small box sends few at once
MAX_KEPT = 50  # finished jobs kept for the page, oldest dropped first


class PushError(Exception):
    """A send that cannot start (too many running)."""


@dataclass
class PushJob:
    """One study sent to one node; counters written by the job's thread, read by the page."""

    id: str
    study_uid: str
    destination: str  # AE title
    started_at: float = field(default_factory=time.time)
    total: int = 0
    completed: int = 0
    warning: int = 0
    failed: int = 0
    bytes_sent: int = 0
    finished: bool = False
    error: str | None = None
    finished_at: float | None = None
    cancel_requested: bool = False

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.completed - self.warning - self.failed)

    def to_json(self) -> dict[str, Any]:
        end = self.finished_at or time.time()
        elapsed = max(end - self.started_at, 1e-3)
        done = self.completed + self.warning + self.failed
        rate = self.bytes_sent / elapsed
        eta = None
        if not self.finished and done and self.remaining:
            eta = round(elapsed / done * self.remaining, 1)
        return {
            "id": self.id,
            "study": self.study_uid,
            "destination": self.destination,
            "started_at": self.started_at,
            "total": self.total,
            "completed": self.completed,
            "warning": self.warning,
            "failed": self.failed,
            "remaining": self.remaining,
            "bytes_sent": self.bytes_sent,
            "rate_bps": 0.0 if self.finished else round(rate * 8, 1),
            "eta_s": eta,
            "finished": self.finished,
            "cancelled": self.cancel_requested and self.finished,
            "error": self.error,
        }


def run_push(node: DicomNodeServer, job: PushJob, destination: DicomNode) -> None:
    """Send `job.study_uid` to `destination` and fill in the job. Blocking (thread side)."""
    try:
        _send(node, job, destination)
    except Exception as exc:  # a job ends with its error shown, never a dead thread
        log.exception("send %s: failed", job.id)
        job.error = f"{type(exc).__name__}: {exc}"
    finally:
        job.finished_at = time.time()
        job.finished = True
    outcome = job.error or ("cancelled" if job.cancel_requested else "done")
    log.info("send %s of study %s to %s: %s, %d completed, %d warning, %d failed",
             job.id, job.study_uid, job.destination, outcome, job.completed, job.warning,
             job.failed)  # fmt: skip


def _send(node: DicomNodeServer, job: PushJob, destination: DicomNode) -> None:
    try:
        items = node.resolve_study(job.study_uid)
        contexts = retrieve.move_contexts(items)
    except query.QueryError as exc:
        job.error = exc.comment
        return
    if not items:
        job.error = "study not held here nor known in the mesh"
        return
    job.total = len(items)
    # Our AE (GatewayAE): outgoing associations get the same socket tuning as C-MOVE's.
    assoc = node.ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title.strip(),
        contexts=contexts,
    )  # fmt: skip
    if not assoc.is_established:
        job.error = "association rejected" if assoc.is_rejected else "no association"
        return
    try:
        for instance in node.instances(items, lambda: job.cancel_requested):
            if instance.raw is None:  # unreadable here, or the mesh did not deliver it
                job.failed += 1
                continue
            try:
                rsp = assoc.send_c_store(instance)
            except ValueError as exc:  # no accepted context for its SOP class / syntax
                log.debug("send %s: %s not sent: %s", job.id, instance.SOPInstanceUID, exc)
                job.failed += 1
                continue
            code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            if code is None:
                job.error = "association ended by the node or timed out"
                return
            category = code_to_category(code)
            if category == "Success":
                job.completed += 1
            elif category == "Warning":
                job.warning += 1
            else:
                job.failed += 1
            job.bytes_sent += len(instance.raw)
        if not job.cancel_requested:
            node.store.record_access({job.study_uid})
        assoc.release()
    finally:
        if assoc.is_established:
            assoc.abort()


class Pushes:
    """The sends started from the page: at most MAX_RUNNING at once, the last MAX_KEPT."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, PushJob] = OrderedDict()
        self._threads: dict[str, threading.Thread] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, node: DicomNodeServer, study_uid: str, destination: DicomNode) -> PushJob:
        with self._lock:
            running = [j for j in self._jobs.values() if not j.finished]
            if len(running) >= MAX_RUNNING:
                raise PushError(f"{MAX_RUNNING} sends are running; wait for one to end")
            job = PushJob(f"s{next(self._ids)}", study_uid, destination.ae_title.strip())
            self._jobs[job.id] = job
            while len(self._jobs) > MAX_KEPT:
                oldest = next((k for k, j in self._jobs.items() if j.finished), None)
                if oldest is None:
                    break
                del self._jobs[oldest]
                self._threads.pop(oldest, None)
        thread = threading.Thread(
            target=run_push, args=(node, job, destination), name=f"send-{job.id}", daemon=True
        )
        self._threads[job.id] = thread
        thread.start()
        log.info("send %s of study %s to %s started", job.id, study_uid, job.destination)
        return job

    def get(self, job_id: str) -> PushJob | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[PushJob]:
        return list(self._jobs.values())

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what runs and wait up to `timeout` s in all (at shutdown)."""
        for job in self._jobs.values():
            job.cancel_requested = True
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
