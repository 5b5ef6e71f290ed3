"""C-FIND over the local index: identifier -> query -> matching records -> response identifiers.

Matching follows PS3.4 C.2.2.2 (see matching.py). Query levels and keys follow the Patient
Root and Study Root information models (PS3.4 C.6.1, C.6.2). We are lenient where PS3.4
C.4.1.2.2.1 lets an SCP be: keys of levels above the query level may be any attribute (as in
relational queries), not only the unique keys; keys below the query level are ignored and
answered with a zero-length value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from appliance.dicom import attributes, status
from appliance.dicom.matching import Matcher, compile_matcher
from appliance.store.index import Reader
from appliance.store.records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODEL_LEVELS = {"patient": LEVELS, "study": LEVELS[1:]}
_RANK = {level: i for i, level in enumerate(LEVELS)}

# Keys the SCP computes (PS3.4 C.3.4 "additional query/retrieve attributes") and their level.
COMPUTED_LEVEL = {
    "NumberOfPatientRelatedStudies": "PATIENT",
    "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT",
    "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY",
    "ModalitiesInStudy": "STUDY",
    "SOPClassesInStudy": "STUDY",
    "NumberOfSeriesRelatedInstances": "SERIES",
    "AvailableTransferSyntaxUID": "IMAGE",
}
_STORED_LEVEL = {kw: level for level, keys in attributes.LEVEL_KEYS.items() for kw in keys}
# Answered at every level, never matched.
_RESPONSE_ONLY = {"RetrieveAETitle", "InstanceAvailability", "SpecificCharacterSet"}

# Rows gathered per query before answering. Answers are built after the read transaction
# ends (a slow client must not pin LMDB pages); past this bound we refuse with 0xA700 and ask
# for a narrower query instead of holding an unbounded result in memory.
MAX_MATCHES = 50_000


class QueryError(Exception):
    """The identifier cannot be processed; `status` is the C-FIND/C-GET/C-MOVE failure."""

    def __init__(self, status_code: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status_code
        self.comment = comment[:64]


@dataclass(frozen=True)
class Key:
    """One element of the request identifier."""

    tag: int
    keyword: str
    vr: str
    level: str | None  # where the value lives; None = not supported (answered empty)


@dataclass
class Query:
    model: str
    level: str
    keys: list[Key]
    matchers: dict[str, dict[str, Matcher]] = field(default_factory=dict)  # level -> keyword
    uids: dict[str, list[str]] = field(default_factory=dict)  # level -> unique key values


@dataclass(frozen=True)
class Row:
    """The records of one match, from its level up to the patient."""

    patient: PatientRecord
    study: StudyRecord | None = None
    series: SeriesRecord | None = None
    instance: InstanceRecord | None = None


_UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


def parse(identifier: Dataset, model: str) -> Query:
    """A query from a C-FIND identifier; raises QueryError (0xA900) when it is unusable."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in MODEL_LEVELS[model]:
        raise QueryError(
            status.QR_IDENTIFIER_MISMATCH, f"invalid QueryRetrieveLevel {level!r} for model"
        )
    query = Query(model=model, level=level, keys=[])
    for elem in identifier:
        keyword = elem.keyword
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or elem.tag.group == 0:
            continue
        key_level = _level_of(keyword, model)
        usable = key_level is not None and _RANK[key_level] <= _RANK[level]
        query.keys.append(Key(int(elem.tag), keyword, elem.VR, key_level if usable else None))
        if not usable or keyword in _RESPONSE_ONLY or key_level is None:
            continue
        value = _query_value(elem)
        matcher = compile_matcher(_matching_vr(elem.VR), value)
        if matcher is None:
            continue
        query.matchers.setdefault(key_level, {})[keyword] = matcher
        if keyword == _UNIQUE_KEY[key_level] and elem.VR == "UI":
            query.uids[key_level] = [u.strip() for u in str(value).split("\\") if u.strip()]
    return query


def _level_of(keyword: str, model: str) -> str | None:
    if keyword in _RESPONSE_ONLY:
        return "PATIENT" if model == "patient" else "STUDY"
    # In Study Root, patient attributes are study-level keys (PS3.4 C.6.2.1); they still live
    # on the patient record, which every study row carries.
    return _STORED_LEVEL.get(keyword) or COMPUTED_LEVEL.get(keyword)


def _matching_vr(vr: str) -> str:
    return vr.split(" or ")[0] if vr else "UN"


def _query_value(elem: DataElement) -> Any:
    value = elem.value
    if value is None:
        return None
    if isinstance(value, (MultiValue, list)):
        if elem.VR in ("US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"):
            return list(value)
        return "\\".join(str(v) for v in value)
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, bytes):
        return None  # binary keys (e.g. OB) are never matched
    return value


# -- execution --------------------------------------------------------------------------------


def execute(query: Query, reader: Reader, limit: int = MAX_MATCHES) -> list[Row]:
    """All rows matching `query`, gathered inside the caller's read transaction."""
    rows: list[Row] = []
    for row in _rows(query, reader):
        rows.append(row)
        if len(rows) > limit:
            raise QueryError(status.QR_OUT_OF_RESOURCES, "too many matches; narrow the query")
    return rows


def _rows(query: Query, r: Reader) -> Iterator[Row]:
    patients = _cache(r.patient)
    if query.level == "PATIENT":
        for p in _patients(query, r):
            yield Row(p)
        return
    for study in _studies(query, r):
        patient = patients(study.patient_key)
        if patient is None or not _ok(query, "PATIENT", patient):
            continue
        if query.level == "STUDY":
            yield Row(patient, study)
            continue
        for series in _series(query, r, study):
            if query.level == "SERIES":
                yield Row(patient, study, series)
                continue
            for inst in _instances(query, r, series):
                yield Row(patient, study, series, inst)


