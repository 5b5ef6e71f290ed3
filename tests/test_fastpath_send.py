"""The send fast path writes exactly the bytes pynetdicom's own encoders produce."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from appliance.dicom.fastpath import encode_pdata, encode_store_rq


def _primitive(sop: str, msg_id: int, originator: str | None, data: bytes) -> C_STORE:
    p = C_STORE()
    p.MessageID = msg_id
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    p.AffectedSOPInstanceUID = sop
    p.Priority = 2
    if originator is not None:
        p.MoveOriginatorApplicationEntityTitle = originator
        p.MoveOriginatorMessageID = 65535
    p.DataSet = BytesIO(data)
    return p


CASES = [
    ("1.2.3", 1, None),  # odd UID length: NUL padding
    ("1.2.34", 65535, None),  # even UID length
    ("1.2.826.0.1.3680043.8.498.1", 7, "MOVESCU"),  # odd AE: space padding
    ("1.2.826.0.1.3680043.8.498.12", 300, "SIXTEEN_CHARS_AE"),
]


@pytest.mark.parametrize(("sop", "msg_id", "originator"), CASES)
def test_store_rq_command_matches_pynetdicom(sop, msg_id, originator):
    p = _primitive(sop, msg_id, originator, b"\x08\x00\x16\x00")
    reference = C_STORE_RQ()
    reference.primitive_to_message(p)
    assert encode_store_rq(p) == encode(reference.command_set, True, True)


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384, 131072])
@pytest.mark.parametrize("size", [1, 4089, 4090, 4091, 16378, 100_000, 525_000])
def test_pdata_stream_matches_pynetdicom(max_pdu, size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    p = _primitive("1.2.3.4", 9, "MOVESCU", data)
    reference = C_STORE_RQ()
    reference.primitive_to_message(p)
    expected = b"".join(P_DATA_TF(pd).encode() for pd in reference.encode_msg(5, max_pdu))
    assert encode_pdata(5, encode_store_rq(p), data, max_pdu) == expected


@pytest.mark.parametrize("kind", ["get", "move"])
@pytest.mark.parametrize(
    ("status", "counts"),
    [
        (0xFF00, (5, 1, 0, 0)),  # pending after a sub-operation
        (0x0000, (None, 300, 0, 0)),  # final success: no remaining count
        (0xB000, (None, 298, 2, 0)),  # final warning (FailedSOPInstanceUIDList is separate)
    ],
)
def test_retrieve_rsp_command_matches_pynetdicom(kind, status, counts):
    from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP
    from pynetdicom.dimse_primitives import C_GET, C_MOVE

    from appliance.dicom.fastpath import encode_retrieve_rsp

    primitive = (C_GET if kind == "get" else C_MOVE)()
    primitive.MessageIDBeingRespondedTo = 3
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.3"
    primitive.Status = status
    (
        primitive.NumberOfRemainingSuboperations,
        primitive.NumberOfCompletedSuboperations,
        primitive.NumberOfFailedSuboperations,
        primitive.NumberOfWarningSuboperations,
    ) = counts
    reference = (C_GET_RSP if kind == "get" else C_MOVE_RSP)()
    reference.primitive_to_message(primitive)
    assert encode_retrieve_rsp(primitive) == encode(reference.command_set, True, True)
