"""C-GET/C-MOVE: from an identifier to the instances to send, and the bytes to send them with.

The instance list is resolved in one short read transaction; each instance is then read in
its own transaction while sub-operations run, so a long transfer to a slow destination never
pins LMDB pages (which would make the file grow under concurrent ingest).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.presentation import PresentationContext, build_context

from appliance.dicom import status
from appliance.dicom.fastpath import RawInstance
from appliance.dicom.query import MODEL_LEVELS, QueryError
from appliance.store import CorruptData, Store
from appliance.store.index import Reader

log = logging.getLogger(__name__)

_UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# pynetdicom reports sub-operation counts as US (PS3.4 C.4.2.3.1): one request moves at most
# 65535 instances.
MAX_SUBOPERATIONS = 65535
# A requestor may propose at most 128 presentation contexts (PS3.8 9.3.2.2 item IDs 1-255).
MAX_CONTEXTS = 128
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
_USUAL = (
    *_UNCOMPRESSED,
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


@dataclass(frozen=True)
class Item:
    """One instance to send."""

    uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str


def resolve(identifier: Dataset, model: str, reader: Reader) -> list[Item]:
    """The instances an identifier asks for (PS3.4 C.4.2.2.1: unique keys at each level)."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in MODEL_LEVELS[model]:
        raise QueryError(status.QR_IDENTIFIER_MISMATCH, f"invalid QueryRetrieveLevel {level!r}")
    values = unique_values(identifier, _UNIQUE[level])
    if not values:
        raise QueryError(status.QR_IDENTIFIER_MISMATCH, f"{_UNIQUE[level]} required")
    items: list[Item] = []
    if level == "PATIENT":
        wanted = set(values)
        for patient in reader.patients():
            if str(patient.attrs.get("PatientID", "")) in wanted:
                for study in reader.studies_of(patient.key):
                    items.extend(_study_items(reader, study.uid))
    elif level == "STUDY":
        for uid in values:
            items.extend(_study_items(reader, uid))
    elif level == "SERIES":
        for uid in values:
            items.extend(_series_items(reader, uid))
    else:
        for uid in values:
            if (inst := reader.instance(uid)) is not None:
                items.append(
                    Item(inst.uid, inst.sop_class_uid, inst.transfer_syntax, inst.study_uid)
                )
    if len(items) > MAX_SUBOPERATIONS:
        raise QueryError(status.QR_SUBOPS_OUT_OF_RESOURCES, "more than 65535 instances")
    return items


def unique_values(identifier: Dataset, keyword: str) -> list[str]:
    """The values of a unique key (a List of UID Matching: PS3.4 C.2.2.2.2)."""
    raw = identifier.get(keyword)
    if raw is None:
        return []
    multiple = isinstance(raw, (list, tuple, MultiValue))
    text = "\\".join(str(v) for v in raw) if multiple else str(raw)
    return [v.strip(" \x00") for v in text.split("\\") if v.strip(" \x00")]


def _study_items(reader: Reader, study_uid: str) -> Iterator[Item]:
    for series in reader.series_of(study_uid):
        yield from _series_items(reader, series.uid)


def _series_items(reader: Reader, series_uid: str) -> Iterator[Item]:
    for inst in reader.instances_of(series_uid):
        yield Item(inst.uid, inst.sop_class_uid, inst.transfer_syntax, inst.study_uid)


def load(store: Store, item: Item) -> RawInstance:
    """The stored instance ready to send as received (without bytes, logged, if unreadable:
    its sub-operation then fails)."""
    try:
        raw = store.read_instance(item.uid)
    except CorruptData as exc:
        log.error("not sending instance %s: %s", item.uid, exc)
        raw = None
    else:
        if raw is None:  # deleted since the list was resolved
            log.warning("instance %s disappeared before it could be sent", item.uid)
    sop_class, syntax = item.sop_class_uid, item.transfer_syntax
    if raw is not None and not (syntax and sop_class):
        # Listed by the central PACS before it arrived: the stored record knows.
        with store.reader() as r:
            record = r.instance(item.uid)
        if record is not None:
            sop_class, syntax = record.sop_class_uid, record.transfer_syntax
    return RawInstance(raw, sop_class, item.uid, syntax)


def move_contexts(items: list[Item]) -> list[PresentationContext]:
    """Contexts to propose to a C-MOVE destination: each stored (SOP class, syntax), with the
    uncompressed syntaxes as alternatives pynetdicom can convert to losslessly."""
    pairs: dict[str, list[str]] = {}
    for item in items:
        if not item.sop_class_uid:
            continue  # not known yet (listed by the central PACS without it): it will fail
        syntaxes = pairs.setdefault(item.sop_class_uid, [])
        # Not known yet (listed by the central PACS): the syntaxes a PACS usually stores.
        for ts in (item.transfer_syntax,) if item.transfer_syntax else _USUAL:
            if ts not in syntaxes:
                syntaxes.append(ts)
    contexts: list[PresentationContext] = []
    for sop_class, syntaxes in pairs.items():
        uncompressed = [ts for ts in syntaxes if ts in _UNCOMPRESSED]
        for ts in syntaxes:
            if ts in _UNCOMPRESSED:
                continue
            contexts.append(build_context(sop_class, [ts]))
        if uncompressed:
            offered = uncompressed + [ts for ts in _UNCOMPRESSED if ts not in uncompressed]
            contexts.append(build_context(sop_class, offered))
    if len(contexts) > MAX_CONTEXTS:
        raise QueryError(status.QR_SUBOPS_OUT_OF_RESOURCES, "too many SOP classes/syntaxes")
    return contexts
