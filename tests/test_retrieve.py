"""C-GET (getscu) and C-MOVE (movescu to a DCMTK storescp registered in `dicom.nodes`) against
a real gateway: what comes back is what was stored, element for element and byte for byte;
and the failure statuses of PS3.4 C.4.2/C.4.3 (pynetdicom requestor, to read them).

The DCMTK receivers run with ``+B`` (bit-preserving: the data set is written to disk as it
arrived), so comparing bytes compares what the gateway sent, not DCMTK's re-encoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dcmtk import StoreSCP, getscu, movescu, storescu
from gateway import Gateway
from nodekit import (
    assert_same_bytes,
    assert_same_elements,
    association,
    by_sop_uid,
    c_get,
    identifier,
    running_gateway,
    wait_until,
)
from procs import LOOPBACK, free_port
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from studygen import SeriesInfo, generate_ct_series

pytestmark = pytest.mark.timeout(120)

DEST_AE = "DESTSCP"
STATUS_SUCCESS = 0x0000
QR_MOVE_DESTINATION_UNKNOWN = 0xA801  # PS3.4 C.4.2.1.5
QR_IDENTIFIER_MISMATCH = 0xA900  # PS3.4 C.4.2.1.5, C.4.3.1.4
BIT_PRESERVING = ("+B",)
DIMSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RetrieveData:
    gw: Gateway
    dest_port: int
    series: tuple[SeriesInfo, SeriesInfo]  # one small study, two series
    ct512: SeriesInfo  # 24 slices of 512x512, its own study

    def originals(self) -> dict[str, Path]:
        paths = [p for s in (*self.series, self.ct512) for p in s.paths]
        return dict(
            zip((u for s in (*self.series, self.ct512) for u in s.sop_uids), paths, strict=True)
        )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, ct_series: SeriesInfo) -> Iterator[RetrieveData]:
    root = tmp_path_factory.mktemp("retrieve-data")
    first = generate_ct_series(root, 3, rows=64, cols=64, seed=201, series_number=1)
    second = generate_ct_series(root, 2, rows=64, cols=64, seed=201, series_number=2)
    assert first.study_uid == second.study_uid
    dest_port = free_port()
    node = {"ae_title": DEST_AE, "host": LOOPBACK, "port": dest_port}
    # A lost DIMSE response fails its sub-operation after 5 s instead of 120 s.
    dicom = {"nodes": [node], "dimse_timeout_s": DIMSE_TIMEOUT_S}
    with running_gateway(tmp_path_factory, "retrieve-gw", dicom=dicom) as gw:
        run = storescu(
            gw.host, gw.port, gw.ae_title, [*first.paths, *second.paths, *ct_series.paths]
        )
        assert run.ok, run.stderr
        assert len(run.results) == 5 + len(ct_series.paths)
        yield RetrieveData(gw, dest_port, (first, second), ct_series)


def _level_keys(data: RetrieveData, level: str) -> tuple[list[str], list[str]]:
    """(identifier keys, SOP Instance UIDs they should retrieve) for the small study."""
    first, second = data.series
    study = f"StudyInstanceUID={first.study_uid}"
    if level == "STUDY":
        return [study], [*first.sop_uids, *second.sop_uids]
    if level == "SERIES":
        return [study, f"SeriesInstanceUID={second.series_uid}"], list(second.sop_uids)
    wanted = [first.sop_uids[0], first.sop_uids[2]]  # List of UID Matching (C.4.2.2.1)
    keys = [study, f"SeriesInstanceUID={first.series_uid}", "SOPInstanceUID=" + "\\".join(wanted)]
    return keys, wanted


def _get(data: RetrieveData, keys: list[str], outdir: Path) -> dict[str, Path]:
    gw = data.gw
    proc = getscu(gw.host, gw.port, gw.ae_title, keys, outdir, extra=BIT_PRESERVING)
    assert proc.returncode == 0, proc.stderr
    return by_sop_uid(sorted(outdir.iterdir()))


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
def test_get_returns_what_was_stored(data: RetrieveData, level: str, tmp_path: Path) -> None:
    keys, wanted = _level_keys(data, level)
    received = _get(data, [f"QueryRetrieveLevel={level}", *keys], tmp_path / "get")
    assert sorted(received) == sorted(wanted)
    originals = data.originals()
    for uid, path in received.items():
        assert_same_elements(path, originals[uid])
        assert_same_bytes(path, originals[uid])


def test_get_sends_the_stored_bytes_of_a_full_size_series(
    data: RetrieveData, tmp_path: Path
) -> None:
    """512x512 slices (several P-DATA fragments each) stored in Explicit VR Little Endian come
    back in it, bytes unchanged: getscu proposes Explicit VR LE first for every storage class
    and the gateway must neither pick another syntax nor re-encode."""
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={data.ct512.study_uid}"]
    received = _get(data, keys, tmp_path / "get")
    assert sorted(received) == sorted(data.ct512.sop_uids)
    originals = data.originals()
    for uid, path in received.items():
        assert_same_elements(path, originals[uid])
        assert_same_bytes(path, originals[uid])


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
def test_move_returns_what_was_stored(data: RetrieveData, level: str, tmp_path: Path) -> None:
    keys, wanted = _level_keys(data, level)
    gw = data.gw
    with StoreSCP(tmp_path / "scp", DEST_AE, port=data.dest_port, extra=BIT_PRESERVING) as scp:
        proc = movescu(
            gw.host, gw.port, gw.ae_title, [f"QueryRetrieveLevel={level}", *keys], DEST_AE
        )
        assert proc.returncode == 0, proc.stderr
        # movescu returns once the C-MOVE finished, i.e. after every sub-operation's response;
        # storescp writes a file before responding, so this holds at once.
        wait_until(lambda: len(scp.files()) == len(wanted), 2.0, "moved files on disk")
        received = by_sop_uid(scp.files())
    assert sorted(received) == sorted(wanted)
    originals = data.originals()
    for uid, path in received.items():
        assert_same_elements(path, originals[uid])
        assert_same_bytes(path, originals[uid])


def test_repeated_moves_each_deliver_every_instance(data: RetrieveData, tmp_path: Path) -> None:
    """Back-to-back sub-operations of small instances, ten times over: every C-STORE-RSP
    from the destination must reach the sub-operation waiting for it (a response taken by
    the outgoing association's reactor instead stalls the move for the DIMSE timeout and
    fails the remaining sub-operations: status 0xB000, movescu exit 68)."""
    series = generate_ct_series(tmp_path / "src", 20, rows=16, cols=16, seed=202)
    gw = data.gw
    assert storescu(gw.host, gw.port, gw.ae_title, series.paths).ok
    keys = [
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={series.study_uid}",
        f"SeriesInstanceUID={series.series_uid}",
    ]
    for attempt in range(1, 11):
        with StoreSCP(tmp_path / f"scp{attempt}", DEST_AE, port=data.dest_port) as scp:
            proc = movescu(gw.host, gw.port, gw.ae_title, keys, DEST_AE)
            assert proc.returncode == 0, f"move {attempt}: {proc.stderr}"
            wait_until(lambda: len(scp.files()) == 20, 2.0, f"move {attempt}: 20 files")
            assert sorted(by_sop_uid(scp.files())) == sorted(series.sop_uids)


# -- failures (pynetdicom requestor: it reports the final status) ---------------------------


def test_move_to_unknown_destination_is_refused(data: RetrieveData) -> None:
    query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=data.series[0].study_uid)
    model = StudyRootQueryRetrieveInformationModelMove
    with association(data.gw, [(model, ["1.2.840.10008.1.2.1"])]) as assoc:
        statuses = [s for s, _ in assoc.send_c_move(query, "NOWHERE", model)]
    assert [int(s.Status) for s in statuses] == [QR_MOVE_DESTINATION_UNKNOWN]


def test_get_without_unique_key_is_refused(data: RetrieveData) -> None:
    query = identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=data.series[0].study_uid)
    statuses, received = c_get(data.gw, query, [(CTImageStorage, ["1.2.840.10008.1.2.1"])])
    assert [int(s.Status) for s in statuses] == [QR_IDENTIFIER_MISMATCH]
    assert received.datasets == {}


def test_move_without_unique_key_is_refused(data: RetrieveData, tmp_path: Path) -> None:
    query = identifier(QueryRetrieveLevel="STUDY", PatientID="DCMESH-TEST-0001")
    model = StudyRootQueryRetrieveInformationModelMove
    with StoreSCP(tmp_path / "scp", DEST_AE, port=data.dest_port) as scp:
        with association(data.gw, [(model, ["1.2.840.10008.1.2.1"])]) as assoc:
            statuses = [s for s, _ in assoc.send_c_move(query, DEST_AE, model)]
        assert scp.files() == []
    assert [int(s.Status) for s in statuses] == [QR_IDENTIFIER_MISMATCH]


def test_get_of_unknown_study_succeeds_with_nothing(data: RetrieveData) -> None:
    query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.826.0.1.3680043.8.498.1")
    statuses, received = c_get(
        data.gw,
        query,
        [(CTImageStorage, ["1.2.840.10008.1.2.1"])],
        StudyRootQueryRetrieveInformationModelGet,
    )
    assert len(statuses) == 1
    (final,) = statuses
    assert int(final.Status) == STATUS_SUCCESS
    assert (
        final.NumberOfCompletedSuboperations,
        final.NumberOfFailedSuboperations,
        final.NumberOfWarningSuboperations,
    ) == (0, 0, 0)
    assert received.datasets == {}
