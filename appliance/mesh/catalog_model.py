"""The catalog's I/O-free core: entries and their checks, version vectors, merged study views.

See catalog.py for the contract (entry kinds, payloads, sync and conflict rules); this module
holds what can be tested without LMDB: the canonical encodings, the validation of entries a
peer sent, the version-vector arithmetic a puller uses, and `merge_view`, which turns the
entries of one study into the picture C-FIND and the swarm use.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import zstandard

from appliance.mesh.config import peer_name
from appliance.mesh.errors import PeerInputError
from appliance.store.records import (
    Attrs,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)

DESC = "desc"
HOLD = "hold"
KINDS = (DESC, HOLD)
COMPLETE = "complete"
PARTIAL = "partial"

# Limits on what a peer may make us store or send (every map keyed by peer data is bounded).
MAX_SEQ = (1 << 63) - 1
MAX_DELTA_ENTRIES = 1000  # entries per pull answer, and per apply
DELTA_BYTES = 4 << 20  # default JSON budget of one pull answer (protocol.MAX_JSON_BYTES is 16)
MAX_PAYLOAD_BYTES = 8 << 20  # one payload's canonical JSON (a 3000-image CT is ~2 MiB)
MAX_ORIGINS = 4096  # origins in a version vector
MAX_SERIES = 10_000
MAX_INSTANCES = 50_000
MAX_ATTRS = 128  # keywords per attribute map
MAX_TEXT = 10_240  # characters of one value (LT, the longest text VR: PS3.5 6.2)
MAX_VALUES = 256  # values of one multi-valued attribute
MAX_KEY = 256  # characters of a patient key

VersionVector = dict[str, int]

_SEQ = struct.Struct(">Q")
_UID = re.compile(r"[!-\[\]-~]{1,64}")  # printable ASCII without space and backslash
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_DIGEST_HEX = re.compile(r"[0-9a-f]{64}")
_DESC_KEYS = frozenset({"patient_key", "patient", "study", "series", "instances"})
_INSTANCE_KEYS = frozenset({"series", "sop_class", "ts", "size", "manifest", "attrs"})
_INSTANCE_OPTIONAL = frozenset({"at"})
_HOLD_KEYS = frozenset({"state", "instances", "of", "bytes"})


class MalformedEntry(PeerInputError):
    """A catalog entry, delta or version vector that breaks the rules below; the whole batch
    it came in is refused and nothing is written."""


# -- canonical encodings ------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Compact, sorted, ASCII-only JSON: one byte string per value, and its length is what the
    wire carries (non-ASCII text is escaped there too)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def entry_key(origin: str, kind: str, study_uid: str) -> bytes:
    """The `cat_entries` key: origin NUL kind NUL study UID (none of them can hold a NUL)."""
    return f"{origin}\0{kind}\0{study_uid}".encode()


def split_key(key: bytes) -> tuple[str, str, str]:
    origin, kind, study = bytes(key).decode().split("\0")
    return origin, kind, study


def log_key(origin: str, seq: int) -> bytes:
    """The `cat_log` key: origin NUL big-endian seq, so one origin's log is one sorted range."""
    return origin.encode() + b"\0" + _SEQ.pack(seq)


def pack_seq(seq: int) -> bytes:
    return _SEQ.pack(seq)


def unpack_seq(raw: bytes | memoryview) -> int:
    return _SEQ.unpack_from(raw)[0]


