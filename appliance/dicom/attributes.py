"""Which attributes the index keeps at each query/retrieve level, and their JSON form.

The key lists follow the Patient Root and Study Root information models (PS3.4 C.6.1.1 and
C.6.2.1) plus attributes workstations commonly ask for. Keys outside these lists are answered
with a zero-length value, as PS3.4 C.4.1.2.3 allows for keys an SCP does not support.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

PATIENT_KEYS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDs",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
)
STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "InstitutionName",
)
SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "ProtocolName",
    "Laterality",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "OperatorsName",
    "PerformingPhysicianName",
)
INSTANCE_KEYS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "ContentDate",
    "ContentTime",
    "AcquisitionNumber",
    "AcquisitionDate",
    "AcquisitionTime",
    "ImageType",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "PhotometricInterpretation",
    "ImageComments",
    "SliceLocation",
    "SliceThickness",
)

LEVEL_KEYS = {
    "PATIENT": PATIENT_KEYS,
    "STUDY": STUDY_KEYS,
    "SERIES": SERIES_KEYS,
    "IMAGE": INSTANCE_KEYS,
}

# Attributes the SCP computes from the index rather than stores (PS3.4 C.3.4).
COMPUTED_KEYS = {
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
    "ModalitiesInStudy",
    "SOPClassesInStudy",
    "AvailableTransferSyntaxUID",
}

_BINARY_NUMBERS = {"US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"}


def vr_of(keyword: str) -> str:
    """The dictionary VR of a keyword (first choice for ambiguous VRs like US or SS)."""
    return dictionary_VR(tag_for_keyword(keyword)).split(" or ")[0]


def to_json_value(value: Any, vr: str) -> Any:
    """A pydicom element value as the index stores it: str, number, list, or None if empty."""
    if value is None or value == "" or (isinstance(value, (list, MultiValue)) and not value):
        return None
    if isinstance(value, (list, MultiValue)):
        return [_scalar(v, vr) for v in value]
    return _scalar(value, vr)


def _scalar(value: Any, vr: str) -> Any:
    if vr in _BINARY_NUMBERS:
        return value if isinstance(value, (int, float)) else None
    # IS/DS keep their string form (pydicom's IS/DSfloat str() returns the original text);
    # PN keeps all component groups (alphabetic=ideographic=phonetic).
    return str(value)


_SPECIFIC_CHARACTER_SET = 0x00080005


def encodings_of(ds: Dataset) -> list[str]:
    """The Python codecs for the data set's Specific Character Set (PS3.3 C.12.1.1.2)."""
    elem = element(ds, _SPECIFIC_CHARACTER_SET, None)
    return convert_encodings(elem.value if elem is not None else None)


def element(ds: Dataset, tag: int, encodings: list[str] | None) -> DataElement | None:
    """The converted element `tag` of `ds`, or None.

    Converts the raw element directly: on the ingest hot path, Dataset.__getitem__'s generic
    bookkeeping costs as much as the conversion itself."""
    raw = ds.get_item(tag)
    if raw is None or isinstance(raw, DataElement):
        return raw
    if isinstance(raw, RawDataElement):
        return convert_raw_data_element(raw, encoding=encodings, ds=ds)
    return None  # a nested Dataset (not a top-level element)


# Character sets whose text is a plain decode, without ISO 2022 code extensions; the fast
# path below handles only these (the vast majority of what modalities send).
_PLAIN_CHARSETS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1",
                   "ISO_IR 192": "utf_8"}  # fmt: skip
# VRs from the default repertoire, never affected by Specific Character Set (PS3.5 6.1.2.3).
_DEFAULT_REPERTOIRE = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"}
_SPECIFIC_REPERTOIRE = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_SINGLE_VALUED = {"LT", "ST", "UT", "UR"}  # backslash is text, not a value separator
_STRUCT = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


def plain_codec(ds: Dataset) -> str | None:
    """The codec for a data set's text when it needs no ISO 2022 handling, else None."""
    raw = ds.get_item(_SPECIFIC_CHARACTER_SET)
    if raw is None:
        return _PLAIN_CHARSETS[""]
    value = raw.value if isinstance(raw, (RawDataElement, DataElement)) else None
    if isinstance(value, bytes):
        value = value.decode("latin_1")
    if value is None:
        return _PLAIN_CHARSETS[""]
    if not isinstance(value, str):
        return None  # several terms: code extensions
    return _PLAIN_CHARSETS.get(value.strip(" \x00"))


def fast_json_value(raw: RawDataElement, vr: str, codec: str) -> Any:
    """to_json_value(pydicom's converted value) computed straight from the raw bytes, for
    the common VRs; raises LookupError for anything else (the caller uses pydicom)."""
    if raw.VR is None and " or " in dictionary_VR(raw.tag):
        raise LookupError(vr)  # implicit VR, ambiguous in the dictionary: pydicom resolves it
    vr = raw.VR or vr  # implicit VR: the dictionary's
    value = raw.value
    if not isinstance(value, bytes):
        raise LookupError(vr)
    if vr in _STRUCT:
        fmt = _STRUCT[vr]
        count = len(value) // struct.calcsize(fmt)
        if not count:
            return None
        numbers = struct.unpack(("<" if raw.is_little_endian else ">") + fmt * count, value)
        return numbers[0] if count == 1 else list(numbers)
    if vr in _DEFAULT_REPERTOIRE:
        # Like pydicom: padding is stripped from the whole value, then it is split; only the
        # numeric strings are stripped per value.
        parts = value.decode("latin_1").rstrip(" \x00").split("\\")
        if vr in ("DS", "IS"):
            parts = [p.strip(" ") for p in parts]
    elif vr in _SPECIFIC_REPERTOIRE:
        text = value.decode(codec).rstrip(" \x00")
        parts = [text] if vr in _SINGLE_VALUED else text.split("\\")
        if vr == "PN":  # pydicom drops empty trailing component groups (PS3.5 6.2.1.1)
            parts = [p.rstrip("=") for p in parts]
    else:
        raise LookupError(vr)
    if len(parts) == 1:
        return parts[0] or None
    return parts


class KeyTable:
    """Keywords with their tags and VRs resolved once (pydicom's keyword lookup is slow on
    the ingest hot path)."""

    def __init__(self, keywords: tuple[str, ...]) -> None:
        self.entries = tuple((tag_for_keyword(kw), kw, vr_of(kw)) for kw in keywords)

    def extract(
        self, ds: Dataset, present: set[int], encodings: list[str], codec: str | None = None
    ) -> dict[str, Any]:
        """The stored form of the table's attributes in `ds` (whose tags are `present`);
        absent or empty ones are left out. `codec` (from plain_codec) enables the fast path."""
        out: dict[str, Any] = {}
        for tag, keyword, vr in self.entries:
            if tag not in present:
                continue
            try:
                raw = ds.get_item(tag)
                if codec is not None and isinstance(raw, RawDataElement):
                    try:
                        value = fast_json_value(raw, vr, codec)
                    except LookupError:
                        elem = element(ds, tag, encodings)
                        value = None if elem is None else to_json_value(elem.value, vr)
                else:
                    elem = element(ds, tag, encodings)
                    value = None if elem is None else to_json_value(elem.value, vr)
            except Exception:  # an undecodable value is not indexed; the bytes are kept as sent
                continue
            if value is not None:
                out[keyword] = value
        return out


PATIENT = KeyTable(PATIENT_KEYS)
STUDY = KeyTable(STUDY_KEYS)
SERIES = KeyTable(SERIES_KEYS)
INSTANCE = KeyTable(INSTANCE_KEYS)
