"""The central broker's I/O-free core: query identifiers and answers on the mesh wire, their
merge into a local C-FIND, catalog summaries of central studies, and the split of a study's
instances among the replicas.

Wire (JSON over the mesh HTTP API, admitted peers only):
    POST /mesh/v1/central/find       {"model": "study"|"patient", "identifier": DICOM JSON}
        -> {"answers": [DICOM JSON, ...]}                 (PS3.18 F.2 JSON model)
    POST /mesh/v1/central/instances  {"study": UID}
        -> {"instances": [{"sop": UID, "series": UID, "class": UID}, ...]}
    POST /mesh/v1/central/retrieve   {"study": UID, "instances": [as above], "of": int}
        -> {"accepted": int}   (the replica C-MOVEs them to itself in the background)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from appliance.dicom.attributes import PATIENT_KEYS, STUDY_KEYS, to_json_value, vr_of
from appliance.dicom.query import Query
from appliance.mesh.catalog_model import COMPLETE, DESC, HOLD
from appliance.mesh.errors import PeerInputError
from appliance.store.records import patient_key

MAX_ANSWERS = 5000  # answers taken from one replica
MAX_INSTANCES = 50_000  # instances of one study (the catalog's limit too)
UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# Return keys a replica adds to a STUDY-level query, to publish a summary of each match.
SUMMARY_KEYS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_COUNTS = ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
_DICOM_UID = re.compile(r"[0-9][0-9.]{0,63}")  # PS3.5 9.1: digits and dots only
_UID = re.compile(r"[!-\[\]-~]{1,64}")  # as the catalog: printable, no space or backslash


class CentralInputError(PeerInputError):
    """A central request or answer from a peer that breaks the rules above."""


@dataclass(frozen=True)
class ListedInstance:
    """One instance of a study as the central PACS lists it (IMAGE-level C-FIND)."""

    sop: str
    series: str
    sop_class: str

    def to_wire(self) -> dict[str, str]:
        return {"sop": self.sop, "series": self.series, "class": self.sop_class}


def is_uid(value: Any) -> bool:
    return isinstance(value, str) and _UID.fullmatch(value) is not None


# -- identifiers and answers ----------------------------------------------------------------


def to_wire(ds: Dataset) -> dict[str, Any]:
    return ds.to_json_dict()


def from_wire(obj: Any) -> Dataset:
    """A dataset a peer sent as DICOM JSON; raises CentralInputError."""
    if not isinstance(obj, dict):
        raise CentralInputError("central: a dataset must be a DICOM JSON object")
    try:
        return Dataset.from_json(obj)
    except Exception as exc:
        raise CentralInputError(f"central: bad DICOM JSON ({exc.__class__.__name__})") from None


def answers_from_wire(obj: Any) -> list[Dataset]:
    """A replica's find answer; malformed items are dropped, at most MAX_ANSWERS kept."""
    items = obj.get("answers") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise CentralInputError("central find: need answers")
    out = []
    for item in items[:MAX_ANSWERS]:
        try:
            out.append(from_wire(item))
        except CentralInputError:
            continue
    return out


def level_of(identifier: Dataset) -> str:
    return str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()


def unique_value(ds: Dataset, level: str) -> str:
    """The answer's unique key at `level` (what results are de-duplicated by)."""
    keyword = UNIQUE.get(level)
    value = ds.get(keyword) if keyword else None
    return str(value or "").strip()


def with_summary_keys(identifier: Dataset) -> Dataset:
    """A copy of a STUDY-level identifier with empty return keys for a summary added (an
    empty key matches everything: PS3.4 C.2.2.2.3)."""
    ds = Dataset()
    ds.update(identifier)
    if level_of(identifier) == "STUDY":
        for keyword in SUMMARY_KEYS:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return ds


def merge(seen: set[str], answers: Iterable[Dataset], level: str) -> list[Dataset]:
    """Answers whose unique key is not in `seen` (local results first), each key once;
    `seen` grows with what is returned."""
    out = []
    for ds in answers:
        key = unique_value(ds, level)
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(ds)
    return out


def project(query: Query, ds: Dataset, retrieve_ae: str) -> Dataset:
    """A central answer as our C-FIND response: exactly the requested keys, the retrieve
    AE title ours (the study is retrieved through this gateway)."""
    out = Dataset()
    non_ascii = False
    for key in query.keys:
        value: Any = None
        if key.keyword == "RetrieveAETitle":
            value = retrieve_ae
        elif key.keyword == "InstanceAvailability":
            value = "NEARLINE"  # PS3.4 C.4.1.1.3.2: retrievable, not immediately here
        elif key.tag in ds:
            value = ds[key.tag].value
        if isinstance(value, str):
            non_ascii = non_ascii or not value.isascii()
        elif value is not None and key.vr == "PN":
            non_ascii = non_ascii or not str(value).isascii()
        try:
            out.add_new(key.tag, key.vr, value)
        except Exception:
            out.add_new(key.tag, key.vr, None)
    out.QueryRetrieveLevel = query.level
    if non_ascii:
        out.SpecificCharacterSet = "ISO_IR 192"
    return out


