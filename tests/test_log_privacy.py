"""No patient attribute reaches the gateway's log, even at debug level and on error paths
(STYLE.md "Logging": log UIDs, sizes, AE titles, never a name, ID or birth date)."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest
from dcmtk import StoreSCP, findscu, getscu, movescu, storescu
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from studygen import SeriesInfo, generate_ct_series

pytestmark = pytest.mark.timeout(60)

PATIENT = {
    "PatientName": "Zyxwv^Qponm",
    "PatientID": "PID-7788-SECRET",
    "PatientBirthDate": "19230405",
    "OtherPatientNames": "Qponm^Zyxwv",
    "OtherPatientIDs": "PID-7788-SECRET-ALT",
}
SECRETS = ("Zyxwv", "Qponm", "PID-7788-SECRET", "19230405")


@pytest.fixture(scope="module")
def secret_series(tmp_path_factory: pytest.TempPathFactory) -> SeriesInfo:
    return generate_ct_series(
        tmp_path_factory.mktemp("secret"), 3, rows=32, cols=32, seed=7788, patient=PATIENT
    )


def _malformed(series: SeriesInfo, outdir: Path) -> tuple[Path, Path]:
    """Two files of the patient the gateway must refuse: the command's SOP class (taken from
    the file meta) differs from the data set's, and a data set without SOP Instance UID."""
    outdir.mkdir()
    mismatch = pydicom.dcmread(series.paths[0])
    mismatch.SOPInstanceUID = generate_uid(entropy_srcs=["privacy", "mismatch"])
    mismatch.file_meta.MediaStorageSOPInstanceUID = mismatch.SOPInstanceUID
    mismatch.file_meta.MediaStorageSOPClassUID = MRImageStorage  # data set says CT
    mismatch_path = outdir / "mismatch.dcm"
    # Not enforce_file_format: that would copy the data set's SOP class into the file meta.
    mismatch.save_as(mismatch_path)
    assert pydicom.dcmread(mismatch_path).file_meta.MediaStorageSOPClassUID == MRImageStorage

    no_uid = pydicom.dcmread(series.paths[1])
    no_uid.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["privacy", "no-uid"])
    del no_uid.SOPInstanceUID
    no_uid_path = outdir / "no_uid.dcm"
    no_uid.save_as(no_uid_path)
    return mismatch_path, no_uid_path


def _send_raw(gw, paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """C-STORE files as they are (pynetdicom's chunked mode sends a file's bytes undecoded,
    with the SOP class and instance of its file meta); the response statuses."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="BADMODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    try:
        assoc = ae.associate(gw.host, gw.port, ae_title=gw.ae_title)
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(path).Status) for path in paths]
        assoc.release()
        return statuses
    finally:
        ae.shutdown()


def test_debug_log_has_no_patient_attributes(
    gateway_factory, secret_series, tmp_path, monkeypatch
) -> None:
    s = secret_series
    with StoreSCP(tmp_path / "moved", ae_title="MOVEDEST") as dest:
        gw = gateway_factory(
            log={"level": "debug"},
            dicom={"nodes": [{"ae_title": dest.ae_title, "host": dest.host, "port": dest.port}]},
        )
        host, port, aet = gw.host, gw.port, gw.ae_title

        run = storescu(host, port, aet, s.paths, timeout=30)
        assert run.ok, run.stderr

        patients = findscu(
            host,
            port,
            aet,
            [
                "QueryRetrieveLevel=PATIENT",
                f"PatientName={PATIENT['PatientName']}",
                f"PatientID={PATIENT['PatientID']}",
                f"PatientBirthDate={PATIENT['PatientBirthDate']}",
                "OtherPatientNames",
            ],
            model="patient",
            timeout=15,
        )
        assert [str(p.PatientID) for p in patients] == [PATIENT["PatientID"]]
        studies = findscu(
            host,
            port,
            aet,
            [
                "QueryRetrieveLevel=STUDY",
                "PatientName=Zyxwv*",
                f"PatientID={PATIENT['PatientID']}",
                f"PatientBirthDate={PATIENT['PatientBirthDate']}",
                "StudyInstanceUID",
            ],
            model="study",
            timeout=15,
        )
        assert [str(st.StudyInstanceUID) for st in studies] == [s.study_uid]
        nothing = findscu(
            host, port, aet, ["QueryRetrieveLevel=PATIENT", "PatientName=Zyxwv^Other*"],
            model="patient", timeout=15,
        )  # fmt: skip
        assert nothing == []

        got = getscu(
            host,
            port,
            aet,
            ["QueryRetrieveLevel=PATIENT", f"PatientID={PATIENT['PatientID']}"],
            tmp_path / "got",
            model="patient",
            timeout=30,
        )
        assert got.returncode == 0, got.stderr
        assert len(list((tmp_path / "got").iterdir())) == len(s.paths)

        moved = movescu(
            host,
            port,
            aet,
            ["QueryRetrieveLevel=PATIENT", f"PatientID={PATIENT['PatientID']}"],
            dest.ae_title,
            model="patient",
            timeout=30,
        )
        assert moved.returncode == 0, moved.stderr
        assert len(dest.files()) == len(s.paths)

        statuses = _send_raw(gw, list(_malformed(s, tmp_path / "bad")), monkeypatch)
        # 0xA900 SOP class mismatch, 0xC001 no SOP Instance UID (appliance/dicom/status.py)
        assert statuses == [0xA900, 0xC001], [hex(x) for x in statuses]

        # Proof that debug level is on: with the notify socket gone, STOPPING=1 fails and
        # the gateway says so at debug level.
        assert gw.notify is not None
        gw.notify.path.unlink()
        assert gw.stop() == 0
    log = gw.log()
    assert re.search(r"DEBUG .*sd_notify", log), log

    # The log really covers what happened, at debug level...
    for needed in ("association", "C-FIND", "retrieved", "refused", "stopped"):
        assert needed in log, f"{needed!r} missing from the log:\n{log}"
    # ...and names no patient attribute anywhere (stdout and stderr share the log file).
    leaks = [line for line in log.splitlines() if any(re.search(x, line, re.I) for x in SECRETS)]
    assert leaks == [], "patient attributes in the log:\n" + "\n".join(leaks)
