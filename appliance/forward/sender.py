"""Thread side: send one job's stored instances with C-STORE, bytes unchanged, reusing the
C-MOVE sub-operation machinery (`retrieve.Item/load/move_contexts`, `RawInstance`, the
fast-path `GatewayAE`). Blocking; runs on a worker thread, never on the event loop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pynetdicom.status import code_to_category

from appliance.dicom import fastpath, retrieve
from appliance.dicom.config import DicomConfig, DicomNode
from appliance.forward.core import Job
from appliance.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str = ""
    sent: int = 0
    sent_bytes: int = 0
    # The try was cut short by the gateway stopping: no failure is recorded; the job stays
    # running in the store and the next start queues it again, as after a crash.
    interrupted: bool = False


class Destination(Protocol):
    """Extension point: a DICOM node (here), a peer gateway or the central PACS
    (appliance/forward/push.py)."""

    def send(self, store: Store, job: Job) -> Outcome: ...


def job_items(store: Store, job: Job) -> list[retrieve.Item]:
    """The instances of a job as they are stored now."""
    with store.reader() as r:
        if job.level == "instance":
            inst = r.instance(job.sop_instance_uid)
            if inst is None:
                return []
            return [retrieve.Item(inst.uid, inst.sop_class_uid, inst.transfer_syntax,
                                  inst.study_uid)]  # fmt: skip
        return [
            retrieve.Item(i.uid, i.sop_class_uid, i.transfer_syntax, i.study_uid)
            for s in r.series_of(job.study_uid)
            for i in r.instances_of(s.uid)
        ]


class DicomDestination:
    """C-STORE SCU to a known `[dicom]` node, from our AE title."""

    def __init__(self, node: DicomNode, dicom: DicomConfig) -> None:
        self.node = node
        self.dicom = dicom

    def send(self, store: Store, job: Job) -> Outcome:
        items = job_items(store, job)
        if not items:
            # Deleted or evicted since it was queued: nothing left to send is not a failure
            # worth retrying forever, but it is reported.
            return Outcome(False, "no stored instance left to send")
        return self.send_items(store, items)

    def send_items(
        self,
        store: Store,
        items: list[retrieve.Item],
        on_sent: Callable[[int], None] | None = None,
    ) -> Outcome:
        """C-STORE these stored instances over one association; ok only if every one was
        answered Success or Warning. `on_sent(n)` after each accepted instance."""
        # Imported here: scp.py pulls in the whole SCP; only the sending thread needs it.
        from appliance.dicom.scp import GatewayAE

        fastpath.install()
        cfg = self.dicom
        ae = GatewayAE(ae_title=cfg.ae_title.strip())
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.connection_timeout = cfg.acse_timeout_s
        if cfg.max_pdu:
            ae.maximum_pdu_size = cfg.max_pdu
        assoc = ae.associate(
            self.node.host, self.node.port, ae_title=self.node.ae_title.strip(),
            contexts=retrieve.move_contexts(items),
        )  # fmt: skip
        if not assoc.is_established:
            if assoc.is_rejected:
                return Outcome(False, "association rejected")
            return Outcome(False, "no association (connection refused or timed out)")
        sent = nbytes = 0
        try:
            for item in items:
                inst = retrieve.load(store, item)
                if inst.raw is None:
                    return Outcome(False, f"instance {item.uid} unreadable", sent, nbytes)
                try:
                    rsp = assoc.send_c_store(inst)
                except ValueError as exc:  # no accepted context for its SOP class/syntax
                    return Outcome(False, f"not accepted by destination: {exc}", sent, nbytes)
                code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                if code is None:
                    return Outcome(False, "association ended or timed out", sent, nbytes)
                if code_to_category(code) not in ("Success", "Warning"):
                    return Outcome(False, f"C-STORE status 0x{code:04X}", sent, nbytes)
                sent += 1
                nbytes += len(inst.raw)
                if on_sent is not None:
                    on_sent(sent)
            assoc.release()
        finally:
            if assoc.is_established:
                assoc.abort()
        return Outcome(True, "", sent, nbytes)


def dicom_destinations(dicom: DicomConfig) -> dict[str, Destination]:
    """Destinations by AE title from `[dicom] nodes` (rules name them "AE" or "dicom:AE")."""
    return {n.ae_title.strip(): DicomDestination(n, dicom) for n in dicom.nodes}