@dataclass(frozen=True)
class CatalogEntry:
    """What `origin` says about one study: a `desc` or `hold` payload, or None (a tombstone).
    `seq` numbers the origin's changes; a higher seq for the same key supersedes."""

    origin: str
    kind: str
    study_uid: str
    seq: int
    payload: dict[str, Any] | None

    @property
    def key(self) -> bytes:
        return entry_key(self.origin, self.kind, self.study_uid)

    @cached_property
    def payload_json(self) -> bytes:
        """The payload's canonical JSON (b"" for a tombstone)."""
        return b"" if self.payload is None else canonical_json(self.payload)

    @cached_property
    def blob(self) -> bytes:
        """The payload as stored: zstd of its canonical JSON (b"" for a tombstone)."""
        if self.payload is None:
            return b""
        return zstandard.ZstdCompressor(level=3).compress(self.payload_json)

    def encode(self) -> bytes:
        """The `cat_entries` value: big-endian u64 seq, then the blob."""
        return _SEQ.pack(self.seq) + self.blob

    @classmethod
    def decode(cls, key: bytes | memoryview, value: bytes | memoryview) -> CatalogEntry:
        """An entry from its `cat_entries` key and value (our own writes: not re-validated)."""
        origin, kind, study = split_key(key)
        value = bytes(value)
        blob = value[_SEQ.size :]
        payload = None
        if blob:
            size = zstandard.frame_content_size(blob)
            if not 0 <= size <= MAX_PAYLOAD_BYTES:
                raise ValueError(f"catalog entry {origin}/{kind}/{study}: bad stored payload")
            payload = json.loads(zstandard.ZstdDecompressor().decompress(blob))
        return cls(origin, kind, study, unpack_seq(value), payload)

    def to_wire(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "kind": self.kind,
            "study": self.study_uid,
            "seq": self.seq,
            "payload": self.payload,
        }

    @classmethod
    def from_wire(cls, obj: Any) -> CatalogEntry:
        """An entry as a peer sent it (parsed JSON), validated; raises MalformedEntry."""
        if not isinstance(obj, dict) or set(obj) != {"origin", "kind", "study", "seq", "payload"}:
            raise MalformedEntry("catalog entry: need origin, kind, study, seq, payload")
        entry = cls(obj["origin"], obj["kind"], obj["study"], obj["seq"], obj["payload"])
        return entry.validate()

    def validate(self) -> CatalogEntry:
        """Check every field against the rules and limits; returns self or raises
        MalformedEntry (naming origin, kind and study, never an attribute value)."""
        if not isinstance(self.origin, str) or peer_name(self.origin) is not None:
            raise MalformedEntry("catalog entry: bad origin name")
        if self.kind not in KINDS:
            raise MalformedEntry(f"catalog entry from {self.origin}: bad kind")
        if not _is_uid(self.study_uid):
            raise MalformedEntry(f"catalog entry from {self.origin}: bad study UID")
        where = f"catalog {self.kind} {self.origin}/{self.study_uid}"
        if not _is_int(self.seq, 1, MAX_SEQ):
            raise MalformedEntry(f"{where}: bad seq")
        if self.payload is None:
            return self
        if self.kind == DESC:
            _check_desc(self.payload, where)
        else:
            _check_hold(self.payload, where)
        try:
            size = len(self.payload_json)
        except (TypeError, ValueError):
            raise MalformedEntry(f"{where}: payload is not JSON") from None
        if size > MAX_PAYLOAD_BYTES:
            raise MalformedEntry(f"{where}: payload of {size} bytes is too large")
        return self


def check_batch(entries: Iterable[CatalogEntry]) -> list[CatalogEntry]:
    """A batch to apply, validated: at most MAX_DELTA_ENTRIES valid entries, each origin's in
    strictly increasing seq order (what a delta guarantees). Raises MalformedEntry."""
    batch = list(entries)
    if len(batch) > MAX_DELTA_ENTRIES:
        raise MalformedEntry(f"catalog batch of {len(batch)} entries is too large")
    last: dict[str, int] = {}
    for entry in batch:
        if not isinstance(entry, CatalogEntry):
            raise MalformedEntry("catalog batch: not an entry")
        entry.validate()
        if entry.seq <= last.get(entry.origin, 0):
            raise MalformedEntry(f"catalog batch: entries of {entry.origin} out of seq order")
        last[entry.origin] = entry.seq
    if len(last) > MAX_ORIGINS:
        raise MalformedEntry("catalog batch: too many origins")
    return batch


@dataclass(frozen=True)
class Delta:
    """One pull answer: entries in seq order per origin, and whether more are waiting."""

    entries: tuple[CatalogEntry, ...]
    more: bool

    def to_wire(self) -> dict[str, Any]:
        return {"entries": [e.to_wire() for e in self.entries], "more": self.more}

    @classmethod
    def from_wire(cls, obj: Any) -> Delta:
        """A pull answer from a peer, validated; raises MalformedEntry."""
        if not isinstance(obj, dict) or not isinstance(obj.get("entries"), list):
            raise MalformedEntry("catalog delta: need entries and more")
        if not isinstance(obj.get("more"), bool):
            raise MalformedEntry("catalog delta: need entries and more")
        if len(obj["entries"]) > MAX_DELTA_ENTRIES:
            raise MalformedEntry("catalog delta: too many entries")
        entries = [CatalogEntry.from_wire(e) for e in obj["entries"]]
        return cls(tuple(check_batch(entries)), obj["more"])