# -- catalog summaries ----------------------------------------------------------------------


def _attrs(ds: Dataset, keywords: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keyword in keywords:
        if keyword not in ds:
            continue
        try:
            value = to_json_value(ds[keyword].value, vr_of(keyword))
        except Exception:
            continue
        if value is not None:
            out[keyword] = value
    return out


def _count(ds: Dataset, keyword: str) -> int:
    try:
        return max(0, int(str(ds.get(keyword, "") or "0").strip() or 0))
    except ValueError:
        return 0


def single_study(identifier: Dataset) -> str | None:
    """The Study Instance UID a query asks for, when it asks for exactly one (no list, no
    wildcard, no other key narrowing the match): its empty answer means "not there"."""
    uid = str(identifier.get("StudyInstanceUID", "") or "").strip()
    if _DICOM_UID.fullmatch(uid) is None:  # "*", "?" and lists ask for more than one
        return None
    for elem in identifier:
        if elem.keyword in ("StudyInstanceUID", "QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        if elem.value not in (None, "", b""):
            return None  # another matching key: an empty answer proves nothing
    return uid


def summary(ds: Dataset) -> list[tuple[str, str, dict[str, Any]]]:
    """Catalog changes (kind, study UID, payload) saying the central PACS holds the study of
    a STUDY-level answer: a description without instances (patient and study attributes,
    the counts as the PACS computed them) and a complete holding. [] if it has no UID."""
    uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    if not is_uid(uid):
        return []
    n = min(_count(ds, "NumberOfStudyRelatedInstances"), MAX_INSTANCES)
    desc = {
        "patient_key": patient_key(
            str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or "")
        ),
        "patient": _attrs(ds, PATIENT_KEYS),
        "study": {**_attrs(ds, STUDY_KEYS), **_attrs(ds, _COUNTS), "StudyInstanceUID": uid},
        "series": {},
        "instances": {},
    }
    hold = {"state": COMPLETE, "instances": n, "of": n, "bytes": 0}
    return [(DESC, uid, desc), (HOLD, uid, hold)]


# -- study listings and shares --------------------------------------------------------------


def listing_from_answers(answers: Iterable[Dataset], study_uid: str) -> list[ListedInstance]:
    """The instances of an IMAGE-level answer set, sorted by (series, SOP UID)."""
    found: dict[str, ListedInstance] = {}
    for ds in answers:
        sop = str(ds.get("SOPInstanceUID", "") or "").strip()
        series = str(ds.get("SeriesInstanceUID", "") or "").strip()
        sop_class = str(ds.get("SOPClassUID", "") or "").strip()
        study = str(ds.get("StudyInstanceUID", study_uid) or study_uid).strip()
        if is_uid(sop) and is_uid(series) and study == study_uid:
            found[sop] = ListedInstance(sop, series, sop_class if is_uid(sop_class) else "")
    return sorted(found.values(), key=lambda i: (i.series, i.sop))


def listing_from_wire(obj: Any) -> list[ListedInstance]:
    items = obj.get("instances") if isinstance(obj, dict) else None
    if not isinstance(items, list) or len(items) > MAX_INSTANCES:
        raise CentralInputError("central instances: need at most 50000 instances")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise CentralInputError("central instances: bad item")
        sop, series, sop_class = item.get("sop"), item.get("series"), item.get("class")
        if not (is_uid(sop) and is_uid(series) and (sop_class == "" or is_uid(sop_class))):
            raise CentralInputError("central instances: bad UID")
        out.append(ListedInstance(sop, series, sop_class))
    return sorted(out, key=lambda i: (i.series, i.sop))


def shares(
    listing: list[ListedInstance], replicas: Iterable[str]
) -> dict[str, list[ListedInstance]]:
    """Which replica retrieves which instance from the central PACS: round robin over the
    listing (sorted) and the replicas (sorted by name), so every gateway computing it for the
    same replica set gets the same split, and each replica holds a part of every series
    early (the clinic swarms from all of them at once)."""
    names = sorted(set(replicas))
    out: dict[str, list[ListedInstance]] = {name: [] for name in names}
    if not names:
        return out
    for i, inst in enumerate(listing):
        out[names[i % len(names)]].append(inst)
    return out


def retrieve_request_from_wire(obj: Any) -> tuple[str, list[ListedInstance], int]:
    """(study UID, instances, total) of a retrieve request; raises CentralInputError."""
    if not isinstance(obj, dict):
        raise CentralInputError("central retrieve: need an object")
    study, total = obj.get("study"), obj.get("of")
    if not is_uid(study):
        raise CentralInputError("central retrieve: bad study UID")
    wanted = listing_from_wire(obj)
    if type(total) is not int or not len(wanted) <= total <= MAX_INSTANCES:
        raise CentralInputError("central retrieve: bad total")
    return study, wanted, total
