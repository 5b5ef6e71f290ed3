"""Helpers to compare Part 10 files by their data set bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the 128-byte preamble, "DICM" and the file meta group."""
    raw = path.read_bytes()
    if raw[128:132] != b"DICM":
        raise ValueError(f"{path} is not a DICOM Part 10 file")
    # (0002,0000) File Meta Information Group Length, explicit VR LE: tag, "UL", len, value.
    (group_length,) = struct.unpack_from("<I", raw, 132 + 8)
    return raw[132 + 12 + group_length :]


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
