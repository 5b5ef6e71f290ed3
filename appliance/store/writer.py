"""The store's only writer: a thread that applies queued operations in durable group commits.

LMDB allows one write transaction at a time; funnelling every write through one thread keeps
that explicit and lets concurrent associations share a commit (one fsync pair for all the
instances that arrived while the previous commit was syncing). An operation's future resolves
only after the transaction that contains it committed with sync.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import lmdb

from appliance.store.db import Database
from appliance.store.errors import StoreClosed, StoreError, StoreFull
from appliance.store.index import PutOutcome, SpaceNeed, WriteOps

log = logging.getLogger(__name__)

# Bounds of one group commit: enough to absorb a burst from many modalities, small enough
# that a transaction stays short and one failing batch is cheap to retry one by one.
MAX_BATCH_OPS = 64
MAX_BATCH_BYTES = 64 << 20
# An EIO from a commit while less than this is free on the filesystem is the disk filling up.
_SHORT_WRITE_FREE = 1 << 20


@dataclass
class Limits:
    """Space rules applied to every write."""

    max_bytes: int  # 0 = unlimited
    min_free_bytes: int


class SpaceBudget:
    """Space accounting for one transaction: quota on live pages, reserve of free disk."""

    def __init__(self, db: Database, txn: lmdb.Transaction, limits: Limits) -> None:
        self.limits = limits
        self.used = db.used_bytes(txn)
        # Pages freed inside the file are reused before the file grows.
        self.reusable = max(0, db.file_bytes() - self.used)
        self.disk_free = db.disk_free()

    def claim(self, need: SpaceNeed) -> None:
        est = need.estimate
        if self.limits.max_bytes and self.used + est > self.limits.max_bytes:
            raise StoreFull(f"store quota of {self.limits.max_bytes} bytes reached")
        growth = max(0, est - self.reusable)
        if growth and self.disk_free - growth < self.limits.min_free_bytes:
            raise StoreFull(
                f"free disk space would fall below the {self.limits.min_free_bytes}-byte reserve"
            )
        self.used += est
        self.reusable = max(0, self.reusable - est)
        self.disk_free -= growth


Apply = Callable[[WriteOps, SpaceBudget], Any]


@dataclass
class _Op:
    apply: Apply
    weight: int  # bytes the op adds (0 for bookkeeping such as usage updates)
    future: Future
    studies: tuple[str, ...] = ()  # studies whose content the op changes (for listeners)


_STOP = object()


class Writer(threading.Thread):
    """Owns every write transaction of one Database."""

    def __init__(self, db: Database, limits: Limits) -> None:
        super().__init__(name="store-writer", daemon=True)
        self._db = db
        self._limits = limits
        self._q: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self.full_reason: str | None = None  # set while writes are refused for lack of space
        # Called on this thread after a commit with the studies it changed; must be quick
        # (typically loop.call_soon_threadsafe).
        self.listeners: list[Callable[[set[str]], None]] = []
        self.last_commit = time.monotonic()

    def submit(self, apply: Apply, weight: int = 0, studies: tuple[str, ...] = ()) -> Future:
        """Queue `apply(ops, budget)` for the next commit; the future gets its result.
        `studies` are announced to commit listeners once the op committed."""
        fut: Future = Future()
        with self._close_lock:
            if self._closed:
                fut.set_exception(StoreClosed("store is closed"))
                return fut
            self._q.put(_Op(apply, weight, fut, studies))
        return fut

    def stop(self, timeout: float | None = None) -> None:
        """Commit what is queued, then end the thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._q.put(_STOP)
        self.join(timeout)

    def run(self) -> None:
        stopping = False
        while not stopping:
            first = self._q.get()
            if first is _STOP:
                break
            batch = [first]
            weight = first.weight
            while len(batch) < MAX_BATCH_OPS and weight < MAX_BATCH_BYTES:
                try:
                    op = self._q.get_nowait()
                except queue.Empty:
                    break
                if op is _STOP:
                    stopping = True
                    break
                batch.append(op)
                weight += op.weight
            try:
                self._run_batch(batch)
            except Exception as exc:  # e.g. remapping failed: this batch fails, the writer lives
                log.exception("store batch failed")
                error = StoreError(f"internal store error: {exc.__class__.__name__}")
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(error)

    def _run_batch(self, batch: list[_Op]) -> None:
        while True:
            try:
                results = self._commit(batch)
            except lmdb.MapFullError:
                if self._db.grow():
                    continue
                self._fallback(batch, StoreFull("store map is full and the disk allows no more"))
                return
            except lmdb.Error as exc:
                self._fallback(batch, self._commit_error(exc))
                return
            self.last_commit = time.monotonic()
            changed: set[str] = set()
            for op, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    self._note_failure(result)
                    op.future.set_exception(result)
                else:
                    # A re-send (DUPLICATE) took no space: it says nothing about room again.
                    if op.weight and result is not PutOutcome.DUPLICATE:
                        self._note_success()
                    if result is not PutOutcome.DUPLICATE:
                        changed.update(op.studies)
                    op.future.set_result(result)
            if changed:
                self._announce(changed)
            return

    def _announce(self, studies: set[str]) -> None:
        for listener in list(self.listeners):
            try:
                listener(studies)
            except Exception:  # a listener's bug must not take the writer down
                log.exception("commit listener failed")

    def _fallback(self, batch: list[_Op], error: StoreError) -> None:
        """A batch that cannot commit as a whole: give each op its own chance (a small
        instance may still fit where the batch did not)."""
        if len(batch) > 1:
            for op in batch:
                self._run_batch([op])
            return
        self._note_failure(error)
        batch[0].future.set_exception(error)

    def _commit(self, batch: list[_Op]) -> list[Any]:
        results: list[Any] = []
        with self._db.env.begin(write=True) as txn:
            budget = SpaceBudget(self._db, txn, self._limits)
            for op in batch:
                # One nested transaction per op: a refused op rolls back alone.
                child = self._db.env.begin(write=True, parent=txn)
                try:
                    result = op.apply(WriteOps(child, self._db.tables), budget)
                except lmdb.MapFullError:
                    child.abort()
                    raise
                except StoreError as exc:
                    child.abort()
                    results.append(exc)
                except Exception as exc:  # a bug must not take the writer thread down
                    child.abort()
                    log.exception("store operation failed")
                    results.append(StoreError(f"internal store error: {exc.__class__.__name__}"))
                else:
                    child.commit()
                    results.append(result)
        return results  # the with-block committed with sync

    def _commit_error(self, exc: lmdb.Error) -> StoreError:
        code = getattr(exc, "code", None)
        # LMDB turns a write cut short by a full filesystem into EIO (mdb.c mdb_page_flush:
        # "short write, filesystem full?"); only a write that stored nothing gives ENOSPC.
        if code == errno.ENOSPC or (code == errno.EIO and self._db.disk_free() < _SHORT_WRITE_FREE):
            return StoreFull("disk full")
        log.error("store commit failed: %s", exc)
        return StoreError(f"store commit failed: {exc}")

    def _note_failure(self, exc: BaseException) -> None:
        if isinstance(exc, StoreFull) and self.full_reason is None:
            self.full_reason = str(exc)
            log.error("store full, new instances are refused with 0xA700: %s", exc)

    def _note_success(self) -> None:
        if self.full_reason is not None:
            log.info("store accepts instances again (was: %s)", self.full_reason)
            self.full_reason = None
