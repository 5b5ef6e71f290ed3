"""Our SCU at the central PACS: C-FIND and image-level C-MOVE (PS3.4 C.4.1, C.4.2).

Thread side only: every call opens one association, blocks until it is done, and releases it.
Callers on the loop use an executor. Log lines carry AE titles, UIDs and counts only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from pydicom.dataset import Dataset
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from appliance.central.config import CentralConfig

log = logging.getLogger(__name__)

_FIND = {
    "patient": PatientRootQueryRetrieveInformationModelFind,
    "study": StudyRootQueryRetrieveInformationModelFind,
}
_PENDING = (0xFF00, 0xFF01)
_SUCCESS = 0x0000
_WARNING = 0xB000  # C-MOVE: some sub-operations failed (PS3.4 C.4.2.1.5)


class CentralError(Exception):
    """The central PACS could not be reached, did not answer in time, or refused."""


class CentralSCU:
    """Queries and retrieves at the central PACS as `calling_ae`."""

    def __init__(self, cfg: CentralConfig, calling_ae: str, move_destination: str) -> None:
        self.cfg = cfg
        self.calling_ae = calling_ae.strip()
        self.move_destination = move_destination.strip()
        self.stopping = False  # set at shutdown: a retrieval stops after its current batch
        # pynetdicom's default handlers log C-FIND identifiers (patient names, IDs): off, as
        # for the DICOM node (appliance/dicom/fastpath.py), whichever starts first.
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"

    def _associate(self, context: str, dimse_timeout: float) -> Association:
        # The gateway's AE: TCP_NODELAY and reactors that wake on data. With plain pynetdicom
        # each request's data set PDU waited ~40 ms for the PACS's delayed ACK of the
        # command PDU (Nagle): a C-FIND or C-MOVE took 40 ms longer to start at the PACS.
        # Imported here: scp.py pulls in the whole SCP.
        from appliance.dicom import fastpath
        from appliance.dicom.scp import GatewayAE

        fastpath.install()
        ae = GatewayAE(ae_title=self.calling_ae)
        ae.acse_timeout = self.cfg.connect_timeout_s
        ae.connection_timeout = self.cfg.connect_timeout_s
        ae.dimse_timeout = dimse_timeout
        ae.network_timeout = dimse_timeout
        ae.add_requested_context(context)
        assoc = ae.associate(self.cfg.host, self.cfg.port, ae_title=self.cfg.ae_title.strip())
        if not assoc.is_established:
            raise CentralError(
                f"no association with {self.cfg.ae_title} at {self.cfg.host}:{self.cfg.port}"
            )
        return assoc

    def find(self, identifier: Dataset, model: str = "study") -> list[Dataset]:
        """The matches of a C-FIND (at most `max_matches`, then the query is cancelled),
        within `find_timeout_s` in total."""
        context = _FIND[model]
        deadline = time.monotonic() + self.cfg.find_timeout_s
        assoc = self._associate(context, self.cfg.find_timeout_s)
        found: list[Dataset] = []
        try:
            responses = assoc.send_c_find(identifier, context)
            for status, ds in responses:
                if not status or "Status" not in status:
                    raise CentralError("C-FIND: no answer in time or association lost")
                code = int(status.Status)
                if code in _PENDING:
                    if ds is not None:
                        found.append(ds)
                    if len(found) >= self.cfg.max_matches:
                        log.info("central C-FIND cut at %d matches", len(found))
                        break
                elif code == _SUCCESS:
                    break
                else:
                    raise CentralError(f"C-FIND failed: status 0x{code:04X}")
                if time.monotonic() > deadline:
                    raise CentralError(f"C-FIND took more than {self.cfg.find_timeout_s:.0f} s")
        finally:
            if len(found) >= self.cfg.max_matches or time.monotonic() > deadline:
                assoc.abort()
            else:
                assoc.release()
        return found

    def move(
        self,
        study_uid: str,
        instances: Iterable[tuple[str, str]],
        on_batch: Callable[[int, int], None] | None = None,
    ) -> tuple[int, int]:
        """C-MOVE (series UID, SOP Instance UID) pairs to our `move_destination`, image level,
        one association; returns (completed, failed) sub-operations. The first request asks
        for one instance (so it lands, and can be announced, before a whole batch is through),
        the others for `move_batch` UIDs each. `on_batch(completed, failed)` after each."""
        by_series: dict[str, list[str]] = {}
        for series_uid, sop in instances:
            by_series.setdefault(series_uid, []).append(sop)
        context = StudyRootQueryRetrieveInformationModelMove
        assoc = self._associate(context, self.cfg.move_timeout_s)
        completed = failed = 0
        size = 1
        try:
            for series_uid, sops in by_series.items():
                i = 0
                while i < len(sops):
                    if self.stopping:
                        raise CentralError("stopping")
                    batch = sops[i : i + size]
                    i += len(batch)
                    size = self.cfg.move_batch
                    ok, bad = self._move_batch(assoc, study_uid, series_uid, batch)
                    completed += ok
                    failed += bad
                    if on_batch is not None:
                        on_batch(completed, failed)
        finally:
            if assoc.is_established:
                assoc.release()
        return completed, failed

    def _move_batch(
        self, assoc: Association, study_uid: str, series_uid: str, sops: list[str]
    ) -> tuple[int, int]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        # A list of UIDs: PS3.4 C.2.2.2.2 (List of UID Matching) allows it in a C-MOVE.
        ds.SOPInstanceUID = sops if len(sops) > 1 else sops[0]
        completed = failed = 0
        final = None
        for status, _ in assoc.send_c_move(
            ds, self.move_destination, StudyRootQueryRetrieveInformationModelMove
        ):
            if not status or "Status" not in status:
                raise CentralError("C-MOVE: no answer in time or association lost")
            final = int(status.Status)
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or 0)
            failed = int(status.get("NumberOfFailedSuboperations", failed) or 0)
        if final is None or final not in (_SUCCESS, _WARNING):
            code = "none" if final is None else f"0x{final:04X}"
            raise CentralError(f"C-MOVE of {len(sops)} instance(s) failed: status {code}")
        return completed, failed
