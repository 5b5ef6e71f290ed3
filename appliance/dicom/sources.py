"""Where C-FIND looks: the local index, and optionally studies known only elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from appliance.store.records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord


class MeshAccess(Protocol):
    """What the DICOM node uses of the mesh (wired by app.py)."""

    list_remote: bool  # C-FIND lists studies held only elsewhere

    def remote_reader(self) -> Any:
        """A Reader-like view of the studies other gateways hold."""

    def fetch(self, study_uid: str) -> Any:
        """Thread side: start or join a study's swarm download; an arrivals.Download."""


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
