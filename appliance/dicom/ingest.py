"""From received C-STORE bytes to a validated, hashed, chunked IncomingInstance.

Runs on the pynetdicom handler thread: everything here is CPU work on one instance, done in
parallel across associations; only the durable write is serialised (store writer thread).
"""

from __future__ import annotations

import struct
import time
import zlib
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from appliance.dicom import attributes, status
from appliance.store import IncomingInstance, LevelAttrs, Manifest
from appliance.store.chunking import split_and_hash
from appliance.store.records import patient_key

PIXEL_DATA = 0x7FE00010
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_STUDY = 0x0020000D
_SERIES = 0x0020000E
_PATIENT_ID = 0x00100020
_ISSUER = 0x00100021
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# A deflated data set is inflated only to read its header; refuse inflation bombs.
MAX_INFLATED_BYTES = 4 << 30
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                    b"UT", b"UV"}  # fmt: skip


class IngestError(Exception):
    """The data set is refused; `status` is the C-STORE status to answer with."""

    def __init__(self, status_code: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status_code
        # ErrorComment is LO: at most 64 characters (PS3.7 C.4.2, PS3.5 Table 6.2-1).
        self.comment = comment[:64]


def prepare(
    raw: bytes,
    transfer_syntax: str,
    command_sop_class: str,
    command_sop_instance: str,
    calling_ae: str,
    *,
    compress: bool = False,
) -> IncomingInstance:
    """Validate a received data set and hash/chunk it; raises IngestError."""
    ts = UID(transfer_syntax)
    header = parse_header(raw, ts)
    encodings = attributes.encodings_of(header)
    present = set(header.keys())
    sop_class = _text(header, _SOP_CLASS, encodings)
    sop_instance = _text(header, _SOP_INSTANCE, encodings)
    if not sop_class and not sop_instance:
        raise IngestError(status.CANNOT_UNDERSTAND, "not a DICOM data set (no SOP UIDs)")
    if not sop_class:
        raise IngestError(status.DATASET_MISMATCH, "data set has no SOP Class UID")
    if sop_class != str(command_sop_class).strip():
        raise IngestError(status.DATASET_MISMATCH, "SOP Class UID differs from the request's")
    if not sop_instance:
        raise IngestError(status.MISSING_INSTANCE_UID, "data set has no SOP Instance UID")
    if sop_instance != str(command_sop_instance).strip():
        raise IngestError(status.MISSING_INSTANCE_UID, "SOP Instance UID differs from request's")
    study_uid = _text(header, _STUDY, encodings)
    series_uid = _text(header, _SERIES, encodings)
    if not study_uid or not series_uid:
        raise IngestError(status.MISSING_HIERARCHY_UID, "no Study or Series Instance UID")
    for uid in (sop_class, sop_instance, study_uid, series_uid):
        if len(uid) > 64:
            raise IngestError(status.CANNOT_UNDERSTAND, "UID longer than 64 characters")

    # Hashing inline measured faster than overlapping it with the parse on another thread
    # (pool hand-off and GIL reacquisition cost more than the ~0.4 ms hash of a CT slice),
    # and faster than hashing fragments as they arrive.
    chunks, digest = split_and_hash(raw, compress=compress)
    manifest = Manifest(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        transfer_syntax=str(ts),
        size=len(raw),
        sha256=digest,
        chunks=tuple(c.ref for c in chunks),
    )
    codec = attributes.plain_codec(header)
    attrs = LevelAttrs(
        patient=attributes.PATIENT.extract(header, present, encodings, codec),
        study=attributes.STUDY.extract(header, present, encodings, codec),
        series=attributes.SERIES.extract(header, present, encodings, codec),
        instance=attributes.INSTANCE.extract(header, present, encodings, codec),
    )
    return IncomingInstance(
        manifest=manifest,
        chunks=tuple(chunks),
        study_uid=study_uid,
        series_uid=series_uid,
        patient_key=patient_key(
            _text(header, _PATIENT_ID, encodings), _text(header, _ISSUER, encodings)
        ),
        attrs=attrs,
        calling_ae=calling_ae.strip(),
        received_at=time.time(),
    )


def _text(ds: Dataset, tag: int, encodings: list[str]) -> str:
    try:
        elem = attributes.element(ds, tag, encodings)
    except Exception:
        return ""
    value = None if elem is None else elem.value
    # Some modalities pad UIDs with spaces or NULs; the index keys on the bare value.
    return "" if value is None else str(value).strip(" \x00")


def parse_header(raw: bytes, ts: UID) -> Dataset:
    """The data set's elements before Pixel Data, after checking the whole data set is
    structurally sound (every element fits, tags ascend); raises IngestError."""
    data = _inflate(raw) if ts.is_deflated else raw
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    fp = BytesIO(data)
    try:
        header = read_dataset(
            fp, implicit, little, stop_when=lambda tag, vr, length: tag == PIXEL_DATA
        )
        _check_ascending(header)
        end = fp.tell()
        if end < len(data):
            end = _skip_element(data, end, implicit, little)
            if end < len(data):
                trailer = read_dataset(BytesIO(data[end:]), implicit, little)
                _check_ascending(trailer)
    except IngestError:
        raise
    except Exception as exc:
        raise IngestError(
            status.CANNOT_UNDERSTAND, f"cannot parse data set: {exc.__class__.__name__}"
        ) from None
    if not len(header):
        raise IngestError(status.CANNOT_UNDERSTAND, "empty data set")
    return header


def _inflate(raw: bytes) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(raw, MAX_INFLATED_BYTES)
    except zlib.error:
        raise IngestError(status.CANNOT_UNDERSTAND, "deflated data set is corrupt") from None
    if inflater.unconsumed_tail:
        raise IngestError(status.OUT_OF_RESOURCES, "deflated data set inflates beyond limit")
    return data


def _check_ascending(ds: Dataset) -> None:
    previous = -1
    # keys() is the wire order; iterating a Dataset would yield its elements sorted.
    for tag in ds.keys():  # noqa: SIM118
        if tag <= previous:
            raise IngestError(status.CANNOT_UNDERSTAND, "data set elements out of order")
        previous = tag


def _skip_element(data: bytes, pos: int, implicit: bool, little: bool) -> int:
    """Offset after the element at `pos` (Pixel Data), checking it lies within `data`."""
    end = "<" if little else ">"
    group, elem = struct.unpack_from(end + "HH", data, pos)
    tag = group << 16 | elem
    if implicit:
        (length,) = struct.unpack_from(end + "I", data, pos + 4)
        pos += 8
    else:
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_LENGTH_VRS:
            (length,) = struct.unpack_from(end + "I", data, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from(end + "H", data, pos + 6)
            pos += 8
    if length != _UNDEFINED:
        if pos + length > len(data):
            raise IngestError(status.CANNOT_UNDERSTAND, "data set truncated")
        return pos + length
    if tag != PIXEL_DATA:
        raise IngestError(status.CANNOT_UNDERSTAND, "unexpected undefined-length element")
    # Encapsulated pixel data (PS3.5 A.4): items, then a sequence delimiter. Item tags are
    # always little endian in encapsulated syntaxes.
    while True:
        if pos + 8 > len(data):
            raise IngestError(status.CANNOT_UNDERSTAND, "encapsulated pixel data truncated")
        item_group, item_elem, item_len = struct.unpack_from("<HHI", data, pos)
        item_tag = item_group << 16 | item_elem
        pos += 8
        if item_tag == _SEQUENCE_DELIMITER:
            return pos
        if item_tag != _ITEM or item_len == _UNDEFINED or pos + item_len > len(data):
            raise IngestError(status.CANNOT_UNDERSTAND, "encapsulated pixel data malformed")
        pos += item_len
