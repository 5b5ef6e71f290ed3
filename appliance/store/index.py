"""Index maintenance inside one write transaction, and the read-side view of the store.

Everything an instance adds (chunks, refcounts, manifest, instance/series/study/patient
entries and their counters, usage) is written by `WriteOps.put_instance` inside the caller's
transaction, so a crash at any moment leaves the whole instance or none of it.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import lmdb
import zstandard

from appliance.store import chunking
from appliance.store.db import Tables
from appliance.store.errors import CorruptData, StoreError
from appliance.store.records import (
    IncomingInstance,
    InstanceRecord,
    Manifest,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
    UsageRecord,
)

log = logging.getLogger(__name__)

_REF = struct.Struct("<IB")  # refcount, codec


class PutOutcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing written
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: the newer version wins


@dataclass(frozen=True)
class SpaceNeed:
    """Bytes an instance would add: chunk payloads not already stored, plus index overhead."""

    new_chunk_bytes: int

    @property
    def estimate(self) -> int:
        # Overflow pages round each value up to 4 KiB; index records add a few pages.
        return self.new_chunk_bytes + 16 * 4096


class WriteOps:
    """Index mutations on one open write transaction."""

    def __init__(self, txn: lmdb.Transaction, t: Tables) -> None:
        self.txn = txn
        self.t = t

    def space_need(self, inc: IncomingInstance) -> SpaceNeed:
        fresh = sum(
            len(c.stored)
            for c in inc.chunks
            if c.stored is not None and self.txn.get(c.ref.digest, db=self.t.chunk_refs) is None
        )
        return SpaceNeed(fresh)

    def is_duplicate(self, inc: IncomingInstance) -> bool:
        """True when these exact bytes are already stored under the instance's UID."""
        sop = inc.manifest.sop_instance_uid
        raw = self.txn.get(sop.encode(), db=self.t.instances)
        return raw is not None and InstanceRecord.decode(sop, raw).sha256 == inc.manifest.sha256

    def put_instance(self, inc: IncomingInstance) -> PutOutcome:
        sop = inc.manifest.sop_instance_uid
        outcome = PutOutcome.STORED
        old_raw = self.txn.get(sop.encode(), db=self.t.instances)
        kept_usage: tuple[str, bytes] | None = None
        if old_raw is not None:
            # Identical bytes are a re-send (a modality retrying after a lost response): no-op.
            # Different bytes under the same UID are a corrected version: the newer one wins.
            old = InstanceRecord.decode(sop, old_raw)
            if old.sha256 == inc.manifest.sha256:
                return PutOutcome.DUPLICATE
            # Deleting the old version drops the usage of a study it was alone in; the study
            # lives on with the new version, and so does its history.
            usage = self.txn.get(old.study_uid.encode(), db=self.t.usage)
            kept_usage = None if usage is None else (old.study_uid, bytes(usage))
            self.delete_instance(sop)
            outcome = PutOutcome.REPLACED

        for chunk in inc.chunks:
            self._ref_chunk(chunk)
        self.txn.put(sop.encode(), inc.manifest.encode(), db=self.t.manifests)

        series, study, patient, new_series, new_study = self._resolve_parents(inc)
        if new_study:
            patient.n_studies += 1
            self.txn.put(patient.key.encode(), study.uid.encode(), db=self.t.patient_studies)
        if new_series:
            patient.n_series += 1
            study.n_series += 1
            modality = str(series.attrs.get("Modality") or "")
            study.modalities[modality] = study.modalities.get(modality, 0) + 1
            self.txn.put(study.uid.encode(), series.uid.encode(), db=self.t.study_series)

        size = inc.manifest.size
        cls = inc.manifest.sop_class_uid
        patient.n_instances += 1
        study.n_instances += 1
        study.bytes += size
        study.sop_classes[cls] = study.sop_classes.get(cls, 0) + 1
        series.n_instances += 1
        series.bytes += size
        record = InstanceRecord(
            uid=sop,
            series_uid=series.uid,
            study_uid=study.uid,
            sop_class_uid=cls,
            transfer_syntax=inc.manifest.transfer_syntax,
            size=size,
            sha256=inc.manifest.sha256,
            attrs=inc.attrs.instance,
            calling_ae=inc.calling_ae,
            received_at=inc.received_at,
        )
        self.txn.put(sop.encode(), record.encode(), db=self.t.instances)
        self.txn.put(series.uid.encode(), sop.encode(), db=self.t.series_instances)
        self.txn.put(patient.key.encode(), patient.encode(), db=self.t.patients)
        self.txn.put(study.uid.encode(), study.encode(), db=self.t.studies)
        self.txn.put(series.uid.encode(), series.encode(), db=self.t.series)
        if kept_usage is not None and kept_usage[0] == study.uid:
            self.txn.put(study.uid.encode(), kept_usage[1], db=self.t.usage, overwrite=False)
        self._touch_stored(study.uid, inc.received_at)
        return outcome

    def delete_instance(self, sop: str) -> int:
        """Remove an instance and everything only it referenced; returns its size."""
        raw = self.txn.get(sop.encode(), db=self.t.instances)
        if raw is None:
            return 0
        rec = InstanceRecord.decode(sop, raw)
        manifest = Manifest.decode(self.txn.get(sop.encode(), db=self.t.manifests))
        for ref in manifest.chunks:
            self._unref_chunk(ref.digest)
        self.txn.delete(sop.encode(), db=self.t.manifests)
        self.txn.delete(sop.encode(), db=self.t.instances)
        self.txn.delete(rec.series_uid.encode(), sop.encode(), db=self.t.series_instances)

        series = SeriesRecord.decode(
            rec.series_uid, self.txn.get(rec.series_uid.encode(), db=self.t.series)
        )
        study = StudyRecord.decode(
            rec.study_uid, self.txn.get(rec.study_uid.encode(), db=self.t.studies)
        )
        patient = PatientRecord.decode(
            study.patient_key, self.txn.get(study.patient_key.encode(), db=self.t.patients)
        )
        series.n_instances -= 1
        series.bytes -= rec.size
        study.n_instances -= 1
        study.bytes -= rec.size
        patient.n_instances -= 1
        _decrement(study.sop_classes, rec.sop_class_uid)
        if series.n_instances == 0:
            self.txn.delete(series.uid.encode(), db=self.t.series)
            self.txn.delete(study.uid.encode(), series.uid.encode(), db=self.t.study_series)
            study.n_series -= 1
            patient.n_series -= 1
            _decrement(study.modalities, str(series.attrs.get("Modality") or ""))
        else:
            self.txn.put(series.uid.encode(), series.encode(), db=self.t.series)
        if study.n_series == 0:
            self.txn.delete(study.uid.encode(), db=self.t.studies)
            self.txn.delete(study.uid.encode(), db=self.t.usage)
            self.txn.delete(patient.key.encode(), study.uid.encode(), db=self.t.patient_studies)
            patient.n_studies -= 1
        else:
            self.txn.put(study.uid.encode(), study.encode(), db=self.t.studies)
        if patient.n_studies == 0:
            self.txn.delete(patient.key.encode(), db=self.t.patients)
        else:
            self.txn.put(patient.key.encode(), patient.encode(), db=self.t.patients)
        return rec.size

    def delete_study(self, study_uid: str, expect: UsageRecord | None = None) -> int | None:
        """Remove a study and every chunk only it referenced (chunks other studies or
        downloads still reference stay); returns the bytes of its instances (0 if absent).
        With `expect`, nothing is deleted and None returned when the study's usage record
        differs (it was stored to or retrieved since the caller looked), or when a swarm
        download of it is in progress: the deletion is a compare-and-delete."""
        key = study_uid.encode()
        if self.txn.get(key, db=self.t.studies) is None:
            return 0
        if expect is not None:
            raw = self.txn.get(key, db=self.t.usage)
            if raw is None or UsageRecord.decode(raw) != expect:
                return None
            if self.txn.get(key, db=self.t.downloads) is not None:
                return None
        sops: list[str] = []
        cur = self.txn.cursor(db=self.t.study_series)
        series = [bytes(v).decode() for v in cur.iternext_dup()] if cur.set_key(key) else []
        for series_uid in series:
            cur = self.txn.cursor(db=self.t.series_instances)
            if cur.set_key(series_uid.encode()):
                sops.extend(bytes(v).decode() for v in cur.iternext_dup())
        # The last delete_instance drops the study, its usage and an orphaned patient.
        return sum(self.delete_instance(sop) for sop in sops)

    def touch_accessed(self, study_uid: str, when: float) -> None:
        raw = self.txn.get(study_uid.encode(), db=self.t.usage)
        if raw is None:
            return
        usage = UsageRecord.decode(raw)
        usage.last_access = max(usage.last_access, when)
        usage.access_count += 1
        self.txn.put(study_uid.encode(), usage.encode(), db=self.t.usage)

    # -- swarm downloads -------------------------------------------------------------------

    def pin_chunk(self, study_uid: str, chunk: chunking.EncodedChunk) -> bool:
        """Keep a downloaded chunk for `study_uid`'s download, durable and servable before
        its instance is complete; False if that download had pinned it already."""
        study = study_uid.encode()
        if not self.txn.put(study, chunk.ref.digest, db=self.t.download_pins, dupdata=False):
            return False
        self._ref_chunk(chunk)
        return True

    def unpin_study(self, study_uid: str) -> int:
        """Release every chunk the download of `study_uid` pinned; chunks no instance uses
        are deleted. Returns how many pins were released."""
        study = study_uid.encode()
        cur = self.txn.cursor(db=self.t.download_pins)
        digests = [bytes(v) for v in cur.iternext_dup()] if cur.set_key(study) else []
        for digest in digests:
            self._unref_chunk(digest)
        if digests:
            self.txn.delete(study, db=self.t.download_pins)
        self.txn.delete(study, db=self.t.downloads)
        return len(digests)

    def set_download(self, study_uid: str, record: bytes) -> None:
        self.txn.put(study_uid.encode(), record, db=self.t.downloads)

    # -- helpers -------------------------------------------------------------------------

    def _ref_chunk(self, chunk: chunking.EncodedChunk) -> None:
        key = chunk.ref.digest
        raw = self.txn.get(key, db=self.t.chunk_refs)
        if raw is None:
            if chunk.stored is None:
                raise StoreError(f"chunk {key.hex()[:16]} is not in the store")
            self.txn.put(key, chunk.stored, db=self.t.chunks)
            self.txn.put(key, _REF.pack(1, chunk.codec), db=self.t.chunk_refs)
        else:
            count, codec = _REF.unpack(raw)
            self.txn.put(key, _REF.pack(count + 1, codec), db=self.t.chunk_refs)

    def _unref_chunk(self, key: bytes) -> None:
        raw = self.txn.get(key, db=self.t.chunk_refs)
        if raw is None:
            return
        count, codec = _REF.unpack(raw)
        if count <= 1:
            self.txn.delete(key, db=self.t.chunk_refs)
            self.txn.delete(key, db=self.t.chunks)
        else:
            self.txn.put(key, _REF.pack(count - 1, codec), db=self.t.chunk_refs)

    def _resolve_parents(
        self, inc: IncomingInstance
    ) -> tuple[SeriesRecord, StudyRecord, PatientRecord, bool, bool]:
        """Existing parents win: a series stays in the study, and a study with the patient,
        it was first seen under (a conflicting instance is logged by UID only)."""
        sop = inc.manifest.sop_instance_uid
        series: SeriesRecord | None = None
        study_uid = inc.study_uid
        raw = self.txn.get(inc.series_uid.encode(), db=self.t.series)
        if raw is not None:
            series = SeriesRecord.decode(inc.series_uid, raw)
            if series.study_uid != inc.study_uid:
                log.warning(
                    "instance %s: series %s belongs to study %s, not %s; kept there",
                    sop,
                    inc.series_uid,
                    series.study_uid,
                    inc.study_uid,
                )
                study_uid = series.study_uid

        raw = self.txn.get(study_uid.encode(), db=self.t.studies)
        new_study = raw is None
        if raw is not None:
            study = StudyRecord.decode(study_uid, raw)
            if study.patient_key != inc.patient_key:
                log.warning(
                    "instance %s names another patient than its study %s; "
                    "kept under the study's patient",
                    sop,
                    study_uid,
                )
            patient = PatientRecord.decode(
                study.patient_key, self.txn.get(study.patient_key.encode(), db=self.t.patients)
            )
        else:
            praw = self.txn.get(inc.patient_key.encode(), db=self.t.patients)
            patient = (
                PatientRecord.decode(inc.patient_key, praw)
                if praw is not None
                else PatientRecord(inc.patient_key, dict(inc.attrs.patient))
            )
            study = StudyRecord(study_uid, patient.key, dict(inc.attrs.study))

        new_series = series is None
        if series is None:
            series = SeriesRecord(inc.series_uid, study.uid, dict(inc.attrs.series))
        return series, study, patient, new_series, new_study

    def _touch_stored(self, study_uid: str, when: float) -> None:
        raw = self.txn.get(study_uid.encode(), db=self.t.usage)
        usage = UsageRecord.decode(raw) if raw is not None else UsageRecord(when, when)
        usage.last_stored = max(usage.last_stored, when)
        self.txn.put(study_uid.encode(), usage.encode(), db=self.t.usage)


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