def _patients(query: Query, r: Reader) -> Iterator[PatientRecord]:
    return (p for p in r.patients() if _ok(query, "PATIENT", p))


def _studies(query: Query, r: Reader) -> Iterator[StudyRecord]:
    uids = query.uids.get("STUDY")
    if uids is not None:
        candidates: Iterator[StudyRecord | None] = (r.study(u) for u in uids)
    elif "PATIENT" in query.matchers:
        candidates = (s for p in _patients(query, r) for s in r.studies_of(p.key))
    elif "SERIES" in query.uids or "IMAGE" in query.uids:
        candidates = _studies_from_below(query, r)
    else:
        candidates = r.studies()
    return (s for s in candidates if s is not None and _ok(query, "STUDY", s))


def _studies_from_below(query: Query, r: Reader) -> Iterator[StudyRecord | None]:
    """Studies holding the requested series/instances (a lookup instead of a full scan)."""
    seen: set[str] = set()
    series_uids = list(query.uids.get("SERIES", []))
    for uid in query.uids.get("IMAGE", []):
        if (inst := r.instance(uid)) is not None:
            series_uids.append(inst.series_uid)
    for uid in series_uids:
        series = r.series(uid)
        if series is not None and series.study_uid not in seen:
            seen.add(series.study_uid)
            yield r.study(series.study_uid)


def _series(query: Query, r: Reader, study: StudyRecord) -> Iterator[SeriesRecord]:
    return _children(query, "SERIES", r.series, "study_uid", study.uid, r.series_of)


def _instances(query: Query, r: Reader, series: SeriesRecord) -> Iterator[InstanceRecord]:
    return _children(query, "IMAGE", r.instance, "series_uid", series.uid, r.instances_of)


def _children(
    query: Query,
    level: str,
    lookup: Callable[[str], Any],
    parent_field: str,
    parent_uid: str,
    list_children: Callable[[str], Iterator[Any]],
) -> Iterator[Any]:
    """A parent's matching children: the requested UIDs looked up directly when the query
    names them (belonging to this parent), otherwise every child."""
    uids = query.uids.get(level)
    if uids is not None:
        found = (lookup(u) for u in uids)
        candidates = (c for c in found if c is not None and getattr(c, parent_field) == parent_uid)
    else:
        candidates = list_children(parent_uid)
    return (c for c in candidates if _ok(query, level, c))


def _ok(query: Query, level: str, record: Any) -> bool:
    matchers = query.matchers.get(level)
    if not matchers:
        return True
    return all(m.matches(value_of(record, kw)) for kw, m in matchers.items())


def _cache(get: Callable[[str], Any]) -> Callable[[str], Any]:
    memo: dict[str, Any] = {}

    def cached(key: str) -> Any:
        if key not in memo:
            memo[key] = get(key)
        return memo[key]

    return cached


def value_of(record: Any, keyword: str) -> Any:
    """A stored or computed attribute of an index record (None when absent)."""
    if isinstance(record, PatientRecord):
        computed = {
            "NumberOfPatientRelatedStudies": record.n_studies,
            "NumberOfPatientRelatedSeries": record.n_series,
            "NumberOfPatientRelatedInstances": record.n_instances,
        }
    elif isinstance(record, StudyRecord):
        computed = {
            "NumberOfStudyRelatedSeries": record.n_series,
            "NumberOfStudyRelatedInstances": record.n_instances,
            "ModalitiesInStudy": sorted(m for m in record.modalities if m),
            "SOPClassesInStudy": sorted(record.sop_classes),
        }
    elif isinstance(record, SeriesRecord):
        computed = {"NumberOfSeriesRelatedInstances": record.n_instances}
    else:
        computed = {"AvailableTransferSyntaxUID": record.transfer_syntax}
    if keyword in computed:
        value = computed[keyword]
        return str(value) if isinstance(value, int) else value  # IS values are strings
    return record.attrs.get(keyword)


# -- answers ------------------------------------------------------------------------------


def answer(query: Query, row: Row, retrieve_ae: str) -> Dataset:
    """The response identifier for one row: every requested key, in the request's VRs."""
    ds = Dataset()
    records = {"PATIENT": row.patient, "STUDY": row.study, "SERIES": row.series,
               "IMAGE": row.instance}  # fmt: skip
    non_ascii = False
    for key in query.keys:
        if key.keyword == "RetrieveAETitle":
            value: Any = retrieve_ae
        elif key.keyword == "InstanceAvailability":
            value = "ONLINE"
        elif key.level is None or records[key.level] is None:
            value = None
        else:
            value = value_of(records[key.level], key.keyword)
        value = _element_value(value, key.vr)
        non_ascii = non_ascii or _has_non_ascii(value)
        ds.add_new(key.tag, key.vr, value)
    ds.QueryRetrieveLevel = query.level
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8 (PS3.3 C.12.1.1.2)
    return ds


def _element_value(value: Any, vr: str) -> Any:
    if value is None:
        return None
    if vr in ("US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"):
        if isinstance(value, list):
            return [v for v in value if isinstance(v, (int, float))]
        return value if isinstance(value, (int, float)) else None
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value)


def _has_non_ascii(value: Any) -> bool:
    if isinstance(value, str):
        return not value.isascii()
    if isinstance(value, list):
        return any(isinstance(v, str) and not v.isascii() for v in value)
    return False
