"""Helpers for the forwarding tests: test instances, a real pynetdicom C-STORE SCP in a child
process, a real Store on a tmp dir. No patient data from real people: synthetic values."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from appliance.dicom import ingest
from appliance.store.records import IncomingInstance

CT = "1.2.840.10008.5.1.4.1.1.2"

# A C-STORE SCP: records every SOP Instance UID it receives (one line each, flushed), and
# answers `status` (0 = success). Runs as its own process so the test can start/stop it.
_SCP = textwrap.dedent(
    """
    import sys
    from pynetdicom import AE, evt, AllStoragePresentationContexts
    import time
    port, out, status = int(sys.argv[1]), sys.argv[2], int(sys.argv[3], 0)
    delay = float(sys.argv[4])
    def on_store(event):
        time.sleep(delay)  # a slow destination keeps a queue busy long enough to kill it
        if status == 0:
            with open(out, "a") as f:
                f.write(event.request.AffectedSOPInstanceUID + "\\n")
        return status
    ae = AE(ae_title="DEST")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.start_server(("127.0.0.1", port), block=True,
                    evt_handlers=[(evt.EVT_C_STORE, on_store)])
    """
)


@contextlib.contextmanager
def destination(
    port: int, out: Path, status: int = 0, delay: float = 0.0
) -> Iterator[subprocess.Popen]:
    """A running C-STORE SCP on 127.0.0.1:port; killed on exit (even on failure)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCP, str(port), str(out), hex(status), str(delay)]
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None:
                raise RuntimeError("destination SCP exited")
            time.sleep(0.05)
        else:
            raise TimeoutError("destination SCP did not listen")
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def received(out: Path) -> list[str]:
    return out.read_text().split() if out.exists() else []


def instance(
    study_uid: str, modality: str = "CT", calling: str = "SCANNER1"
) -> tuple[bytes, IncomingInstance]:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".1"
    ds.Modality = modality
    ds.PatientID = "TEST-0"
    ds.PatientName = "Test^Synthetic"
    ds.StationName = "ST1"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\0" * 8
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = True
    write_dataset(buf, ds)  # implicit VR little endian, no file meta: as received on the wire
    raw = buf.getvalue()
    return raw, ingest.prepare(raw, ImplicitVRLittleEndian, CT, ds.SOPInstanceUID, calling)


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
