"""The store facade: durable instance writes (thread and asyncio sides) and short reads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.store.chunking import EncodedChunk
from appliance.store.config import StoreConfig
from appliance.store.db import Database
from appliance.store.errors import CommitTimeout, StoreClosed
from appliance.store.index import PutOutcome, Reader, SpaceNeed, WriteOps
from appliance.store.records import IncomingInstance, UsageRecord
from appliance.store.writer import Limits, SpaceBudget, Writer

log = logging.getLogger(__name__)

# Follow-up work written in a stored instance's own transaction (e.g. forwarding jobs).
InstanceHook = Callable[[WriteOps, IncomingInstance], None]


@dataclass(frozen=True)
class StoreStats:
    used_bytes: int
    file_bytes: int
    disk_free_bytes: int
    max_bytes: int
    patients: int
    studies: int
    series: int
    instances: int
    chunks: int
    full_reason: str | None


class Store:
    """One gateway's LMDB store. Writes go through the writer thread; reads are direct."""

    def __init__(self, cfg: StoreConfig, directory: Path, *, map_size: int | None = None) -> None:
        self.cfg = cfg
        self.db = Database(directory, map_size=map_size)
        self._writer_limits = Limits(int(cfg.max_bytes), int(cfg.min_free_bytes))
        self._writer = Writer(self.db, self._writer_limits)
        self._instance_hooks: list[InstanceHook] = []
        self._writer.start()

    def apply(self, cfg: StoreConfig) -> list[str]:
        """Take new settings while running: limits apply to the next commit, the codec to
        the next instance, the timeout to the next C-STORE. Returns keys needing a restart
        (none: kept for the same contract as the other subsystems)."""
        # The writer reads these per transaction; int assignment is atomic under the GIL.
        self._writer_limits.max_bytes = int(cfg.max_bytes)
        self._writer_limits.min_free_bytes = int(cfg.min_free_bytes)
        self.cfg = cfg
        return []

    # -- writes ---------------------------------------------------------------------------

    def submit_instance(self, inc: IncomingInstance) -> concurrent.futures.Future:
        """Queue an instance for the next durable commit; the future gets a PutOutcome."""

        def apply(ops: WriteOps, budget: SpaceBudget) -> PutOutcome:
            # A re-send takes no space: it is acknowledged even when the store is full.
            if ops.is_duplicate(inc):
                return PutOutcome.DUPLICATE
            budget.claim(ops.space_need(inc))
            outcome = ops.put_instance(inc)
            # Same nested transaction: a hook's failure refuses the instance (the modality
            # retries) rather than acknowledging an instance whose follow-up work is lost.
            for hook in self._instance_hooks:
                hook(ops, inc)
            return outcome

        return self._writer.submit(apply, weight=inc.manifest.size, studies=(inc.study_uid,))

    def put_instance(self, inc: IncomingInstance, timeout: float | None = None) -> PutOutcome:
        """Thread side: returns once the instance is durable on disk, or raises StoreError."""
        fut = self.submit_instance(inc)
        try:
            return fut.result(self.cfg.commit_timeout_s if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            raise CommitTimeout("durable commit did not finish in time") from None

    async def async_put_instance(self, inc: IncomingInstance) -> PutOutcome:
        """Loop side of put_instance."""
        return await asyncio.wrap_future(self.submit_instance(inc))

    def record_access(self, study_uids: Iterable[str], when: float | None = None) -> None:
        """Count a retrieval of these studies (usage statistics for eviction); not awaited."""
        uids = sorted(set(study_uids))
        stamp = time.time() if when is None else when

        def apply(ops: WriteOps, _budget: SpaceBudget) -> None:
            for uid in uids:
                ops.touch_accessed(uid, stamp)

        fut = self._writer.submit(apply)
        fut.add_done_callback(_log_background_failure)

    def submit_delete_study(
        self, study_uid: str, expect: UsageRecord | None = None
    ) -> concurrent.futures.Future:
        """Queue the removal of a whole study (see WriteOps.delete_study); the future gets
        the bytes of its instances, or None when `expect` no longer matches. Commit
        listeners hear of the study (the mesh withdraws its catalog entries)."""
        return self._writer.submit(
            lambda ops, _budget: ops.delete_study(study_uid, expect), studies=(study_uid,)
        )

    def delete_study(self, study_uid: str, expect: UsageRecord | None = None) -> int | None:
        """Thread side of submit_delete_study: returns once the deletion is durable."""
        fut = self.submit_delete_study(study_uid, expect)
        try:
            return fut.result(self.cfg.commit_timeout_s)
        except concurrent.futures.TimeoutError:
            raise CommitTimeout("durable commit did not finish in time") from None

    # -- swarm downloads -------------------------------------------------------------------

    def submit_pins(self, study_uid: str, chunks: list[EncodedChunk]) -> concurrent.futures.Future:
        """Store downloaded, verified chunks for `study_uid`'s download (durable, servable to
        other gateways at once); space is checked like an instance's. Future -> new pins."""

        def apply(ops: WriteOps, budget: SpaceBudget) -> int:
            fresh = [c for c in chunks if ops.txn.get(c.ref.digest, db=ops.t.chunk_refs) is None]
            budget.claim(SpaceNeed(sum(len(c.stored or b"") for c in fresh)))
            return sum(ops.pin_chunk(study_uid, c) for c in chunks)

        weight = sum(len(c.stored or b"") for c in chunks)
        return self._writer.submit(apply, weight=weight)

    def submit_download(self, study_uid: str, record: bytes | None) -> concurrent.futures.Future:
        """Record a download in progress (bytes), or finish it (None): its pins are released
        and chunks no instance uses are dropped. Commit listeners hear of the study."""

        def apply(ops: WriteOps, _budget: SpaceBudget) -> int:
            if record is None:
                return ops.unpin_study(study_uid)
            ops.set_download(study_uid, record)
            return 0

        return self._writer.submit(apply, studies=(study_uid,))

    def submit_write(self, fn: Callable[[WriteOps], Any]) -> concurrent.futures.Future:
        """Queue `fn(ops)` (bookkeeping beside the index, e.g. the mesh catalog, written with
        ops.txn / ops.t) for the next durable commit; the future gets its result. It claims no
        quota (callers bound their own sizes) and announces nothing to commit listeners."""
        return self._writer.submit(lambda ops, _budget: fn(ops))

    def add_instance_hook(self, hook: InstanceHook) -> None:
        """Run `hook(ops, inc)` inside the write transaction of every newly stored (not
        duplicate) instance: what it writes is durable exactly when the instance is.
        Register before instances arrive; runs on the writer thread."""
        self._instance_hooks.append(hook)

    def add_commit_listener(self, listener: Callable[[set[str]], None]) -> None:
        """Call `listener(study UIDs)` on the writer thread after commits that changed them."""
        self._writer.listeners.append(listener)

    def ping(self, timeout: float) -> bool:
        """True when the writer completes a (empty) commit within `timeout` seconds."""
        try:
            self._writer.submit(lambda _ops, _budget: None).result(timeout)
        except (concurrent.futures.TimeoutError, StoreClosed):
            return False
        return True

    # -- reads ----------------------------------------------------------------------------

    @contextmanager
    def reader(self) -> Iterator[Reader]:
        """A consistent read view; keep it short (an open reader pins old pages)."""
        with self.db.read() as txn:
            yield Reader(txn, self.db.tables)

    def read_instance(self, sop_instance_uid: str) -> bytes | None:
        """The instance's bytes exactly as received (verified), or None."""
        with self.reader() as r:
            return r.instance_bytes(sop_instance_uid)

    def stats(self) -> StoreStats:
        with self.db.read() as txn:
            used = self.db.used_bytes(txn)
            counts = Reader(txn, self.db.tables).counts()
        return StoreStats(
            used_bytes=used,
            file_bytes=self.db.file_bytes(),
            disk_free_bytes=self.db.disk_free(),
            max_bytes=int(self.cfg.max_bytes),
            full_reason=self._writer.full_reason,
            **counts,
        )

    def close(self) -> None:
        """Commit everything queued, then close the environment."""
        self._writer.stop()
        self.db.close()


def _log_background_failure(fut: concurrent.futures.Future) -> None:
    if (exc := fut.exception()) is not None:
        log.warning("usage statistics not recorded: %s", exc)
