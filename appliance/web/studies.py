"""Study search for the page: the same C-FIND engine over the local index and the mesh
catalog (PS3.4 C.2.2.2 matching: wildcards *, ?, date ranges like 20240101-20240131), with
where each study is held. Blocking (LMDB reads): call from an executor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydicom.dataset import Dataset

from appliance.dicom import query
from appliance.dicom.sources import UnionReader
from appliance.mesh.remote import RemoteReader
from appliance.web.parts import GatewayParts

MAX_RESULTS = 500

# Search fields the page offers -> the Study Root key they fill.
SEARCH_KEYS = {
    "patient_name": "PatientName",
    "patient_id": "PatientID",
    "study_date": "StudyDate",
    "accession": "AccessionNumber",
    "modality": "ModalitiesInStudy",
    "description": "StudyDescription",
    "study_uid": "StudyInstanceUID",
}
_PATIENT_OUT = ("PatientName", "PatientID", "PatientBirthDate")
_STUDY_OUT = ("StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "StudyID",
              "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances")  # fmt: skip


class SearchError(ValueError):
    """A search parameter the engine cannot use; str() names it."""


def _identifier(params: Mapping[str, str]) -> Dataset:
    unknown = sorted(set(params) - set(SEARCH_KEYS) - {"limit"})
    if unknown:
        raise SearchError(f"{unknown[0]}: unknown search field (one of {', '.join(SEARCH_KEYS)})")
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for field, keyword in SEARCH_KEYS.items():
        value = params.get(field, "").strip()
        if len(value) > 64:
            raise SearchError(f"{field}: at most 64 characters")
        setattr(ds, keyword, value)
    for keyword in (*_PATIENT_OUT, *_STUDY_OUT):
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return str(value)


def search(parts: GatewayParts, params: Mapping[str, str]) -> list[dict[str, Any]]:
    """Studies matching `params`, local ones first, each with `held_here` and `holders`."""
    store, mesh = parts.store, parts.mesh
    if store is None:
        return []
    q = query.parse(_identifier(params), "study")
    with store.reader() as local:
        source: Any = UnionReader(local, RemoteReader(mesh.catalog)) if mesh else local
        try:
            rows = query.execute(q, source, limit=MAX_RESULTS)
        except query.QueryError as exc:
            raise SearchError(exc.comment) from None
        held_here = {row.study.uid for row in rows if row.study and local.study(row.study.uid)}
    own = mesh.cfg.name if mesh else None
    out = []
    for row in rows:
        study = row.study
        assert study is not None
        view = mesh.catalog.view(study.uid) if mesh else None
        holders = sorted(view.holders) if view else []
        item: dict[str, Any] = {"study_uid": study.uid}
        item.update({k: _plain(query.value_of(row.patient, k)) for k in _PATIENT_OUT})
        item.update({k: _plain(query.value_of(study, k)) for k in _STUDY_OUT})
        item["bytes"] = study.bytes
        item["held_here"] = study.uid in held_here  # all or part of it
        # A partial copy (an interrupted fetch, a study still arriving) can be completed.
        known = len(view.instances) if view else 0
        item["complete_here"] = item["held_here"] and study.n_instances >= known
        item["holders"] = [h for h in holders if h != own]
        out.append(item)
    return out
