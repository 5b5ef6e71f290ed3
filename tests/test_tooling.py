"""Tests of the test tooling itself: study generator, DCMTK drivers, Orthanc fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dcmtk import StoreSCP, echoscu, findscu, getscu, movescu, storescu
from orthanc import Orthanc
from procs import LOOPBACK, free_port
from pydicom.pixels import apply_rescale
from pydicom.uid import UID, CTImageStorage
from pynetdicom import AE, evt
from studygen import generate_ct_series, generate_study

pytestmark = pytest.mark.timeout(120)

SMALL = {"rows": 64, "cols": 64}
STATUS_OUT_OF_RESOURCES = 0xA700  # PS3.4 Annex B.2.3, Refused: Out of Resources


def _sop_uids(paths: list[Path]) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}


def test_generator_writes_readable_ct_slices(tmp_path: Path) -> None:
    info = generate_ct_series(tmp_path, 3, **SMALL)

    assert len(info.paths) == 3
    assert info.total_bytes == sum(p.stat().st_size for p in info.paths)
    zs = []
    for n, path in enumerate(info.paths, start=1):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.SOPClassUID == CTImageStorage
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.StudyInstanceUID == info.study_uid
        assert ds.SeriesInstanceUID == info.series_uid
        assert ds.InstanceNumber == n
        assert ds.Modality == "CT"
        hu = apply_rescale(ds.pixel_array, ds)
        assert hu.shape == (64, 64)
        assert (hu < -900).mean() > 0.2, "air around the body"
        assert (np.abs(hu - 40) < 60).mean() > 0.1, "soft tissue"
        assert (hu > 400).any(), "vertebra"
        zs.append(float(ds.ImagePositionPatient[2]))
        assert float(ds.SliceLocation) == pytest.approx(zs[-1])
    assert zs == sorted(zs)
    assert np.diff(zs) == pytest.approx([1.25, 1.25])


def test_generator_uids_are_deterministic_per_seed(tmp_path: Path) -> None:
    a = generate_ct_series(tmp_path / "a", 3, seed=7, **SMALL)
    b = generate_ct_series(tmp_path / "b", 3, seed=7, **SMALL)
    c = generate_ct_series(tmp_path / "c", 3, seed=8, **SMALL)
    d = generate_ct_series(tmp_path / "d", 3, seed=7, series_number=2, **SMALL)

    assert (a.study_uid, a.series_uid, a.sop_uids) == (b.study_uid, b.series_uid, b.sop_uids)
    assert a.paths[1].read_bytes() == b.paths[1].read_bytes()
    assert c.study_uid != a.study_uid
    assert not set(c.sop_uids) & set(a.sop_uids)
    assert d.study_uid == a.study_uid
    assert d.series_uid != a.series_uid
    assert not set(d.sop_uids) & set(a.sop_uids)
    assert len(set(a.sop_uids)) == 3
    assert all(UID(u).is_valid for u in [a.study_uid, a.series_uid, *a.sop_uids])


def test_generate_study_reaches_target_in_one_study(tmp_path: Path) -> None:
    info = generate_study(tmp_path, target_bytes=200_000, slices_per_series=(5, 8), **SMALL)

    slice_bytes = info.series[0].total_bytes // len(info.series[0].paths)
    assert 200_000 <= info.total_bytes < 200_000 + 2 * slice_bytes
    assert len(info.series) >= 2
    assert {s.study_uid for s in info.series} == {info.study_uid}
    assert len({s.series_uid for s in info.series}) == len(info.series)
    assert _sop_uids(info.paths) == set(info.sop_uids)


def test_storescu_to_storescp_round_trip(tmp_path: Path) -> None:
    info = generate_ct_series(tmp_path / "src", 3, **SMALL)

    with StoreSCP(tmp_path / "scp", "TOOLSCP") as scp:
        run = storescu(scp.host, scp.port, scp.ae_title, tmp_path / "src")
        received = scp.files()

    assert run.returncode == 0, run.stderr
    assert sorted(p for p, _ in run.results) == info.paths
    assert [status for _, status in run.results] == [0x0000] * 3
    assert run.ok
    assert _sop_uids(received) == set(info.sop_uids)


def test_storescu_reports_failure_status_per_file(tmp_path: Path) -> None:
    """A pynetdicom SCP refuses the 2nd instance; the parser must see 0xA700 for that file."""
    info = generate_ct_series(tmp_path, 3, **SMALL)
    refused = info.sop_uids[1]

    def on_store(event: evt.Event) -> int:
        if event.request.AffectedSOPInstanceUID == refused:
            return STATUS_OUT_OF_RESOURCES
        return 0x0000

    ae = AE(ae_title="FAILSCP")
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        halted = storescu(LOOPBACK, port, "FAILSCP", info.paths)
        kept_on = storescu(LOOPBACK, port, "FAILSCP", info.paths, extra=("-nh",))
    finally:
        server.shutdown()

    assert halted.results == [(info.paths[0], 0), (info.paths[1], STATUS_OUT_OF_RESOURCES)]
    assert not halted.ok
    assert kept_on.results == [
        (info.paths[0], 0),
        (info.paths[1], STATUS_OUT_OF_RESOURCES),
        (info.paths[2], 0),
    ]
    assert not kept_on.ok


def test_orthanc_as_pacs(tmp_path: Path) -> None:
    info = generate_ct_series(tmp_path / "src", 3, **SMALL)
    study_keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={info.study_uid}"]

    with (
        StoreSCP(tmp_path / "moved", "MOVEDEST") as dest,
        Orthanc(
            tmp_path / "orthanc", modalities={"dest": ("MOVEDEST", LOOPBACK, dest.port)}
        ) as pacs,
    ):
        echo = echoscu(pacs.host, pacs.dicom_port, pacs.ae_title)
        assert echo.returncode == 0, echo.stderr

        run = storescu(pacs.host, pacs.dicom_port, pacs.ae_title, info.paths)
        assert run.ok, run.stderr
        assert len(run.results) == 3
        assert pacs.instances_count() == 3

        found = findscu(
            pacs.host,
            pacs.dicom_port,
            pacs.ae_title,
            ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "NumberOfStudyRelatedInstances"],
        )
        assert [ds.StudyInstanceUID for ds in found] == [info.study_uid]
        assert int(found[0].NumberOfStudyRelatedInstances) == 3

        got = getscu(pacs.host, pacs.dicom_port, pacs.ae_title, study_keys, tmp_path / "got")
        assert got.returncode == 0, got.stderr
        assert _sop_uids(list((tmp_path / "got").iterdir())) == set(info.sop_uids)

        moved = movescu(pacs.host, pacs.dicom_port, pacs.ae_title, study_keys, "MOVEDEST")
        assert moved.returncode == 0, moved.stderr
        assert _sop_uids(dest.files()) == set(info.sop_uids)
