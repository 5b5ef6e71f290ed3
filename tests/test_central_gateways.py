"""The central PACS broker end to end: a real Orthanc as the central PACS, replica and clinic
gateways as subprocesses on loopback, DCMTK as the clinic's workstation. What the central
PACS served is read from Orthanc's own log (`--verbose`: one "Sending resource" line per
C-MOVE sub-operation resource), never from our code."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from dcmtk import StoreSCP, findscu, getscu, movescu, storescu
from dicomfiles import dataset_bytes, sop_instance_uid
from nodekit import wait_until
from orthanc import Orthanc
from studygen import generate_ct_series

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_SENT = re.compile(r'Sending resource ([0-9a-f-]+) to modality "([^"]+)"')


def _verbose_orthanc(tmp: Path) -> str:
    """Orthanc with --verbose (its log then names every resource a C-MOVE sends)."""
    script = tmp / "orthanc-verbose"
    script.write_text('#!/bin/sh\nexec /usr/sbin/Orthanc --verbose "$@"\n')
    script.chmod(0o755)
    return str(script)


def _register(orthanc: Orthanc, name: str, ae_title: str, port: int) -> None:
    """Tell Orthanc a C-MOVE destination (PUT /modalities/{name})."""
    body = json.dumps({"AET": ae_title, "Host": "127.0.0.1", "Port": port}).encode()
    req = urllib.request.Request(f"{orthanc.url}/modalities/{name}", data=body, method="PUT")
    with _NO_PROXY.open(req, timeout=10):
        pass


def _sent_per_instance(orthanc: Orthanc) -> Counter[str]:
    """How often Orthanc sent each of its instances by C-MOVE (any destination), keyed by
    SOP Instance UID; a resource that is not an instance (a study or series move) is
    counted under its Orthanc ID prefixed with "not-an-instance:"."""
    ids = {}
    for oid in orthanc.rest("/instances"):
        ids[oid] = orthanc.rest(f"/instances/{oid}")["MainDicomTags"]["SOPInstanceUID"]
    sent: Counter[str] = Counter()
    for match in _SENT.finditer(orthanc.log_path.read_text(errors="replace")):
        sent[ids.get(match.group(1), "not-an-instance:" + match.group(1))] += 1
    return sent


def _study_uids(answers) -> list[str]:
    return [str(ds.StudyInstanceUID) for ds in answers]


def _central(orthanc: Orthanc, **more) -> dict:
    return {
        "enabled": True,
        "ae_title": orthanc.ae_title,
        "host": orthanc.host,
        "port": orthanc.dicom_port,
        "relay_timeout_s": 3.0,
        "find_timeout_s": 5.0,
        "connect_timeout_s": 2.0,
        "stall_s": 4.0,
        **more,
    }


def _mesh(address: str, role: str = "clinic") -> dict:
    return {"address": address, "role": role, "sync_interval_s": 0.3}


class _Site:
    """Orthanc plus replicas and one clinic, all admitting each other. Each gateway starts
    as soon as it is made (so its ports are bound before the next one picks free ports)
    and admits the others once all run (registries are reloaded within seconds)."""

    def __init__(
        self,
        gateway_factory,
        orthanc: Orthanc,
        n_replicas: int,
        *,
        up: int | None = None,
        clinic_dicom: dict | None = None,
        log_level: str = "info",
    ) -> None:
        self.orthanc = orthanc
        up = n_replicas if up is None else up
        self.replicas = [
            gateway_factory(
                start=i < up,
                ae_title=f"REPL{i + 1}",
                mesh=_mesh(f"127.0.0.{71 + i}", "replica"),
                central=_central(orthanc),
                log={"level": log_level},
            )
            for i in range(n_replicas)
        ]
        self.clinic = gateway_factory(
            ae_title="CLINIC",
            mesh=_mesh("127.0.0.70"),
            central=_central(orthanc),
            dicom=clinic_dicom or {},
            log={"level": log_level},
        )
        everyone = [*self.replicas, self.clinic]
        for gw in everyone:
            for other in everyone:
                if other is not gw:
                    gw.admit(other, role="replica" if other in self.replicas else "clinic")
        for gw in self.replicas:
            _register(orthanc, gw.ae_title.lower(), gw.ae_title, gw.port)
        for gw in self.replicas[:up]:
            wait_until(
                lambda gw=gw: f"peer {gw.mesh_name} is online" in self.clinic.log(),
                timeout=15,
                what="the clinic sees the replica",
            )


@pytest.fixture(scope="session")
def central_series(tmp_path_factory: pytest.TempPathFactory):
    """A 12-slice 64x64 study that only the central PACS will hold."""
    return generate_ct_series(tmp_path_factory.mktemp("central12"), 12, rows=64, cols=64, seed=31)


STUDY_KEYS = [
    "QueryRetrieveLevel=STUDY",
    "StudyInstanceUID=",
    "PatientID=",
    "StudyDate=",
    "ModalitiesInStudy=",
    "NumberOfStudyRelatedInstances=",
    "RetrieveAETitle=",
]


@pytest.mark.slow
def test_clinic_find_lists_central_only_studies(
    gateway_factory, tmp_path, small_series, central_series
):
    with Orthanc(tmp_path / "pacs", binary=_verbose_orthanc(tmp_path)) as pacs:
        site = _Site(gateway_factory, pacs, 1, log_level="debug")
        clinic, replica = site.clinic, site.replicas[0]
        # The central PACS holds both studies; the clinic holds one of them itself.
        assert storescu(
            pacs.host, pacs.dicom_port, pacs.ae_title, [*small_series.paths, *central_series.paths]
        ).ok
        assert storescu(clinic.host, clinic.port, clinic.ae_title, small_series.paths).ok

        pulls = f"entries changed from {replica.mesh_name}"
        before = clinic.log().count(pulls)
        started = time.monotonic()
        answers = findscu(clinic.host, clinic.port, clinic.ae_title, STUDY_KEYS, timeout=30)
        assert time.monotonic() - started < 10
        uids = _study_uids(answers)
        assert sorted(uids) == sorted([small_series.study_uid, central_series.study_uid])
        central = next(ds for ds in answers if ds.StudyInstanceUID == central_series.study_uid)
        assert central.RetrieveAETitle == "CLINIC"  # retrieved through the clinic
        assert int(central.NumberOfStudyRelatedInstances) == len(central_series.paths)
        assert central.ModalitiesInStudy == "CT"

        # The replica published what the central PACS holds into the catalog: with the
        # replica gone, the clinic still lists the study, and answers within the timeout.
        # At the replica itself, its own query of the central PACS answers.
        at_replica = findscu(replica.host, replica.port, replica.ae_title, STUDY_KEYS, timeout=30)
        assert sorted(_study_uids(at_replica)) == sorted(
            [small_series.study_uid, central_series.study_uid]
        )
        wait_until(lambda: clinic.log().count(pulls) > before, timeout=10, what="catalog pull")
        replica.stop()
        started = time.monotonic()
        answers = findscu(clinic.host, clinic.port, clinic.ae_title, STUDY_KEYS, timeout=30)
        assert time.monotonic() - started < 8
        assert sorted(_study_uids(answers)) == sorted(
            [small_series.study_uid, central_series.study_uid]
        )
        # Image level: nothing local matches, the replica is down, so nothing (but fast).
        keys = [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={central_series.study_uid}",
            "SeriesInstanceUID=",
            "SOPInstanceUID=",
        ]
        assert findscu(clinic.host, clinic.port, clinic.ae_title, keys, timeout=30) == []
    for gw in (clinic, replica):
        text = gw.log()
        assert "PHANTOM" not in text and "DCMESH-TEST" not in text  # no patient attributes


def test_a_study_deleted_from_the_pacs_leaves_the_mesh_catalog(
    gateway_factory, tmp_path, central_series
):
    """The replica published the study as held by the central PACS; once the PACS deleted
    it, the next query for that study (or its listing) finds nothing and the replica
    withdraws its entries: the clinic stops listing it, from the catalog alone too."""
    with Orthanc(tmp_path / "pacs") as pacs:
        site = _Site(gateway_factory, pacs, 1)
        clinic, replica = site.clinic, site.replicas[0]
        assert storescu(pacs.host, pacs.dicom_port, pacs.ae_title, central_series.paths).ok
        uid = central_series.study_uid
        answers = findscu(clinic.host, clinic.port, clinic.ae_title, STUDY_KEYS, timeout=30)
        assert _study_uids(answers) == [uid]

        found = pacs.post("/tools/lookup", uid.encode())
        study_id = next(r["ID"] for r in found if r["Type"] == "Study")
        req = urllib.request.Request(f"{pacs.url}/studies/{study_id}", method="DELETE")
        with _NO_PROXY.open(req, timeout=10):
            pass
        assert pacs.instances_count() == 0

        one = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"]
        # The clinic still has the published summary until the withdrawal reaches it; the
        # replica's own query of the PACS answers nothing and withdraws.
        findscu(replica.host, replica.port, replica.ae_title, one, timeout=30)
        wait_until(lambda: "is no longer in the central PACS: withdrawn" in replica.log(),
                   timeout=10, what="the withdrawal")  # fmt: skip

        def listed() -> bool:
            got = findscu(clinic.host, clinic.port, clinic.ae_title, STUDY_KEYS, timeout=30)
            return uid in _study_uids(got)

        # A clinic C-FIND merges its catalog with the replica's live answer: not listed
        # means its catalog has the tombstone too. Then from the catalog alone.
        wait_until(lambda: not listed(), timeout=15, what="the clinic dropping the study")
        replica.stop()
        assert not listed()


@pytest.mark.slow
def test_clinic_find_survives_a_dead_pacs(gateway_factory, tmp_path, small_series):
    with Orthanc(tmp_path / "pacs") as pacs:
        site = _Site(gateway_factory, pacs, 1)
    # Orthanc is gone now: the replica's associations are refused.
    clinic = site.clinic
    assert storescu(clinic.host, clinic.port, clinic.ae_title, small_series.paths).ok
    started = time.monotonic()
    answers = findscu(clinic.host, clinic.port, clinic.ae_title, STUDY_KEYS, timeout=30)
    assert time.monotonic() - started < 8
    assert _study_uids(answers) == [small_series.study_uid]


def _move(clinic, study_uid: str, dest: StoreSCP):
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"]
    return movescu(clinic.host, clinic.port, clinic.ae_title, keys, dest.ae_title, timeout=120)


def _check_received(dest: StoreSCP, series) -> None:
    received = {sop_instance_uid(p): p for p in dest.files()}
    originals = {sop_instance_uid(p): p for p in series.paths}
    assert set(received) == set(originals)
    for uid, path in received.items():
        assert dataset_bytes(path) == dataset_bytes(originals[uid])


@pytest.mark.slow
def test_clinic_move_of_a_central_study_via_two_replicas(gateway_factory, tmp_path, ct_series):
    """24 CT slices of 512x512 (12.6 MB): the clinic swarms while the replicas fill."""
    central_series = ct_series
    with (
        Orthanc(tmp_path / "pacs", binary=_verbose_orthanc(tmp_path)) as pacs,
        StoreSCP(tmp_path / "ws", ae_title="WS") as dest,
    ):
        node = {"ae_title": "WS", "host": dest.host, "port": dest.port}
        site = _Site(gateway_factory, pacs, 2, clinic_dicom={"nodes": [node]})
        assert storescu(pacs.host, pacs.dicom_port, pacs.ae_title, central_series.paths).ok
        result = _move(site.clinic, central_series.study_uid, dest)
        assert result.returncode == 0, result.stderr[-2000:]
        _check_received(dest, central_series)
        # Every instance left the central PACS exactly once (split between the replicas).
        sent = _sent_per_instance(pacs)
        assert set(sent) == set(central_series.sop_uids), sent
        assert max(sent.values()) == 1
        moved_to = Counter(m.group(2) for m in _SENT.finditer(pacs.log_path.read_text()))
        assert set(moved_to) == {"REPL1", "REPL2"}
        # The replicas complete each other over the mesh (not from the PACS again).
        for gw in site.replicas:
            wait_until(
                lambda gw=gw: (
                    len(gw.find_images(central_series.study_uid, "")) == len(central_series.paths)
                ),
                timeout=20,
                what="replica complete",
            )
        assert max(_sent_per_instance(pacs).values()) == 1


def test_clinic_patient_level_move_brings_local_and_central_studies(
    gateway_factory, tmp_path, small_series, central_series
):
    """Patient Root, PATIENT level: the clinic holds one of the patient's studies, the central
    PACS the other; one C-MOVE of the patient delivers both, the central one through the
    replica, each of its instances sent by the PACS once."""
    with (
        Orthanc(tmp_path / "pacs", binary=_verbose_orthanc(tmp_path)) as pacs,
        StoreSCP(tmp_path / "ws", ae_title="WS") as dest,
    ):
        node = {"ae_title": "WS", "host": dest.host, "port": dest.port}
        site = _Site(gateway_factory, pacs, 1, clinic_dicom={"nodes": [node]})
        clinic = site.clinic
        assert storescu(pacs.host, pacs.dicom_port, pacs.ae_title, central_series.paths).ok
        assert storescu(clinic.host, clinic.port, clinic.ae_title, small_series.paths).ok
        keys = ["QueryRetrieveLevel=PATIENT", "PatientID=DCMESH-TEST-0001"]
        result = movescu(clinic.host, clinic.port, clinic.ae_title, keys, dest.ae_title,
                         model="patient", timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        received = {sop_instance_uid(p): p for p in dest.files()}
        originals = {sop_instance_uid(p): p for p in [*small_series.paths, *central_series.paths]}
        assert set(received) == set(originals)
        for uid, path in received.items():
            assert dataset_bytes(path) == dataset_bytes(originals[uid])
        sent = _sent_per_instance(pacs)
        assert set(sent) == set(central_series.sop_uids) and max(sent.values()) == 1


@pytest.mark.slow
def test_clinic_get_with_one_replica_down(gateway_factory, tmp_path, central_series):
    with Orthanc(tmp_path / "pacs", binary=_verbose_orthanc(tmp_path)) as pacs:
        # The second replica is admitted everywhere but never starts.
        site = _Site(gateway_factory, pacs, 2, up=1)
        clinic = site.clinic
        assert storescu(pacs.host, pacs.dicom_port, pacs.ae_title, central_series.paths).ok
        out = tmp_path / "got"
        keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={central_series.study_uid}"]
        result = getscu(clinic.host, clinic.port, clinic.ae_title, keys, out, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        received = {sop_instance_uid(p): p for p in out.iterdir()}
        originals = {sop_instance_uid(p): p for p in central_series.paths}
        assert set(received) == set(originals)
        for uid, path in received.items():
            assert dataset_bytes(path) == dataset_bytes(originals[uid])
        sent = _sent_per_instance(pacs)
        assert set(sent) == set(central_series.sop_uids) and max(sent.values()) == 1
        moved_to = {m.group(2) for m in _SENT.finditer(pacs.log_path.read_text())}
        assert moved_to == {"REPL1"}


@pytest.mark.slow
def test_fetch_command_fills_a_central_study(gateway_factory, tmp_path, central_series):
    import subprocess
    import sys

    from gateway import REPO

    with Orthanc(tmp_path / "pacs") as pacs:
        site = _Site(gateway_factory, pacs, 1)
        clinic = site.clinic
        assert storescu(pacs.host, pacs.dicom_port, pacs.ae_title, central_series.paths).ok
        run = subprocess.run(
            [sys.executable, "-m", "appliance", "fetch", "--config", str(clinic.config_path),
             central_series.study_uid],
            capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        n = len(central_series.paths)
        assert f"{n}/{n}" in run.stdout
    # Orthanc is gone: the clinic now answers from its own store.
    found = clinic.find_images(central_series.study_uid, central_series.series_uid)
    assert sorted(str(ds.SOPInstanceUID) for ds in found) == sorted(central_series.sop_uids)
