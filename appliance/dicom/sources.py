"""Where C-FIND looks: the local index, and optionally studies known only elsewhere."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

from pydicom.dataset import Dataset

from appliance.central import core as central_core
from appliance.dicom.query import Query, Row
from appliance.dicom.retrieve import Item, unique_values
from appliance.store.records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord

log = logging.getLogger(__name__)


class MeshAccess(Protocol):
    """What the DICOM node uses of the mesh (wired by app.py)."""

    list_remote: bool  # C-FIND lists studies held only elsewhere

    def remote_reader(self) -> Any:
        """A Reader-like view of the studies other gateways hold."""

    def fetch(self, study_uid: str) -> Any:
        """Thread side: start or join a study's swarm download; an arrivals.Download."""

    # Optional: `central`, a CentralAccess (None or absent: no central PACS).


class CentralAccess(Protocol):
    """The central PACS as the DICOM node reaches it (appliance.central.relay, thread side)."""

    def find_threadsafe(self, identifier: Dataset, model: str) -> list[Dataset]:
        """Its matches (via the replicas), [] when none answered in time."""

    def stage_threadsafe(self, study_uid: str) -> list[central_core.ListedInstance] | None:
        """The study's instances when it must come from the central PACS, else None."""


def _central(mesh: MeshAccess | None) -> CentralAccess | None:
    return getattr(mesh, "central", None) if mesh is not None else None


def _row_key(level: str, row: Row) -> str:
    if level == "PATIENT":
        return str(row.patient.attrs.get("PatientID") or "")
    record = {"STUDY": row.study, "SERIES": row.series, "IMAGE": row.instance}[level]
    return record.uid if record is not None else ""


def central_answers(
    mesh: MeshAccess | None, query: Query, identifier: Dataset, rows: list[Row], ae_title: str
) -> list[Dataset]:
    """C-FIND responses for matches only the central PACS has: always at PATIENT and STUDY
    level, at SERIES and IMAGE level when nothing here matched; de-duplicated against the
    local rows by the level's unique key."""
    central = _central(mesh)
    if central is None or (query.level in ("SERIES", "IMAGE") and rows):
        return []
    try:
        seen = {_row_key(query.level, row) for row in rows}
        answers = central.find_threadsafe(identifier, query.model)
        merged = central_core.merge(seen, answers, query.level)
        return [central_core.project(query, ds, ae_title) for ds in merged]
    except Exception as exc:  # the local results come back whatever the central side does
        # The class only: a message could quote an attribute value (a patient name).
        log.error("central C-FIND answers dropped: %s", exc.__class__.__name__)
        return []


def central_items(mesh: MeshAccess | None, identifier: Dataset, items: list[Item]) -> list[Item]:
    """A retrieval's instances, with those of a study that must come from the central PACS
    as the PACS lists them (STUDY level; SERIES and IMAGE level when nothing else matched and
    the identifier names its study). Their transfer syntax is known once they land ("")."""
    central = _central(mesh)
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if central is None or level not in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
        return items
    if level in ("SERIES", "IMAGE") and items:
        return items
    if level == "PATIENT":
        studies = _patient_studies(central, identifier)
    else:
        studies = unique_values(identifier, "StudyInstanceUID")
    if level in ("SERIES", "IMAGE"):
        studies = studies[:1]
    series = (
        set(unique_values(identifier, "SeriesInstanceUID"))
        if level not in ("PATIENT", "STUDY")
        else None
    )
    sops = set(unique_values(identifier, "SOPInstanceUID")) if level == "IMAGE" else None
    known = {item.uid: item for item in items}
    out = list(items)
    for study in studies:
        listing = central.stage_threadsafe(study)
        if listing is None:
            continue
        out = [item for item in out if item.study_uid != study]
        for inst in listing:
            if (series is not None and inst.series not in series) or (
                sops is not None and inst.sop not in sops
            ):
                continue
            out.append(known.get(inst.sop) or Item(inst.sop, inst.sop_class, "", study))
    return out


def _patient_studies(central: Any, identifier: Dataset) -> list[str]:
    """The studies the central PACS has for a PATIENT-level retrieval's Patient ID (a STUDY-
    level C-FIND through the relay): each is then staged like a STUDY-level retrieval."""
    pid = str(identifier.get("PatientID", "") or "").strip()
    if not pid or any(c in pid for c in "*?\\"):
        return []  # a retrieval names one patient (PS3.4 C.4.2.2.1: a unique key)
    ask = Dataset()
    ask.QueryRetrieveLevel = "STUDY"
    ask.PatientID = pid
    ask.StudyInstanceUID = ""
    answers = central.find_threadsafe(ask, "study")
    return sorted({str(ds.StudyInstanceUID) for ds in answers if ds.get("StudyInstanceUID")})


class UnionReader:
    """The local Reader, plus a remote one (same interface) for studies not held here.
    A study held locally is always answered from the local index."""

    def __init__(self, local: Any, remote: Any) -> None:
        self.local = local
        self.remote = remote

    def _remote_only(self, study: StudyRecord) -> bool:
        return self.local.study(study.uid) is None

    def studies(self) -> Iterator[StudyRecord]:
        yield from self.local.studies()
        yield from (s for s in self.remote.studies() if self._remote_only(s))

    def study(self, uid: str) -> StudyRecord | None:
        return self.local.study(uid) or self.remote.study(uid)

    def patients(self) -> Iterator[PatientRecord]:
        # Local records are fresh decoded copies: adding remote counts to them is safe.
        merged = {p.key: p for p in self.local.patients()}
        for p in self.remote.patients():
            remote_only = [s for s in self.remote.studies_of(p.key) if self._remote_only(s)]
            if not remote_only:
                continue
            into = merged.get(p.key) or PatientRecord(p.key, dict(p.attrs))
            merged[p.key] = into
            into.n_studies += len(remote_only)
            into.n_series += sum(s.n_series for s in remote_only)
            into.n_instances += sum(s.n_instances for s in remote_only)
        yield from merged.values()

    def patient(self, key: str) -> PatientRecord | None:
        return next((p for p in self.patients() if p.key == key), None)

    def studies_of(self, patient_key: str) -> Iterator[StudyRecord]:
        yield from self.local.studies_of(patient_key)
        yield from (s for s in self.remote.studies_of(patient_key) if self._remote_only(s))

    def series(self, uid: str) -> SeriesRecord | None:
        return self.local.series(uid) or self.remote.series(uid)

    def series_of(self, study_uid: str) -> Iterator[SeriesRecord]:
        source = self.local if self.local.study(study_uid) is not None else self.remote
        return source.series_of(study_uid)

    def instance(self, uid: str) -> InstanceRecord | None:
        return self.local.instance(uid) or self.remote.instance(uid)

    def instances_of(self, series_uid: str) -> Iterator[InstanceRecord]:
        source = self.local if self.local.series(series_uid) is not None else self.remote
        return source.instances_of(series_uid)
