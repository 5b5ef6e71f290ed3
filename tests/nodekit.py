"""Helpers for the DICOM node tests (test_find, test_retrieve, test_store_scp,
test_association): a module-wide gateway, exact instance comparison, raw C-STORE/C-GET with
pynetdicom, and bounded polling.

Sending bytes as they are: pynetdicom's documented ``_config.STORE_SEND_CHUNKED_DATASET``
makes ``Association.send_c_store(path)`` send a file's data set bytes after its file meta
unchanged, with the SOP Class/Instance UIDs of the C-STORE-RQ taken from the file meta and a
presentation context in exactly the file's transfer syntax. So a file with valid file meta
and any data set bytes (random, truncated, inconsistent with the meta) is how the tests put
arbitrary bytes on the wire, without reaching into pynetdicom's DIMSE internals.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomfiles import dataset_bytes, sop_instance_uid
from gateway import Gateway
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

PIXEL_DATA = 0x7FE00010
SCU_AE = "PYSCU"


@contextlib.contextmanager
def running_gateway(
    tmp_path_factory: pytest.TempPathFactory, name: str, **sections: Any
) -> Iterator[Gateway]:
    """A started gateway in its own temp dir, stopped on exit even if a test failed."""
    workdir = tmp_path_factory.mktemp(name)
    gw = Gateway(workdir, **sections)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll `predicate` every 20 ms until it holds; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        time.sleep(0.02)


# -- files ------------------------------------------------------------------------------------


def transfer_syntax(path: Path) -> UID:
    meta, _ = split_dataset(path)
    return UID(meta.TransferSyntaxUID)


def by_sop_uid(paths: list[Path]) -> dict[str, Path]:
    """Files keyed by their SOP Instance UID (fails on a duplicate)."""
    out: dict[str, Path] = {}
    for path in paths:
        uid = sop_instance_uid(path)
        assert uid not in out, f"{uid} received twice: {out[uid]} and {path}"
        out[uid] = path
    return out


def assert_same_elements(received: Path, original: Path) -> None:
    """Every data element (file meta excluded) equal, Pixel Data equal byte for byte."""
    got = pydicom.dcmread(received)
    want = pydicom.dcmread(original)
    got_tags = [int(elem.tag) for elem in got]
    want_tags = [int(elem.tag) for elem in want]
    assert got_tags == want_tags, f"{received.name}: element tags differ"
    for tag in want_tags:
        if tag == PIXEL_DATA:
            continue
        assert got[tag] == want[tag], f"{received.name}: {got[tag]!r} != {want[tag]!r}"
    assert got.PixelData == want.PixelData, f"{received.name}: Pixel Data differs"


def assert_same_bytes(received: Path, original: Path) -> None:
    """The received file carries the original's transfer syntax and data set bytes."""
    assert transfer_syntax(received) == transfer_syntax(original), received.name
    got, want = dataset_bytes(received), dataset_bytes(original)
    assert len(got) == len(want), f"{received.name}: {len(got)} bytes, sent {len(want)}"
    assert got == want, f"{received.name}: data set bytes differ from what was stored"


# -- pynetdicom SCU ---------------------------------------------------------------------------


@contextlib.contextmanager
def raw_sending() -> Iterator[None]:
    """send_c_store(path) sends the file's data set bytes unchanged (see module doc)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


@contextlib.contextmanager
def association(
    gw: Gateway,
    contexts: Sequence[tuple[str, Sequence[str]]] = (),
    *,
    scp_roles: Sequence[str] = (),
    handlers: Sequence[Any] = (),
    calling_ae: str = SCU_AE,
) -> Iterator[Any]:
    """A pynetdicom association with the gateway, released (or aborted) on exit."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    requested = [build_context(abstract, list(syntaxes)) for abstract, syntaxes in contexts]
    roles = [build_role(uid, scp_role=True) for uid in scp_roles]
    assoc = ae.associate(
        gw.host,
        gw.port,
        contexts=requested,
        ae_title=gw.ae_title,
        ext_neg=roles or None,
        evt_handlers=list(handlers),
    )
    assert assoc.is_established, "association with the gateway not established"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def c_find(
    gw: Gateway, query: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind
) -> list[tuple[int, Dataset | None]]:
    """All (status, identifier) responses of one C-FIND."""
    with association(gw, [(model, ["1.2.840.10008.1.2.1"])]) as assoc:
        return [(int(s.Status), i) for s, i in assoc.send_c_find(query, model)]


@dataclass
class Received:
    """C-STORE sub-operations a pynetdicom C-GET requestor received, as they came."""

    datasets: dict[str, bytes] = field(default_factory=dict)  # SOP UID -> data set bytes
    syntaxes: dict[str, str] = field(default_factory=dict)  # SOP UID -> transfer syntax

    def on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.datasets[uid] = event.request.DataSet.getvalue()
        self.syntaxes[uid] = str(event.context.transfer_syntax)
        return 0x0000


def c_get(
    gw: Gateway,
    query: Dataset,
    storage: Sequence[tuple[str, Sequence[str]]],
    model: str = StudyRootQueryRetrieveInformationModelGet,
) -> tuple[list[Dataset], Received]:
    """C-GET with a pynetdicom requestor proposing exactly `storage` (SOP class, syntaxes)
    as Storage SCP; the response statuses and what it received."""
    received = Received()
    contexts = [(model, ["1.2.840.10008.1.2.1"]), *storage]
    with association(
        gw,
        contexts,
        scp_roles=sorted({sop_class for sop_class, _ in storage}),
        handlers=[(evt.EVT_C_STORE, received.on_store)],
    ) as assoc:
        statuses = [status for status, _ in assoc.send_c_get(query, model)]
    return statuses, received


def identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds
