"""The pynetdicom fast path (appliance.dicom.fastpath): golden C-STORE-RSP bytes, the
RawInstance encode passthrough, and per-association tuning on a real loopback association."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pydicom.config
import pytest
from procs import free_port
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom import association as pynetdicom_association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as pynetdicom_encode
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, Verification

from appliance.dicom import fastpath
from appliance.dicom.config import DicomConfig
from appliance.dicom.fastpath import RawInstance, encode_store_rsp
from appliance.dicom.scp import DicomNodeServer, GatewayAE
from appliance.store import Store
from appliance.store.config import StoreConfig

pytestmark = pytest.mark.timeout(30)

LOOPBACK = "127.0.0.1"
CT_ODD = CTImageStorage  # 25 characters
XA_EVEN = "1.2.840.10008.5.1.4.1.1.12.1"  # 28 characters
UID_64 = "1.2.826.0.1.3680043.8.498." + "1" * 38  # the maximum UI length


@pytest.fixture
def installed() -> Iterator[None]:
    """fastpath.install(), with the process-wide settings it changes restored afterwards
    (its pynetdicom hooks stay: they are idempotent and delegate everything else)."""
    settings = pydicom.config.settings
    saved = (
        settings.reading_validation_mode,
        settings.writing_validation_mode,
        pynetdicom_config.LOG_HANDLER_LEVEL,
    )
    assert fastpath.install(), "fast path refused this pynetdicom version"
    yield
    (
        settings.reading_validation_mode,
        settings.writing_validation_mode,
        pynetdicom_config.LOG_HANDLER_LEVEL,
    ) = saved


# ---------------------------------------------------------------- C-STORE-RSP golden bytes


def _rsp(sop_class: str, sop_instance: str, message_id: int, status: int) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    return primitive


def _reference_rsp(primitive: C_STORE) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(primitive)
    return pynetdicom_encode(msg.command_set, True, True)


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "message_id", "status"),
    [
        (CT_ODD, "1.2.3.4", 1, 0x0000),  # odd class, odd instance
        (CT_ODD, "1.2.3.45", 65535, 0x0000),  # odd class, even instance
        (XA_EVEN, "1.2.3.4", 1, 0xA700),  # even class, odd instance
        (XA_EVEN, "1.2.3.45", 65535, 0xB000),  # even class, even instance
        (CT_ODD, UID_64, 1, 0xC000),  # 64-character instance UID
        (XA_EVEN, UID_64[:63], 65535, 0xA700),  # 63 characters: padded to 64
        (UID_64, "1.2.3.45", 2, 0xB000),
    ],
    ids=[
        "odd-odd-id1-success",
        "odd-even-id65535-success",
        "even-odd-id1-A700",
        "even-even-id65535-B000",
        "odd-64chars-id1-C000",
        "even-63chars-id65535-A700",
        "64chars-even-id2-B000",
    ],
)
def test_encode_store_rsp_matches_pynetdicom(
    sop_class: str, sop_instance: str, message_id: int, status: int
) -> None:
    primitive = _rsp(sop_class, sop_instance, message_id, status)
    expected = _reference_rsp(primitive)
    assert encode_store_rsp(primitive) == expected
    assert len(expected) % 2 == 0


# ---------------------------------------------------------------- RawInstance passthrough


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["test_fastpath", "sop"])
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PAT-1"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["test_fastpath", "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["test_fastpath", "series"])
    ds.InstanceNumber = 7
    ds.ImagePositionPatient = ["0.5", "-1.25", "10"]
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x01\x00\x02\x00\x03\x00\x04\x00"
    ds["PixelData"].VR = "OW"
    return ds


def _encoded(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _decoded(raw: bytes, implicit: bool) -> Dataset:
    return read_dataset(BytesIO(raw), implicit, True)


def _values(ds: Dataset) -> dict[int, object]:
    return {int(elem.tag): elem.value for elem in ds}


def test_raw_instance_goes_out_as_received(installed: None) -> None:
    ds = _dataset()
    raw = _encoded(ds, implicit=False)
    inst = RawInstance(raw, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    out = pynetdicom_association.encode(inst, False, True, False)
    assert out is raw


def test_raw_instance_reencoded_for_another_syntax(installed: None) -> None:
    ds = _dataset()
    raw = _encoded(ds, implicit=False)
    inst = RawInstance(raw, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    out = pynetdicom_association.encode(inst, True, True, False)
    assert isinstance(out, bytes)
    assert out != raw
    assert out == _encoded(ds, implicit=True)
    assert _values(_decoded(out, implicit=True)) == _values(_decoded(raw, implicit=False))


def test_raw_instance_that_could_not_be_read_fails_to_encode(installed: None) -> None:
    inst = RawInstance(None, CTImageStorage, "1.2.3.4", ImplicitVRLittleEndian)
    with pytest.raises(ValueError, match=r"1\.2\.3\.4"):
        pynetdicom_association.encode(inst, True, True, False)


def test_plain_datasets_still_encode_normally(installed: None) -> None:
    ds = _dataset()
    assert pynetdicom_association.encode(ds, True, True, False) == _encoded(ds, implicit=True)


# ---------------------------------------------------------------- tune_association


def _nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def _association_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, pynetdicom_association.Association)]


@pytest.mark.parametrize("scu_kind", ["tuned after associate", "GatewayAE"])
def test_tune_association_on_a_loopback_association(installed: None, scu_kind: str) -> None:
    stored: list[str] = []
    scp_nodelay: list[bool] = []

    def on_conn_open(event: evt.Event) -> None:  # what DicomNodeServer does
        fastpath.tune_association(event.assoc)

    def on_echo(event: evt.Event) -> int:
        scp_nodelay.append(_nodelay(event.assoc.dul.socket.socket))
        return 0x0000

    def on_store(event: evt.Event) -> int:
        scp_nodelay.append(_nodelay(event.assoc.dul.socket.socket))
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    before = set(_association_threads())
    scp = AE(ae_title="TUNESCP")
    scp.add_supported_context(Verification)
    scp.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = scp.start_server(
        (LOOPBACK, 0),
        block=False,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, on_conn_open),
            (evt.EVT_C_ECHO, on_echo),
            (evt.EVT_C_STORE, on_store),
        ],
    )
    # GatewayAE is what the gateway uses for outgoing (C-MOVE) associations: it tunes the
    # socket while pynetdicom creates it.
    scu = GatewayAE(ae_title="TUNESCU") if scu_kind == "GatewayAE" else AE(ae_title="TUNESCU")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 10
    scu.add_requested_context(Verification)
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    try:
        assoc = scu.associate(LOOPBACK, server.server_address[1], ae_title="TUNESCP")
        assert assoc.is_established
        client_sock = assoc.dul.socket.socket
        if scu_kind != "GatewayAE":
            assert not _nodelay(client_sock)  # pynetdicom alone leaves Nagle on
            fastpath.tune_association(assoc)
        assert _nodelay(client_sock)

        echo = assoc.send_c_echo()
        assert echo.Status == 0x0000
        ds = _dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        rsp = assoc.send_c_store(ds)
        assert rsp.Status == 0x0000
        assert stored == [ds.SOPInstanceUID]
        assert scp_nodelay == [True, True]
        assoc.release()
        assert assoc.is_released
    finally:
        scu.shutdown()
        scp.shutdown()
    # No association thread outlives the test.
    for thread in set(_association_threads()) - before:
        thread.join(timeout=5)
    assert not set(_association_threads()) - before


def test_node_server_shares_its_contexts_with_every_association(
    installed: None, tmp_path: Path
) -> None:
    """The gateway's acceptor contexts (every storage class x every syntax) are not copied
    per association (pynetdicom deep-copies them: ~40 ms before each A-ASSOCIATE-AC, on each
    C-MOVE sub-association from a PACS), and sharing them changes no negotiation result:
    a C-GET requestor still gets the SCP role for storage, each association its own."""
    store = Store(StoreConfig(min_free_bytes=0), tmp_path / "store")
    node = DicomNodeServer(DicomConfig(ae_title="SHARED", port=free_port(), listen=LOOPBACK), store)
    node.start()
    scu = AE(ae_title="SHARESCU")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 10
    scu.add_requested_context(Verification)
    scu.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CTImageStorage
    role.scu_role, role.scp_role = False, True
    snapshot = [(str(cx), cx.scu_role, cx.scp_role) for cx in node.ae.supported_contexts]
    seen: list[list[object]] = []
    try:
        for _ in range(2):
            assoc = scu.associate(LOOPBACK, node.port, ae_title="SHARED", ext_neg=[role])
            assert assoc.is_established
            ct = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage]
            assert len(ct) == 1 and ct[0].as_scp, "C-GET requestor lost its SCP role"
            assert assoc.send_c_echo().Status == 0x0000
            acceptor = node.active_associations()[0].acceptor
            seen.append(acceptor.supported_contexts)
            assoc.release()
            assert assoc.is_released
            assert wait_for(lambda: not node.active_associations())
        served = node._server.contexts  # type: ignore[union-attr]
        by_id = {id(cx) for cx in served}
        for contexts in seen:
            assert len(contexts) == len(served)
            assert {id(cx) for cx in contexts} == by_id, "contexts copied per association"
        assert [(str(cx), cx.scu_role, cx.scp_role) for cx in node.ae.supported_contexts] == (
            snapshot
        ), "an association changed the shared contexts"
    finally:
        scu.shutdown()
        node.stop(grace=5)
        store.close()


def wait_for(ready: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
