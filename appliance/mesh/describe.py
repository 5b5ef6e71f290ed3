"""What this gateway says about a study it holds: the catalog's "desc" and "hold" payloads,
built from the local index (see catalog.py for the formats)."""

from __future__ import annotations

import json
from typing import Any

from appliance.store.index import Reader


def describe_study(reader: Reader, study_uid: str) -> dict[str, Any] | None:
    """The description of a locally indexed study (None if it is not held anymore)."""
    study = reader.study(study_uid)
    if study is None:
        return None
    patient = reader.patient(study.patient_key)
    series: dict[str, Any] = {}
    instances: dict[str, Any] = {}
    for se in reader.series_of(study_uid):
        series[se.uid] = se.attrs
        for inst in reader.instances_of(se.uid):
            manifest = reader.manifest(inst.uid)
            if manifest is None:
                continue
            instances[inst.uid] = {
                "series": se.uid,
                "sop_class": inst.sop_class_uid,
                "ts": inst.transfer_syntax,
                "size": inst.size,
                "manifest": manifest.digest.hex(),
                "attrs": inst.attrs,
                # When this version entered the mesh: a swarm copy keeps the source's time
                # (it becomes the copy's received_at), so replaced versions can be ordered.
                "at": inst.received_at,
            }
    return {
        "patient_key": study.patient_key,
        "patient": patient.attrs if patient is not None else {},
        "study": study.attrs,
        "series": series,
        "instances": instances,
    }


def holding(reader: Reader, study_uid: str) -> dict[str, Any] | None:
    """This gateway's holding of a study: complete, partial (a swarm download in progress:
    some instances and pinned chunks), or None when it holds nothing of it."""
    study = reader.study(study_uid)
    record = reader.download(study_uid)
    if study is None and record is None:
        return None
    held = study.n_instances if study is not None else 0
    size = study.bytes if study is not None else 0
    if record is None:
        return {"state": "complete", "instances": held, "of": held, "bytes": size}
    fields = json.loads(record)
    # "expect": the instance count the central PACS listed, for a study still filling from it.
    total = max(fields.get("of", held), fields.get("expect", 0), held)
    return {"state": "partial", "instances": held, "of": total, "bytes": size}
