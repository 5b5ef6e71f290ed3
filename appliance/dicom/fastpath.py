"""Latency fixes for pynetdicom, applied per association, so a durable C-STORE can run at
gigabit line rate.

Measured on the development machine (300 CT slices, storescu over loopback), a bare pynetdicom
SCP spends ~4 ms per 525 KB instance, of which only ~1 ms is work:
- its DUL and association reactors poll with fixed 1 ms sleeps: ~1.2 ms passed between our
  C-STORE-RSP and reading the next request, ~0.4 ms between a complete message and its
  handler. We make those sleeps end as soon as there is work (socket readable, primitive
  queued, DIMSE message complete), keeping the same loops and the same upper bound;
- encoding a C-STORE-RSP through pydicom Datasets costs ~1 ms; `encode_store_rsp` writes the
  same bytes directly (golden-tested against pynetdicom's encoder);
- pynetdicom sets neither TCP_NODELAY nor TCP_QUICKACK. Against Nagle-on peers (Debian's
  DCMTK and Orthanc by default) every message then waits for a delayed ACK (~40 ms): we set
  NODELAY and re-arm QUICKACK before each read;
- pynetdicom accepts the first transfer syntax of *its own* list that the requestor proposed;
  `_prefer_requestor_order` re-picks the requestor's first supported one, so a modality
  offering "JPEG lossless, then uncompressed" keeps its compression and DCMTK's explicit-VR-
  first proposals are honoured (PS3.8 9.3.3.2 leaves the choice to the acceptor);
- sending a C-STORE-RQ (C-GET/C-MOVE sub-operations) to a peer with 16 KB PDUs takes one
  trip through the DUL thread's state machine per fragment (~33 per CT slice), plus a
  pydicom-encoded command set; `encode_store_rq` and `encode_pdata` build the same bytes
  directly and the DUL writes them in one call; and the sending thread no longer waits up to
  1 ms for the association's reactor to notice it should pause;
- C-GET/C-MOVE sub-operations re-encode each dataset; `RawInstance` carries the stored bytes
  so they go out exactly as received (no silent transcoding, no decode cost).

The hooks rely on pynetdicom 3.0 internals (pinned <3.1 in pyproject.toml); `install()`
refuses other versions and the node then runs on plain pynetdicom, only slower.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
import types
import weakref
import zlib
from io import BytesIO
from typing import Any

import pydicom.config
import pynetdicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import _config as pynetdicom_config
from pynetdicom import acse as _acse
from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dul as _dul
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

_SUPPORTED = ("3.0.",)
_installed = False
_real_sleep = time.sleep

# -- process-wide hooks ------------------------------------------------------------------


def install() -> bool:
    """Install the process-wide hooks once; False (and plain pynetdicom) on other versions."""
    global _installed
    # pynetdicom logs C-FIND identifiers (patient names, IDs) at INFO from its default
    # handlers; we log our own events without patient attributes instead.
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    # A gateway stores what modalities send as received; value validation would only emit
    # warnings per element on the hot path and cannot change the bytes we keep.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    if _installed:
        return True
    if not pynetdicom.__version__.startswith(_SUPPORTED):
        log.warning("pynetdicom %s: DICOM fast path disabled", pynetdicom.__version__)
        return False
    shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if k[:2] != "__"})
    shim.sleep = _wakeable_sleep
    # Both reactors call `time.sleep` through their module's `time` name.
    _dul.time = shim  # type: ignore[attr-defined]
    _association.time = shim  # type: ignore[attr-defined]
    _association.encode = _encode_passthrough(_association.encode)  # type: ignore[attr-defined]
    _acse.negotiate_as_acceptor = _prefer_requestor_order(_acse.negotiate_as_acceptor)
    _installed = True
    return True


def _prefer_requestor_order(negotiate: Any) -> Any:
    def negotiate_as_acceptor(rq_contexts: Any, ac_contexts: Any, roles: Any = None) -> Any:
        result, result_roles = negotiate(rq_contexts, ac_contexts, roles)
        supported = {cx.abstract_syntax: set(cx.transfer_syntax) for cx in ac_contexts}
        requested = {cx.context_id: cx for cx in rq_contexts}
        for cx in result:
            rq = requested.get(cx.context_id)
            if cx.result != 0x00 or rq is None:
                continue
            ours = supported.get(cx.abstract_syntax, set())
            first = next((ts for ts in rq.transfer_syntax if ts in ours), None)
            if first is not None:
                cx.transfer_syntax = [first]
        return result, result_roles

    return negotiate_as_acceptor


def _wakeable_sleep(seconds: float) -> None:
    """time.sleep for pynetdicom's reactor threads: returns early when their work arrives."""
    wait = getattr(threading.current_thread(), "_dicomesh_wait", None)
    if wait is None:
        _real_sleep(seconds)
    else:
        wait(seconds)


