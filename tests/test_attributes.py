"""The fast value conversion of the ingest path agrees with pydicom's own conversion."""

from __future__ import annotations

import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.filereader import read_dataset
from studygen import generate_ct_series

from appliance.dicom import attributes

FAST_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "LO", "LT", "PN", "SH", "ST",
            "UC", "UT", "US", "SS", "UL", "SL", "FL", "FD"}  # fmt: skip


def _raw_dataset(path: Path) -> pydicom.Dataset | None:
    """The data set of a Part 10 file as raw (unconverted) elements, or None to skip it."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        return None
    raw = path.read_bytes()
    offset = raw.find(b"DICM")
    if offset != 128:
        return None
    group_length = int.from_bytes(raw[140:144], "little")
    body = raw[144 + group_length :]
    if ts.is_deflated:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    return read_dataset(BytesIO(body), ts.is_implicit_VR, ts.is_little_endian,
                        stop_when=lambda tag, vr, length: tag == 0x7FE00010)  # fmt: skip


def _files(tmp_path_factory) -> list[Path]:
    generated = generate_ct_series(tmp_path_factory.mktemp("ct"), 2, rows=16, cols=16, seed=3)
    # Only the sample files shipped inside pydicom: get_testdata_files() may download more.
    return sorted(Path(DATA_ROOT).rglob("*.dcm")) + generated.paths


def test_fast_conversion_matches_pydicom(tmp_path_factory):
    compared = 0
    for path in _files(tmp_path_factory):
        ds = _raw_dataset(path)
        if ds is None:
            continue
        codec = attributes.plain_codec(ds)
        if codec is None:
            continue
        encodings = attributes.encodings_of(ds)
        for tag in list(ds.keys()):
            raw = ds.get_item(tag)
            if not isinstance(raw, RawDataElement) or tag >> 16 in (0x0002,):
                continue
            vr = raw.VR or pydicom.datadict.dictionary_VR(tag).split(" or ")[0] if (
                raw.VR or pydicom.datadict.dictionary_has_tag(tag)) else None  # fmt: skip
            if vr not in FAST_VRS:
                continue
            try:
                slow = attributes.to_json_value(
                    convert_raw_data_element(raw, encoding=encodings, ds=ds).value, vr
                )
            except Exception:
                continue  # pydicom cannot read it either: not indexed either way
            try:
                fast = attributes.fast_json_value(raw, vr, codec)
            except LookupError:
                continue  # not on the fast path: extract() uses pydicom for it
            assert fast == slow, f"{path.name} {tag:08X} {vr}: {fast!r} != {slow!r}"
            compared += 1
    assert compared > 2000


@pytest.mark.parametrize(
    ("charset", "expected"),
    [
        (None, "latin_1"),
        ("ISO_IR 192", "utf_8"),
        ("ISO_IR 100", "latin_1"),
        ("ISO 2022 IR 87", None),
        (["", "ISO 2022 IR 87"], None),
    ],
)
def test_plain_codec(charset, expected):
    ds = pydicom.Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    assert attributes.plain_codec(ds) == expected