# -- version vectors ----------------------------------------------------------------------


def parse_vv(obj: Any) -> VersionVector:
    """A version vector from a peer ({origin: highest seq}), validated."""
    if not isinstance(obj, dict) or len(obj) > MAX_ORIGINS:
        raise MalformedEntry("version vector: need at most 4096 origins")
    for origin, seq in obj.items():
        if not isinstance(origin, str) or peer_name(origin) is not None:
            raise MalformedEntry("version vector: bad origin name")
        if not _is_int(seq, 0, MAX_SEQ):
            raise MalformedEntry(f"version vector: bad seq for {origin}")
    return dict(obj)


def vv_advance(vv: Mapping[str, int], entries: Iterable[CatalogEntry]) -> VersionVector:
    """`vv` raised to the highest seq per origin among `entries` (what applying a delta does
    to the puller's vector; see catalog.py for why the maximum is safe)."""
    out = dict(vv)
    for e in entries:
        if e.seq > out.get(e.origin, 0):
            out[e.origin] = e.seq
    return out


def vv_covers(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """True when `a` knows everything `b` knows."""
    return all(a.get(origin, 0) >= seq for origin, seq in b.items())


# -- merged view of one study -------------------------------------------------------------


@dataclass(frozen=True)
class InstanceView:
    """One instance as the mesh knows it; `sources` are the describers of this version."""

    uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int
    manifest: bytes  # SHA-256 of the canonical manifest (records.Manifest.digest)
    at: float  # when this version entered the mesh (0.0: not stated)
    attrs: Attrs
    sources: tuple[str, ...]


@dataclass(frozen=True)
class StudyView:
    """The merged picture of one study across origins (see `merge_view`)."""

    study_uid: str
    patient_key: str
    patient: Attrs
    study: Attrs
    series: dict[str, Attrs]  # series with at least one instance
    instances: dict[str, InstanceView]  # by SOP Instance UID, sorted
    holders: dict[str, dict[str, Any]]  # origin -> hold payload (tombstones excluded)

    @property
    def described(self) -> bool:
        return bool(self.instances)

    def records(
        self,
    ) -> tuple[PatientRecord, StudyRecord, list[SeriesRecord], list[InstanceRecord]] | None:
        """Index records as the local store would hold them for exactly these instances
        (counters included), for C-FIND; None when nothing describes the study. The patient's
        counters cover this study only (sum them over a patient's studies). An instance's
        `sha256` is empty (the catalog carries its manifest digest, which pins the hash) and
        its `received_at` is `at`."""
        if not self.instances:
            return self._summary_records() if self.study else None
        series = {
            uid: SeriesRecord(uid, self.study_uid, dict(attrs))
            for uid, attrs in self.series.items()
        }
        study = StudyRecord(self.study_uid, self.patient_key, dict(self.study))
        classes: Counter[str] = Counter()
        instances = []
        for inst in self.instances.values():
            se = series[inst.series_uid]
            se.n_instances += 1
            se.bytes += inst.size
            study.n_instances += 1
            study.bytes += inst.size
            classes[inst.sop_class_uid] += 1
            instances.append(
                InstanceRecord(
                    uid=inst.uid,
                    series_uid=inst.series_uid,
                    study_uid=self.study_uid,
                    sop_class_uid=inst.sop_class_uid,
                    transfer_syntax=inst.transfer_syntax,
                    size=inst.size,
                    sha256=b"",
                    attrs=dict(inst.attrs),
                    calling_ae="",
                    received_at=inst.at,
                )
            )
        study.n_series = len(series)
        study.modalities = dict(
            Counter(str(s.attrs.get("Modality") or "") for s in series.values())
        )
        study.sop_classes = dict(classes)
        patient = PatientRecord(
            self.patient_key, dict(self.patient), 1, study.n_series, study.n_instances
        )
        return patient, study, sorted(series.values(), key=lambda s: s.uid), instances

    def _summary_records(
        self,
    ) -> tuple[PatientRecord, StudyRecord, list[SeriesRecord], list[InstanceRecord]]:
        """A study described without instances (what the central PACS holds, published by a
        replica: appliance/central): study-level records, the counts as the PACS gave them."""
        attrs = self.study
        study = StudyRecord(self.study_uid, self.patient_key, dict(attrs))
        study.n_series = _count(attrs.get("NumberOfStudyRelatedSeries"))
        study.n_instances = _count(attrs.get("NumberOfStudyRelatedInstances"))
        modalities = attrs.get("ModalitiesInStudy") or []
        modalities = modalities if isinstance(modalities, list) else [modalities]
        study.modalities = {str(m): 1 for m in modalities if m}
        patient = PatientRecord(
            self.patient_key, dict(self.patient), 1, study.n_series, study.n_instances
        )
        return patient, study, [], []


def _count(value: Any) -> int:
    try:
        return max(0, int(str(value or "0").strip() or 0))
    except ValueError:
        return 0


def merge_view(study_uid: str, entries: Iterable[CatalogEntry]) -> StudyView:
    """Merge the entries of one study (any origins, both kinds, tombstones ignored).

    Descriptions are ranked: those listing instances first, then one whose origin holds
    the study complete, then the one with the newest instance version (`at`), then by
    origin name (so every gateway picks the same). Patient and study attributes and the
    patient key come from the best description; a series' attributes from the best
    description listing that series. Instances are the union of all descriptions. When
    descriptions disagree on an instance's manifest digest, the instance was replaced (a
    corrected re-send, as in the local store): the version with the latest `at` wins, then
    the one from the better-ranked description, then the higher digest. The winning
    version's fields come from the best description carrying it.
    """
    latest: dict[tuple[str, str], CatalogEntry] = {}
    for e in entries:
        if e.study_uid != study_uid:
            raise ValueError(f"entry for study {e.study_uid} merged into {study_uid}")
        found = latest.get((e.origin, e.kind))
        if found is None or e.seq > found.seq:
            latest[(e.origin, e.kind)] = e
    holders = {
        e.origin: e.payload
        for e in sorted(latest.values(), key=lambda e: e.origin)
        if e.kind == HOLD and e.payload is not None
    }
    descs = [e for e in latest.values() if e.kind == DESC and e.payload is not None]

    def rank(e: CatalogEntry) -> tuple[bool, bool, float, str]:
        # A description without instances (a central PACS summary) ranks last: attributes
        # come from the instances' holders whenever there are any.
        described = bool(_payload(e)["instances"])
        complete = (holders.get(e.origin) or {}).get("state") == COMPLETE
        newest = max((_at(i) for i in _payload(e)["instances"].values()), default=0.0)
        return described, complete, newest, e.origin

    descs.sort(key=rank, reverse=True)
    if not descs:
        return StudyView(study_uid, "", {}, {}, {}, {}, holders)
    best = _payload(descs[0])

    # SOP UID -> [(rank position of the describing desc, its origin, instance)], best first
    candidates: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
    for pos, d in enumerate(descs):
        for sop, inst in _payload(d)["instances"].items():
            candidates.setdefault(sop, []).append((pos, d.origin, inst))
    instances: dict[str, InstanceView] = {}
    series: dict[str, Attrs] = {}
    for sop in sorted(candidates):
        cands = candidates[sop]
        version = max(cands, key=lambda c: (_at(c[2]), -c[0], c[2]["manifest"]))[2]["manifest"]
        same = [c for c in cands if c[2]["manifest"] == version]
        inst = same[0][2]
        se = inst["series"]
        if se not in series:
            series[se] = next(
                _payload(d)["series"][se] for d in descs if se in _payload(d)["series"]
            )
        instances[sop] = InstanceView(
            uid=sop,
            series_uid=se,
            sop_class_uid=inst["sop_class"],
            transfer_syntax=inst["ts"],
            size=inst["size"],
            manifest=bytes.fromhex(version),
            at=_at(inst),
            attrs=inst["attrs"],
            sources=tuple(sorted(c[1] for c in same)),
        )
    return StudyView(
        study_uid=study_uid,
        patient_key=best["patient_key"],
        patient=best["patient"],
        study=best["study"],
        series=dict(sorted(series.items())),
        instances=instances,
        holders=holders,
    )


# -- validation helpers -------------------------------------------------------------------


def _payload(e: CatalogEntry) -> dict[str, Any]:
    assert e.payload is not None
    return e.payload


def _at(inst: Mapping[str, Any]) -> float:
    return float(inst.get("at", 0.0))


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _is_uid(v: Any) -> bool:
    return isinstance(v, str) and _UID.fullmatch(v) is not None


def _is_scalar(v: Any) -> bool:
    if v is None:
        return True
    if type(v) is int:
        return -MAX_SEQ <= v <= MAX_SEQ
    if type(v) is str:
        return len(v) <= MAX_TEXT
    return type(v) is float and math.isfinite(v)


def _check_attrs(attrs: Any, where: str) -> None:
    if not isinstance(attrs, dict) or len(attrs) > MAX_ATTRS:
        raise MalformedEntry(f"{where}: attributes must be a map of at most {MAX_ATTRS}")
    for keyword, value in attrs.items():
        if not isinstance(keyword, str) or not _KEYWORD.fullmatch(keyword):
            raise MalformedEntry(f"{where}: bad attribute keyword")
        if isinstance(value, list):
            if len(value) > MAX_VALUES or not all(_is_scalar(v) for v in value):
                raise MalformedEntry(f"{where}: bad value of {keyword}")
        elif not _is_scalar(value):
            raise MalformedEntry(f"{where}: bad value of {keyword}")


def _check_desc(p: Any, where: str) -> None:
    if not isinstance(p, dict) or set(p) != _DESC_KEYS:
        raise MalformedEntry(f"{where}: need exactly {sorted(_DESC_KEYS)}")
    key = p["patient_key"]
    if not isinstance(key, str) or len(key) > MAX_KEY:
        raise MalformedEntry(f"{where}: bad patient key")
    _check_attrs(p["patient"], f"{where} patient")
    _check_attrs(p["study"], f"{where} study")
    series, instances = p["series"], p["instances"]
    if not isinstance(series, dict) or len(series) > MAX_SERIES:
        raise MalformedEntry(f"{where}: series must be a map of at most {MAX_SERIES}")
    if not isinstance(instances, dict) or len(instances) > MAX_INSTANCES:
        raise MalformedEntry(f"{where}: instances must be a map of at most {MAX_INSTANCES}")
    for uid, attrs in series.items():
        if not _is_uid(uid):
            raise MalformedEntry(f"{where}: bad series UID")
        _check_attrs(attrs, f"{where} series {uid}")
    for sop, inst in instances.items():
        if not _is_uid(sop):
            raise MalformedEntry(f"{where}: bad SOP Instance UID")
        iwhere = f"{where} instance {sop}"
        if not isinstance(inst, dict) or not (
            _INSTANCE_KEYS <= set(inst) <= _INSTANCE_KEYS | _INSTANCE_OPTIONAL
        ):
            raise MalformedEntry(f"{iwhere}: need {sorted(_INSTANCE_KEYS)} (and optional at)")
        if not isinstance(inst["series"], str) or inst["series"] not in series:
            raise MalformedEntry(f"{iwhere}: its series is not described")
        if not (_is_uid(inst["sop_class"]) and _is_uid(inst["ts"])):
            raise MalformedEntry(f"{iwhere}: bad SOP class or transfer syntax UID")
        if not _is_int(inst["size"], 0, MAX_SEQ):
            raise MalformedEntry(f"{iwhere}: bad size")
        if not isinstance(inst["manifest"], str) or not _DIGEST_HEX.fullmatch(inst["manifest"]):
            raise MalformedEntry(f"{iwhere}: manifest must be a SHA-256 in lowercase hex")
        at = inst.get("at", 0.0)
        if type(at) not in (int, float) or not (math.isfinite(at) and 0 <= at < 1e11):
            raise MalformedEntry(f"{iwhere}: bad at")
        _check_attrs(inst["attrs"], iwhere)


def _check_hold(p: Any, where: str) -> None:
    if not isinstance(p, dict) or set(p) != _HOLD_KEYS:
        raise MalformedEntry(f"{where}: need exactly {sorted(_HOLD_KEYS)}")
    if p["state"] not in (COMPLETE, PARTIAL):
        raise MalformedEntry(f"{where}: state must be complete or partial")
    held, total = p["instances"], p["of"]
    if not (_is_int(total, 0, MAX_INSTANCES) and _is_int(held, 0, total)):
        raise MalformedEntry(f"{where}: need 0 <= instances <= of <= {MAX_INSTANCES}")
    if p["state"] == COMPLETE and held != total:
        raise MalformedEntry(f"{where}: complete with instances != of")
    if not _is_int(p["bytes"], 0, MAX_SEQ):
        raise MalformedEntry(f"{where}: bad bytes")