# -- per-association tuning ---------------------------------------------------------------


class _SignallingQueue(queue.Queue):
    """A Queue that calls `notify` after every put (wakes the consumer's wait)."""

    def __init__(self, notify: Any, items: list[Any]) -> None:
        super().__init__()
        self._notify = notify
        for item in items:
            super()._put(item)

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._notify()


def tune_association(assoc: _association.Association, wrapper: Any = None) -> None:
    """Apply NODELAY/QUICKACK, event-driven reactor waits and the fast RSP encoder.

    `wrapper` is the association's AssociationSocket when it is not attached yet (outgoing
    associations are tuned while pynetdicom creates their socket)."""
    if getattr(assoc, "_dicomesh_tuned", False):
        return
    assoc._dicomesh_tuned = True  # type: ignore[attr-defined]
    wrapper = wrapper if wrapper is not None else assoc.dul.socket
    raw = getattr(wrapper, "socket", None)
    if isinstance(raw, socket.socket) and raw.family in (socket.AF_INET, socket.AF_INET6):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wrapper.recv = types.MethodType(_recv_quickack, wrapper)  # type: ignore[method-assign]
    if not _installed:
        return
    dul = assoc.dul
    wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    weakref.finalize(dul, os.close, wake_fd)

    def wake_dul() -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.eventfd_write(wake_fd, 1)

    def dul_wait(seconds: float) -> None:
        sock = getattr(dul.socket, "socket", None)
        try:
            ready, _, _ = select.select(
                [wake_fd] if sock is None else [sock, wake_fd], [], [], seconds
            )
        except (OSError, ValueError):  # socket closed under us: behave like the plain sleep
            _real_sleep(seconds)
            return
        if wake_fd in ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(wake_fd)

    # The DUL thread waits for socket data or a primitive to send; the association thread
    # for a complete DIMSE message.
    dul.to_provider_queue = _SignallingQueue(wake_dul, list(dul.to_provider_queue.queue))
    dul._dicomesh_wait = dul_wait  # type: ignore[attr-defined]
    message_ready = threading.Event()

    def assoc_wait(seconds: float) -> None:
        message_ready.wait(seconds)
        message_ready.clear()

    dimse = assoc.dimse
    dimse.msg_queue = _SignallingQueue(message_ready.set, list(dimse.msg_queue.queue))
    assoc._dicomesh_wait = assoc_wait  # type: ignore[attr-defined]
    dimse.send_msg = types.MethodType(_send_msg, dimse)  # type: ignore[method-assign]
    dul._send = types.MethodType(_dul_send, dul)  # type: ignore[method-assign]
    assoc._reactor_checkpoint = _ReactorCheckpoint(
        assoc, message_ready, assoc._reactor_checkpoint.is_set()
    )


class _ReactorCheckpoint(threading.Event):
    """The association reactor's pause checkpoint (`_reactor_checkpoint`), made race-free.

    send_c_store() clears it, then polls `_is_paused` until the reactor parks in wait(). In
    pynetdicom the reactor sets `_is_paused = False` only after wait() returned, so a second
    send_c_store() right after the first can see the stale True, send, and then lose its
    response to the reactor ("Received unexpected C-STORE service message"). Here wait()
    clears `_is_paused` under the event's own lock, atomically with seeing the flag set, and
    clear() wakes the reactor's tick so it parks at once."""

    def __init__(self, assoc: Any, wake: threading.Event, initially_set: bool) -> None:
        super().__init__()
        self._assoc = assoc
        self._wake = wake
        if initially_set:
            self.set()

    def clear(self) -> None:
        super().clear()
        self._wake.set()

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:  # threading.Event's condition: set()/clear() take it too
            passed = self._cond.wait_for(self.is_set, timeout)
            if passed:
                self._assoc._is_paused = False
            return passed


