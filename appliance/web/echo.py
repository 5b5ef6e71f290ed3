"""The C-ECHO test button: a Verification association to a known node (PS3.4 A.4).
Blocking (pynetdicom): run in an executor."""

from __future__ import annotations

import time
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from appliance.dicom.config import DicomNode


def c_echo(node: DicomNode, calling_ae: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Associate, send C-ECHO, release; the outcome for the page."""
    ae = AE(ae_title=calling_ae.strip())
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    started = time.monotonic()
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title.strip())
    try:
        if not assoc.is_established:
            if assoc.is_rejected:
                reason = "association rejected"
            elif assoc.is_aborted:
                reason = "association aborted"
            else:
                reason = "no connection"
            return {"ok": False, "error": reason, "ms": _ms(started)}
        status = assoc.send_c_echo()
        code = int(status.Status) if status and "Status" in status else None
        assoc.release()
        if code is None:
            return {"ok": False, "error": "no answer in time", "ms": _ms(started)}
        return {"ok": code == 0, "status": f"0x{code:04X}", "ms": _ms(started)}
    finally:
        ae.shutdown()


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
