"""Studies known from the catalog, seen through the store's Reader interface, so the C-FIND
engine answers them exactly like local ones (see UnionReader in appliance/dicom/sources.py)."""

from __future__ import annotations

from collections.abc import Iterator

from appliance.mesh.catalog import Catalog
from appliance.store.records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord

_Records = tuple[PatientRecord, StudyRecord, list[SeriesRecord], list[InstanceRecord]]


class RemoteReader:
    """A read-only view of the studies other gateways hold, built lazily per query."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._views: dict[str, _Records | None] = {}
        self._all: list[str] | None = None
        self._series_study: dict[str, str] = {}
        self._instance_series: dict[str, str] = {}

    def _records(self, study_uid: str) -> _Records | None:
        if study_uid not in self._views:
            records = self._catalog.view(study_uid).records()
            self._views[study_uid] = records
            if records is not None:
                for se in records[2]:
                    self._series_study[se.uid] = study_uid
                for inst in records[3]:
                    self._instance_series[inst.uid] = inst.series_uid
        return self._views[study_uid]

    def _study_uids(self) -> list[str]:
        if self._all is None:
            self._all = self._catalog.remote_studies()
        return self._all

    def studies(self) -> Iterator[StudyRecord]:
        for uid in self._study_uids():
            if (records := self._records(uid)) is not None:
                yield records[1]

    def study(self, uid: str) -> StudyRecord | None:
        records = self._records(uid) if uid in set(self._study_uids()) else None
        return None if records is None else records[1]

    def patients(self) -> Iterator[PatientRecord]:
        merged: dict[str, PatientRecord] = {}
        for uid in self._study_uids():
            if (records := self._records(uid)) is None:
                continue
            p = records[0]
            into = merged.setdefault(p.key, PatientRecord(p.key, dict(p.attrs)))
            into.n_studies += p.n_studies
            into.n_series += p.n_series
            into.n_instances += p.n_instances
        yield from merged.values()

    def patient(self, key: str) -> PatientRecord | None:
        return next((p for p in self.patients() if p.key == key), None)

    def studies_of(self, patient_key: str) -> Iterator[StudyRecord]:
        return (s for s in self.studies() if s.patient_key == patient_key)

    def series_of(self, study_uid: str) -> Iterator[SeriesRecord]:
        records = self._records(study_uid)
        return iter(records[2] if records else [])

    def series(self, uid: str) -> SeriesRecord | None:
        study = self._series_study.get(uid)
        if study is None:
            for s in self._study_uids():
                self._records(s)
            study = self._series_study.get(uid)
        records = self._records(study) if study else None
        return next((se for se in records[2] if se.uid == uid), None) if records else None

    def instances_of(self, series_uid: str) -> Iterator[InstanceRecord]:
        se = self.series(series_uid)
        records = self._records(se.study_uid) if se else None
        return (i for i in (records[3] if records else []) if i.series_uid == series_uid)

    def instance(self, uid: str) -> InstanceRecord | None:
        series_uid = self._instance_series.get(uid)
        if series_uid is None:
            for s in self._study_uids():
                self._records(s)
            series_uid = self._instance_series.get(uid)
        if series_uid is None:
            return None
        return next((i for i in self.instances_of(series_uid) if i.uid == uid), None)