def _recv_quickack(self: Any, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv, re-arming TCP_QUICKACK before each read (see module doc)."""
    sock: socket.socket = self.socket
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    try:
        while got < nr_bytes:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                break
            got += n
    finally:
        view.release()
    if got < nr_bytes:
        del buf[got:]  # connection closed: return what arrived, like pynetdicom does
    return buf


# -- C-STORE-RSP encoder ------------------------------------------------------------------

_ORIGINAL_SEND_MSG = _dimse.DIMSEServiceProvider.send_msg
_ORIGINAL_DUL_SEND = _dul.DULServiceProvider._send


def _element(element: int, value: bytes) -> bytes:
    # Command sets are Implicit VR Little Endian (PS3.7 6.3.1): group 0000, tag, length, value.
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw  # UI pads with NUL (PS3.5 6.2)


def encode_store_rsp(primitive: C_STORE) -> bytes:
    """The command set of a C-STORE-RSP without comment/offending element (PS3.7 9.3.1.2)."""
    body = b"".join(
        (
            _element(0x0002, _uid(str(primitive.AffectedSOPClassUID))),
            _element(0x0100, struct.pack("<H", 0x8001)),
            _element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
            _element(0x0800, struct.pack("<H", 0x0101)),  # no data set
            _element(0x0900, struct.pack("<H", primitive.Status)),
            _element(0x1000, _uid(str(primitive.AffectedSOPInstanceUID))),
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _ae(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw  # AE pads with a space (PS3.5 6.2)


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def encode_store_rq(primitive: C_STORE) -> bytes:
    """The command set of a C-STORE-RQ with a data set (PS3.7 9.3.1.1)."""
    parts = [
        _element(0x0002, _uid(str(primitive.AffectedSOPClassUID))),
        _element(0x0100, _us(0x0001)),
        _element(0x0110, _us(primitive.MessageID)),
        _element(0x0700, _us(primitive.Priority)),
        _element(0x0800, _us(0x0001)),  # a data set follows
        _element(0x1000, _uid(str(primitive.AffectedSOPInstanceUID))),
    ]
    if primitive.MoveOriginatorApplicationEntityTitle is not None:
        parts.append(_element(0x1030, _ae(primitive.MoveOriginatorApplicationEntityTitle)))
    if primitive.MoveOriginatorMessageID is not None:
        parts.append(_element(0x1031, _us(primitive.MoveOriginatorMessageID)))
    body = b"".join(parts)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def encode_pdata(context_id: int, command: bytes, data: bytes, max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying a DIMSE message, fragmented for a peer's maximum PDU length
    exactly as pynetdicom fragments it (PS3.8 9.3.5, E.2)."""
    step = max_pdu - 6 if max_pdu else 0  # 6: PDV item length, context ID, control header
    out: list[bytes] = []
    for payload, more, last in ((command, 0x01, 0x03), (data, 0x00, 0x02)):
        view = memoryview(payload)
        pieces = [view[i : i + step] for i in range(0, len(view), step)] if step else [view]
        for n, piece in enumerate(pieces):
            control = last if n == len(pieces) - 1 else more
            item_length = len(piece) + 2
            out.append(struct.pack(">BBIIBB", 0x04, 0, item_length + 4, item_length,
                                   context_id, control))  # fmt: skip
            out.append(piece)
    return b"".join(out)


class _Encoded(bytes):
    """A P-DATA value standing for whole, already encoded P-DATA-TF PDUs (`.wire`)."""

    wire: bytes


def _dul_send(self: Any, pdu: Any) -> None:
    """DULServiceProvider._send that writes pre-encoded PDUs as they are."""
    items = getattr(pdu, "presentation_data_value_items", None)
    if items and len(items) == 1 and isinstance(items[0].presentation_data_value, _Encoded):
        wrapper = self.socket
        if wrapper is None or wrapper.socket is None:
            log.warning("attempted to send data over a closed connection")
            return
        try:
            wrapper.socket.sendall(items[0].presentation_data_value.wire)
        except OSError:
            self.event_queue.put("Evt17")  # transport closed, as AssociationSocket.send does
        return
    _ORIGINAL_DUL_SEND(self, pdu)


def _send_store_rq(self: Any, primitive: C_STORE, context_id: int) -> bool:
    if self.assoc.get_handlers(evt.EVT_PDU_SENT) or self.assoc.get_handlers(evt.EVT_DATA_SENT):
        return False  # someone observes individual PDUs: let pynetdicom produce them
    dataset = primitive.DataSet
    if not isinstance(dataset, BytesIO) or primitive.MessageID is None:
        return False
    data = dataset.getvalue()
    if not data or primitive.AffectedSOPClassUID is None or primitive.Priority is None:
        return False
    marker = _Encoded(b"\x00")
    marker.wire = encode_pdata(context_id, encode_store_rq(primitive), data, self.maximum_pdu_size)
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, marker))
    self.dul.send_pdu(pdata)
    return True