class Reader:
    """The store as seen by one read transaction; records are decoded copies."""

    def __init__(self, txn: lmdb.Transaction, t: Tables) -> None:
        self.txn = txn
        self.t = t

    def _get(self, key: str, db: lmdb._Database) -> memoryview | None:
        return self.txn.get(key.encode(), db=db)

    def patient(self, key: str) -> PatientRecord | None:
        raw = self._get(key, self.t.patients)
        return None if raw is None else PatientRecord.decode(key, raw)

    def study(self, uid: str) -> StudyRecord | None:
        raw = self._get(uid, self.t.studies)
        return None if raw is None else StudyRecord.decode(uid, raw)

    def series(self, uid: str) -> SeriesRecord | None:
        raw = self._get(uid, self.t.series)
        return None if raw is None else SeriesRecord.decode(uid, raw)

    def instance(self, uid: str) -> InstanceRecord | None:
        raw = self._get(uid, self.t.instances)
        return None if raw is None else InstanceRecord.decode(uid, raw)

    def manifest(self, uid: str) -> Manifest | None:
        raw = self._get(uid, self.t.manifests)
        return None if raw is None else Manifest.decode(raw)

    def usage(self, study_uid: str) -> UsageRecord | None:
        raw = self._get(study_uid, self.t.usage)
        return None if raw is None else UsageRecord.decode(raw)

    def patients(self) -> Iterator[PatientRecord]:
        for key, raw in self.txn.cursor(db=self.t.patients):
            yield PatientRecord.decode(bytes(key).decode(), raw)

    def studies(self) -> Iterator[StudyRecord]:
        for key, raw in self.txn.cursor(db=self.t.studies):
            yield StudyRecord.decode(bytes(key).decode(), raw)

    def all_series(self) -> Iterator[SeriesRecord]:
        for key, raw in self.txn.cursor(db=self.t.series):
            yield SeriesRecord.decode(bytes(key).decode(), raw)

    def all_instances(self) -> Iterator[InstanceRecord]:
        for key, raw in self.txn.cursor(db=self.t.instances):
            yield InstanceRecord.decode(bytes(key).decode(), raw)

    def studies_of(self, patient_key: str) -> Iterator[StudyRecord]:
        for uid in self._children(patient_key, self.t.patient_studies):
            if (rec := self.study(uid)) is not None:
                yield rec

    def series_of(self, study_uid: str) -> Iterator[SeriesRecord]:
        for uid in self._children(study_uid, self.t.study_series):
            if (rec := self.series(uid)) is not None:
                yield rec

    def instances_of(self, series_uid: str) -> Iterator[InstanceRecord]:
        for uid in self._children(series_uid, self.t.series_instances):
            if (rec := self.instance(uid)) is not None:
                yield rec

    def _children(self, key: str, db: lmdb._Database) -> list[str]:
        cur = self.txn.cursor(db=db)
        if not cur.set_key(key.encode()):
            return []
        return [bytes(v).decode() for v in cur.iternext_dup()]

    def instance_bytes(self, uid: str) -> bytes | None:
        """The instance exactly as received, verified against its SHA-256; None if absent."""
        manifest = self.manifest(uid)
        if manifest is None:
            return None
        parts = []
        for ref in manifest.chunks:
            meta = self.txn.get(ref.digest, db=self.t.chunk_refs)
            stored = self.txn.get(ref.digest, db=self.t.chunks)
            if meta is None or stored is None:
                raise CorruptData(f"instance {uid}: chunk {ref.digest.hex()[:16]} missing")
            _, codec = _REF.unpack(meta)
            try:
                parts.append(chunking.decode(codec, stored, ref.size))
            except (ValueError, zstandard.ZstdError):
                raise CorruptData(
                    f"instance {uid}: chunk {ref.digest.hex()[:16]} cannot be decoded"
                ) from None
        data = b"".join(parts)
        if len(data) != manifest.size or hashlib.sha256(data).digest() != manifest.sha256:
            raise CorruptData(f"instance {uid}: stored bytes do not match their SHA-256")
        return data

    def chunk(self, digest: bytes) -> tuple[int, memoryview] | None:
        """A stored chunk as (codec, stored bytes), valid inside the read transaction."""
        meta = self.txn.get(digest, db=self.t.chunk_refs)
        stored = self.txn.get(digest, db=self.t.chunks)
        if meta is None or stored is None:
            return None
        return _REF.unpack(meta)[1], stored

    def have_prefixes(self, prefixes: list[bytes]) -> list[bool]:
        """For each digest prefix, whether a chunk starting with it is stored (a hint for
        swarm scheduling; every fetched chunk is verified in full)."""
        cur = self.txn.cursor(db=self.t.chunk_refs)
        found = []
        for prefix in prefixes:
            found.append(bool(cur.set_range(prefix)) and bytes(cur.key()).startswith(prefix))
        return found

    def download(self, study_uid: str) -> bytes | None:
        raw = self._get(study_uid, self.t.downloads)
        return None if raw is None else bytes(raw)

    def downloads(self) -> list[str]:
        return [bytes(k).decode() for k, _ in self.txn.cursor(db=self.t.downloads)]

    def pinned(self, study_uid: str) -> set[bytes]:
        return {bytes(d) for d in self._children_raw(study_uid, self.t.download_pins)}

    def _children_raw(self, key: str, db: lmdb._Database) -> list[memoryview]:
        cur = self.txn.cursor(db=db)
        return list(cur.iternext_dup()) if cur.set_key(key.encode()) else []

    def counts(self) -> dict[str, int]:
        entries = {
            name: self.txn.stat(getattr(self.t, name))["entries"]
            for name in ("patients", "studies", "series", "instances", "chunks")
        }
        return entries
