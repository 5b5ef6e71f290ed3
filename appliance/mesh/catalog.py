"""The mesh catalog: what exists where, replicated to every gateway by pull-based anti-entropy.

Entries. Every gateway ("origin") authors entries keyed by (origin, kind, study UID):
- kind "desc", the study as the origin describes it (built by describe.py):
    {"patient_key": str, "patient": Attrs, "study": Attrs, "series": {series UID: Attrs},
     "instances": {SOP UID: {"series": series UID, "sop_class": UID, "ts": UID, "size": int,
                             "manifest": manifest SHA-256 hex, "attrs": Attrs, "at"?: float}}}
  `at` (optional, Unix seconds) is when this version of the instance entered the mesh: the
  received_at of the gateway that first stored it; copies keep it. Chunk manifests are not
  in the catalog: a downloader fetches one from a holder and checks it against `manifest`.
- kind "hold", the origin's holding of the study:
    {"state": "complete" | "partial", "instances": held, "of": total, "bytes": held bytes}
A payload of None is a tombstone (no longer described / holds nothing): it is stored and
propagated like any entry, so a deletion reaches everyone and nothing resurrects.

Sequence numbers. An origin numbers its own changes 1, 2, 3... (persisted in `cat_vv` under
its own name, so they survive restarts); a higher seq for the same key supersedes. Each
gateway keeps only the latest entry per key (`cat_entries`); `cat_log` maps (origin, seq) to
the key for the live seqs only (a superseded seq is dropped when its key moves on).

Sync (pull). A pulls from B by sending its version vector vv_A = {origin: highest seq A has
from it}. B answers with every entry it holds, of any origin (itself, A, third parties), whose
seq > vv_A[origin], merged in seq order across origins, cut after `limit` entries or
`max_bytes` of JSON, with `more` set when something was left (A pulls again at once). Because
the answer is one seq-ordered stream, the cut leaves each origin's part a *prefix*: for every
origin X, A received all of B's X-entries with seq in (vv_A[X], m_X], m_X the highest
received. A applies an entry when its seq is greater than the one A holds for that key, then
raises vv_A[X] to m_X. This is safe although seqs have gaps (compaction): invariant (I) "every
X-entry with seq <= vv[X] is held (or a newer one for its key), or superseded by an X-entry
with seq > vv[X]" holds at B, and then at A for (vv_A[X], m_X]: what B held there was sent,
and what B no longer holds was superseded by an entry B holds, which is either <= m_X (sent)
or > m_X (A asks for it next). Nothing below vv_A is ever needed again, so A asks nobody for
it; entries above vv_A come from any peer that has them, so a change reaches every gateway
in as many rounds as the mesh's diameter, and a gateway offline for a week catches up with
one pull (and its `more` pages). Entries of our own origin coming back from a peer (after this
store was lost) raise our counter too, so new publications supersede them.

Conflicts. `catalog_model.merge_view` merges one study's entries: the union of instances of
all descriptions; attributes from the best-ranked description (origin holds it complete, then
newest `at`, then origin name); for one SOP UID with different manifest digests (a replaced
instance), the latest `at` wins, then the better-ranked description, then the higher digest.

Limits (peer input). At most MAX_DELTA_ENTRIES entries per batch, MAX_PAYLOAD_BYTES per
payload, MAX_ORIGINS origins, typed and bounded payload fields (catalog_model). A batch with
one bad entry raises MalformedEntry before anything is queued for writing.

Threads. Writes run on the store's writer thread (`Store.submit_write`), thread side blocking,
`async_*` on the loop (validation and compression in the default executor). Reads are short
LMDB read transactions; `delta` decodes up to `limit` payloads, so the loop uses async_delta.

API.
    Catalog(store, own)
      publish(kind, study_uid, payload) -> int | None     new seq, None when nothing changed
      publish_all([(kind, study_uid, payload)]) -> [int | None]   one commit
      apply(entries) -> [study UID]                       studies whose entries changed
      async_publish_all / async_apply / async_delta
      version_vector() -> {origin: seq}
      delta(since_vv, limit, max_bytes) -> Delta(entries, more)
      entries(study_uid) -> [CatalogEntry] (live)      view(study_uid) -> StudyView
      remote_studies() -> [study UID]                  held_by(origin) -> {study UID: hold}
    CatalogWriter(ops): publish(draft) / apply(entries), inside a write transaction
    CatalogReader(reader): version_vector, get, entries_for, delta, studies_held, held_by
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import zstandard

from appliance.mesh.catalog_model import (
    DELTA_BYTES,
    DESC,
    HOLD,
    MAX_DELTA_ENTRIES,
    MAX_ORIGINS,
    CatalogEntry,
    Delta,
    MalformedEntry,
    StudyView,
    VersionVector,
    check_batch,
    entry_key,
    log_key,
    merge_view,
    pack_seq,
    parse_vv,
    unpack_seq,
)
from appliance.mesh.config import peer_name
from appliance.store import Store
from appliance.store.errors import CommitTimeout, CorruptData
from appliance.store.index import Reader, WriteOps

log = logging.getLogger(__name__)

Change = tuple[str, str, "dict[str, Any] | None"]  # (kind, study UID, payload or None)
_WIRE_OVERHEAD = 160  # JSON bytes of an entry besides its payload (origin, kind, UID, seq)


class CatalogWriter:
    """Catalog mutations inside one open write transaction (on the store's writer thread)."""

    def __init__(self, ops: WriteOps) -> None:
        self.txn = ops.txn
        self.t = ops.t

    def seq_of(self, origin: str) -> int | None:
        raw = self.txn.get(origin.encode(), db=self.t.cat_vv)
        return None if raw is None else unpack_seq(raw)

    def publish(self, draft: CatalogEntry) -> CatalogEntry | None:
        """Store `draft` (its seq is ignored) as its origin's next change; None when it would
        change nothing (the same payload again, or a tombstone for an unknown key)."""
        old = self.txn.get(draft.key, db=self.t.cat_entries)
        old_blob = b"" if old is None else bytes(old)[8:]
        if old is None and draft.payload is None:
            return None
        if old is not None and _same_payload(old_blob, draft.payload_json):
            return None
        seq = (self.seq_of(draft.origin) or 0) + 1
        self._write(draft, seq, draft.blob, 0 if old is None else unpack_seq(old))
        self.txn.put(draft.origin.encode(), pack_seq(seq), db=self.t.cat_vv)
        return CatalogEntry(draft.origin, draft.kind, draft.study_uid, seq, draft.payload)

    def apply(self, entries: Iterable[CatalogEntry]) -> list[str]:
        """Apply a validated batch (see check_batch): each entry only if newer than the one
        held for its key; then raise the version vector. Returns the changed study UIDs."""
        vv: dict[str, int] = {}
        refused: set[str] = set()
        origins = self.txn.stat(self.t.cat_vv)["entries"]
        changed: set[str] = set()
        for e in entries:
            if e.origin in refused:
                continue
            if e.origin not in vv:
                known = self.seq_of(e.origin)
                if known is None and origins >= MAX_ORIGINS:
                    refused.add(e.origin)
                    continue
                origins += known is None
                vv[e.origin] = known or 0
            old = self.txn.get(e.key, db=self.t.cat_entries)
            old_seq = 0 if old is None else unpack_seq(old)
            if e.seq > old_seq:
                self._write(e, e.seq, e.blob, old_seq)
                changed.add(e.study_uid)
            if e.seq > vv[e.origin]:
                vv[e.origin] = e.seq
                self.txn.put(e.origin.encode(), pack_seq(e.seq), db=self.t.cat_vv)
        if refused:
            log.warning("catalog: %d origin(s) refused, already %d known", len(refused), origins)
        return sorted(changed)

    def _write(self, e: CatalogEntry, seq: int, blob: bytes, old_seq: int) -> None:
        key = e.key
        self.txn.put(key, pack_seq(seq) + blob, db=self.t.cat_entries)
        if old_seq:
            self.txn.delete(log_key(e.origin, old_seq), db=self.t.cat_log)
        self.txn.put(log_key(e.origin, seq), key, db=self.t.cat_log)
        # cat_studies indexes live entries only: a study whose entries are all tombstones
        # drops out of listings (its tombstones stay in cat_entries and the log).
        ref = f"{e.origin}\0{e.kind}".encode()
        if blob:
            self.txn.put(e.study_uid.encode(), ref, db=self.t.cat_studies)
        else:
            self.txn.delete(e.study_uid.encode(), ref, db=self.t.cat_studies)


class CatalogReader:
    """The catalog as seen by one read transaction; entries are decoded copies."""

    def __init__(self, reader: Reader) -> None:
        self.txn = reader.txn
        self.t = reader.t

    def version_vector(self) -> VersionVector:
        return {bytes(k).decode(): unpack_seq(v) for k, v in self.txn.cursor(db=self.t.cat_vv)}

    def get(self, origin: str, kind: str, study_uid: str) -> CatalogEntry | None:
        key = entry_key(origin, kind, study_uid)
        raw = self.txn.get(key, db=self.t.cat_entries)
        return None if raw is None else CatalogEntry.decode(key, raw)

    def entries_for(self, study_uid: str) -> list[CatalogEntry]:
        """The live (non-tombstone) entries about a study, from every origin."""
        cur = self.txn.cursor(db=self.t.cat_studies)
        if not cur.set_key(study_uid.encode()):
            return []
        found = []
        for ref in [bytes(v).decode() for v in cur.iternext_dup()]:
            origin, kind = ref.split("\0")
            if (entry := self.get(origin, kind, study_uid)) is not None:
                found.append(entry)
        return found

    def studies_held(self, exclude: str | None = None) -> list[str]:
        """Studies with a live hold entry from an origin other than `exclude`."""
        found = []
        for key, ref in self.txn.cursor(db=self.t.cat_studies):
            origin, kind = bytes(ref).decode().split("\0")
            if kind == HOLD and origin != exclude:
                study = bytes(key).decode()
                if not found or found[-1] != study:
                    found.append(study)
        return found

    def held_by(self, origin: str) -> dict[str, dict[str, Any]]:
        """{study UID: hold payload} of one origin (one key range of cat_entries)."""
        prefix = f"{origin}\0{HOLD}\0".encode()
        cur = self.txn.cursor(db=self.t.cat_entries)
        out: dict[str, dict[str, Any]] = {}
        if not cur.set_range(prefix):
            return out
        for key, value in cur:
            if not bytes(key).startswith(prefix):
                break
            entry = CatalogEntry.decode(key, value)
            if entry.payload is not None:
                out[entry.study_uid] = entry.payload
        return out

    def all_entries(self) -> Iterator[CatalogEntry]:
        """Every entry, tombstones included, in key order."""
        for key, value in self.txn.cursor(db=self.t.cat_entries):
            yield CatalogEntry.decode(key, value)

    def delta(
        self, since: Mapping[str, int], limit: int = MAX_DELTA_ENTRIES, max_bytes: int = DELTA_BYTES
    ) -> Delta:
        """Entries newer than `since`, in seq order merged across origins (so any cut keeps
        a prefix per origin), at most `limit` entries and `max_bytes` of payload JSON (always
        at least one entry); `more` when some were left out."""
        limit = max(1, min(limit, MAX_DELTA_ENTRIES))
        streams = [
            self._log_after(origin, since.get(origin, 0))
            for origin, top in self.version_vector().items()
            if top > since.get(origin, 0)
        ]
        entries: list[CatalogEntry] = []
        size = 0
        for seq, origin, key in heapq.merge(*streams):
            if len(entries) >= limit:
                return Delta(tuple(entries), True)
            raw = self.txn.get(key, db=self.t.cat_entries)
            entry = None if raw is None else CatalogEntry.decode(key, raw)
            if entry is None or entry.seq != seq or entry.origin != origin:
                raise CorruptData(f"catalog log of {origin} at {seq} points to a stale entry")
            cost = len(entry.payload_json) + _WIRE_OVERHEAD
            if entries and size + cost > max_bytes:
                return Delta(tuple(entries), True)
            entries.append(entry)
            size += cost
        return Delta(tuple(entries), False)

    def _log_after(self, origin: str, after: int) -> Iterator[tuple[int, str, bytes]]:
        """(seq, origin, entry key) of one origin's live log entries with seq > after."""
        prefix = origin.encode() + b"\0"
        cur = self.txn.cursor(db=self.t.cat_log)
        if not cur.set_range(log_key(origin, after + 1)):
            return
        for key, value in cur:
            key = bytes(key)
            if not key.startswith(prefix):
                return
            yield unpack_seq(key[len(prefix) :]), origin, bytes(value)


class Catalog:
    """This gateway's catalog on its store: `own` is this gateway's mesh name."""

    def __init__(self, store: Store, own: str) -> None:
        if peer_name(own) is not None:
            raise ValueError(f"bad mesh name {own!r}")
        self.store = store
        self.own = own

    # -- writes: thread side ------------------------------------------------------------

    def publish(self, kind: str, study_uid: str, payload: dict[str, Any] | None) -> int | None:
        """Publish this gateway's desc/hold of a study (None: a tombstone); returns its seq,
        or None when it changes nothing. Raises MalformedEntry for an invalid payload."""
        return self.publish_all([(kind, study_uid, payload)])[0]

    def publish_all(self, changes: Iterable[Change]) -> list[int | None]:
        """Several changes in one durable commit (e.g. a study's desc and hold together)."""
        return _seqs(self._wait(self.submit_publish(changes)))

    def submit_publish(self, changes: Iterable[Change]) -> concurrent.futures.Future:
        """Validate and encode here, then queue the commit; the future gets the stored
        entries (None for a change that changed nothing)."""
        drafts = []
        for kind, study_uid, payload in changes:
            draft = CatalogEntry(self.own, kind, study_uid, 1, payload).validate()
            _ = draft.blob  # compress off the writer thread
            drafts.append(draft)
        return self.store.submit_write(lambda ops: [CatalogWriter(ops).publish(d) for d in drafts])

    def apply(self, entries: Iterable[CatalogEntry]) -> list[str]:
        """Apply entries pulled from a peer (one delta, in its order); returns the studies
        whose entries changed. Raises MalformedEntry, writing nothing, for a bad batch."""
        return self._wait(self.submit_apply(entries))

    def submit_apply(self, entries: Iterable[CatalogEntry]) -> concurrent.futures.Future:
        batch = check_batch(entries)
        for e in batch:
            _ = e.blob
        fut = self.store.submit_write(lambda ops: CatalogWriter(ops).apply(batch))
        fut.add_done_callback(lambda f: _log_applied(f, len(batch)))
        return fut

    # -- writes: loop side --------------------------------------------------------------

    async def async_publish_all(self, changes: Iterable[Change]) -> list[int | None]:
        loop = asyncio.get_running_loop()
        fut = await loop.run_in_executor(None, self.submit_publish, list(changes))
        return _seqs(await asyncio.wrap_future(fut))

    async def async_apply(self, entries: Iterable[CatalogEntry]) -> list[str]:
        loop = asyncio.get_running_loop()
        fut = await loop.run_in_executor(None, self.submit_apply, list(entries))
        return await asyncio.wrap_future(fut)

    # -- reads ----------------------------------------------------------------------------

    def version_vector(self) -> VersionVector:
        with self.store.reader() as r:
            return CatalogReader(r).version_vector()

    def delta(
        self, since: Any, limit: int = MAX_DELTA_ENTRIES, max_bytes: int = DELTA_BYTES
    ) -> Delta:
        """What a peer whose version vector is `since` lacks (`since` is validated: it
        usually comes from the peer)."""
        vv = parse_vv(since)
        if type(limit) is not int or limit < 1:
            raise MalformedEntry("catalog pull: limit must be a positive integer")
        with self.store.reader() as r:
            return CatalogReader(r).delta(vv, limit, max_bytes)

    async def async_delta(
        self, since: Any, limit: int = MAX_DELTA_ENTRIES, max_bytes: int = DELTA_BYTES
    ) -> Delta:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.delta, since, limit, max_bytes)

    def entries(self, study_uid: str) -> list[CatalogEntry]:
        with self.store.reader() as r:
            return CatalogReader(r).entries_for(study_uid)

    def view(self, study_uid: str) -> StudyView:
        return merge_view(study_uid, self.entries(study_uid))

    def remote_studies(self) -> list[str]:
        """Studies some other gateway holds (whether or not this one does too)."""
        with self.store.reader() as r:
            return CatalogReader(r).studies_held(exclude=self.own)

    def held_by(self, origin: str) -> dict[str, dict[str, Any]]:
        with self.store.reader() as r:
            return CatalogReader(r).held_by(origin)

    def _wait(self, fut: concurrent.futures.Future) -> Any:
        try:
            return fut.result(self.store.cfg.commit_timeout_s)
        except concurrent.futures.TimeoutError:
            raise CommitTimeout("catalog commit did not finish in time") from None


def _same_payload(old_blob: bytes, new_json: bytes) -> bool:
    if not old_blob or not new_json:
        return old_blob == new_json
    return zstandard.ZstdDecompressor().decompress(old_blob) == new_json


def _seqs(entries: list[CatalogEntry | None]) -> list[int | None]:
    return [None if e is None else e.seq for e in entries]


def _log_applied(fut: concurrent.futures.Future, n: int) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    log.debug("catalog: applied a batch of %d entries, %d studies changed", n, len(fut.result()))


__all__ = [
    "DESC",
    "HOLD",
    "Catalog",
    "CatalogEntry",
    "CatalogReader",
    "CatalogWriter",
    "Delta",
    "MalformedEntry",
    "StudyView",
    "merge_view",
]