_RETRIEVE_RSP_FIELD = {C_GET: 0x8010, C_MOVE: 0x8021}
_SUBOPERATION_COUNTS = (
    (0x1020, "NumberOfRemainingSuboperations"),
    (0x1021, "NumberOfCompletedSuboperations"),
    (0x1022, "NumberOfFailedSuboperations"),
    (0x1023, "NumberOfWarningSuboperations"),
)


def encode_retrieve_rsp(primitive: C_GET | C_MOVE) -> bytes:
    """The command set of a C-GET/C-MOVE-RSP without identifier, comment or offending
    element (PS3.7 9.3.3.2, 9.3.4.2): the pending response sent after each sub-operation."""
    parts = [
        _element(0x0002, _uid(str(primitive.AffectedSOPClassUID))),
        _element(0x0100, _us(_RETRIEVE_RSP_FIELD[type(primitive)])),
        _element(0x0120, _us(primitive.MessageIDBeingRespondedTo)),
        _element(0x0800, _us(0x0101)),  # no data set
        _element(0x0900, _us(primitive.Status)),
    ]
    for element, keyword in _SUBOPERATION_COUNTS:
        value = getattr(primitive, keyword)
        if value is not None:
            parts.append(_element(element, _us(value)))
    body = b"".join(parts)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _fast_command(primitive: Any) -> bytes | None:
    """The encoded command set of a data-set-less response we encode directly, else None."""
    kind = type(primitive)
    if (
        kind not in (C_STORE, C_GET, C_MOVE)
        or primitive.MessageIDBeingRespondedTo is None
        or primitive.Status is None
        or primitive.ErrorComment is not None
        or primitive.OffendingElement is not None
        or not primitive.AffectedSOPClassUID
    ):
        return None
    if kind is C_STORE:
        return encode_store_rsp(primitive) if primitive.AffectedSOPInstanceUID else None
    return None if primitive.Identifier is not None else encode_retrieve_rsp(primitive)


def _send_msg(self: Any, primitive: Any, context_id: int) -> None:
    if self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        _ORIGINAL_SEND_MSG(self, primitive, context_id)
        return
    if (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is None
        and _send_store_rq(self, primitive, context_id)
    ):
        return
    command = _fast_command(primitive)
    if command is not None:
        max_pdu = self.maximum_pdu_size
        if not max_pdu or len(command) + 6 <= max_pdu:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
            self.dul.send_pdu(pdata)
            return
    _ORIGINAL_SEND_MSG(self, primitive, context_id)


# -- sending stored bytes as they are --------------------------------------------------------


class RawInstance(Dataset):
    """A stored instance to send in C-GET/C-MOVE sub-operations: it carries the bytes exactly
    as received; only the attributes pynetdicom needs to pick a context are decoded.

    `raw=None` marks an instance that could not be read: encoding it fails, which pynetdicom
    counts as a failed sub-operation and lists in FailedSOPInstanceUIDList."""

    def __init__(
        self, raw: bytes | None, sop_class_uid: str, sop_instance_uid: str, ts: str
    ) -> None:
        super().__init__()
        self.SOPClassUID = UID(sop_class_uid)
        self.SOPInstanceUID = UID(sop_instance_uid)
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = UID(ts)
        self._raw = raw

    @property
    def raw(self) -> bytes | None:
        return self._raw


def _encode_passthrough(original: Any) -> Any:
    def encode(ds: Any, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False):
        if isinstance(ds, RawInstance):
            if ds.raw is None:
                raise ValueError(f"instance {ds.SOPInstanceUID} could not be read")
            ts = ds.file_meta.TransferSyntaxUID
            if (ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated) == (
                is_implicit_vr,
                is_little_endian,
                deflated,
            ):
                return ds.raw
            # The receiver accepted only another uncompressed syntax: a lossless re-encoding
            # (pynetdicom only converts between uncompressed syntaxes).
            return original(decode_raw(ds.raw, ts), is_implicit_vr, is_little_endian, deflated)
        return original(ds, is_implicit_vr, is_little_endian, deflated)

    return encode


def decode_raw(raw: bytes, ts: UID) -> Dataset:
    """A full pydicom Dataset from a data set encoded in transfer syntax `ts`."""
    if ts.is_deflated:
        raw = zlib.decompress(raw, -zlib.MAX_WBITS)
    return read_dataset(BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian)
