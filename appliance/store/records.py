"""The store's records: manifests, index entries per level, usage; with their byte encodings.

Records are JSON (compact, sorted keys) so they stay readable with `mdb_dump` and stable
across versions; attribute values are JSON-able DICOM values (see appliance/dicom/attributes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from appliance.store.chunking import ChunkRef, EncodedChunk

Attrs = dict[str, Any]  # DICOM keyword -> JSON-able value (str, int, float, list, None)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


@dataclass(frozen=True)
class Manifest:
    """What an instance is made of: ordered chunks, sizes, transfer syntax, overall hash."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int
    sha256: bytes
    chunks: tuple[ChunkRef, ...]

    def encode(self) -> bytes:
        """Canonical bytes: the same manifest always encodes to the same bytes (hashable)."""
        return _dumps(
            {
                "v": 1,
                "sop_instance_uid": self.sop_instance_uid,
                "sop_class_uid": self.sop_class_uid,
                "transfer_syntax": self.transfer_syntax,
                "size": self.size,
                "sha256": self.sha256.hex(),
                "chunks": [[c.digest.hex(), c.size] for c in self.chunks],
            }
        )

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding (what the mesh catalog will carry)."""
        return hashlib.sha256(self.encode()).digest()

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Manifest:
        d = json.loads(bytes(raw))
        if d.get("v") != 1:
            raise ValueError(f"unsupported manifest version {d.get('v')!r}")
        return cls(
            sop_instance_uid=d["sop_instance_uid"],
            sop_class_uid=d["sop_class_uid"],
            transfer_syntax=d["transfer_syntax"],
            size=d["size"],
            sha256=bytes.fromhex(d["sha256"]),
            chunks=tuple(ChunkRef(bytes.fromhex(h), n) for h, n in d["chunks"]),
        )


@dataclass(frozen=True)
class LevelAttrs:
    """The indexed attributes of one instance, split by query/retrieve level."""

    patient: Attrs
    study: Attrs
    series: Attrs
    instance: Attrs


@dataclass(frozen=True)
class IncomingInstance:
    """A received instance, hashed and chunked, ready for one durable write."""

    manifest: Manifest
    chunks: tuple[EncodedChunk, ...]
    study_uid: str
    series_uid: str
    patient_key: str
    attrs: LevelAttrs
    calling_ae: str
    received_at: float


def patient_key(patient_id: str, issuer: str) -> str:
    """Patients are identified by Patient ID within its issuer (PS3.3 C.7.1.1)."""
    return _dumps([patient_id, issuer]).decode()


@dataclass
class PatientRecord:
    key: str
    attrs: Attrs
    n_studies: int = 0
    n_series: int = 0
    n_instances: int = 0

    def encode(self) -> bytes:
        return _dumps([self.attrs, self.n_studies, self.n_series, self.n_instances])

    @classmethod
    def decode(cls, key: str, raw: bytes | memoryview) -> PatientRecord:
        attrs, n_st, n_se, n_in = json.loads(bytes(raw))
        return cls(key, attrs, n_st, n_se, n_in)


@dataclass
class StudyRecord:
    uid: str
    patient_key: str
    attrs: Attrs
    n_series: int = 0
    n_instances: int = 0
    bytes: int = 0
    modalities: dict[str, int] = field(default_factory=dict)  # modality -> number of series
    sop_classes: dict[str, int] = field(default_factory=dict)  # SOP class -> number of instances

    def encode(self) -> bytes:
        return _dumps(
            [
                self.patient_key,
                self.attrs,
                self.n_series,
                self.n_instances,
                self.bytes,
                self.modalities,
                self.sop_classes,
            ]
        )

    @classmethod
    def decode(cls, uid: str, raw: bytes | memoryview) -> StudyRecord:
        pkey, attrs, n_se, n_in, nbytes, mods, classes = json.loads(bytes(raw))
        return cls(uid, pkey, attrs, n_se, n_in, nbytes, mods, classes)


@dataclass
class SeriesRecord:
    uid: str
    study_uid: str
    attrs: Attrs
    n_instances: int = 0
    bytes: int = 0

    def encode(self) -> bytes:
        return _dumps([self.study_uid, self.attrs, self.n_instances, self.bytes])

    @classmethod
    def decode(cls, uid: str, raw: bytes | memoryview) -> SeriesRecord:
        study_uid, attrs, n_in, nbytes = json.loads(bytes(raw))
        return cls(uid, study_uid, attrs, n_in, nbytes)


@dataclass
class InstanceRecord:
    uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int
    sha256: bytes
    attrs: Attrs
    calling_ae: str
    received_at: float

    def encode(self) -> bytes:
        return _dumps(
            [
                self.series_uid,
                self.study_uid,
                self.sop_class_uid,
                self.transfer_syntax,
                self.size,
                self.sha256.hex(),
                self.attrs,
                self.calling_ae,
                self.received_at,
            ]
        )

    @classmethod
    def decode(cls, uid: str, raw: bytes | memoryview) -> InstanceRecord:
        se, st, cls_uid, ts, size, sha, attrs, ae, at = json.loads(bytes(raw))
        return cls(uid, se, st, cls_uid, ts, size, bytes.fromhex(sha), attrs, ae, at)


@dataclass
class UsageRecord:
    """Per-study usage statistics, the input of eviction policies."""

    first_stored: float
    last_stored: float
    last_access: float = 0.0
    access_count: int = 0

    def encode(self) -> bytes:
        return _dumps([self.first_stored, self.last_stored, self.last_access, self.access_count])

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> UsageRecord:
        return cls(*json.loads(bytes(raw)))
