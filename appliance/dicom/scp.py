"""The gateway's DICOM node: a pynetdicom AE wired to the store.

Thread boundary: pynetdicom runs one thread per association and calls our handlers there.
Handlers only use the store's thread-side API (`put_instance` blocks until the writer thread
committed with sync; reads are short LMDB read transactions). Nothing here touches the
asyncio loop; the lifecycle (app.py) starts and stops the node from an executor.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    build_context,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import AddressInformation, AssociationSocket, ThreadedAssociationServer

from appliance.dicom import fastpath, query, retrieve, status
from appliance.dicom.arrivals import END, WAIT, Arrivals, Failed
from appliance.dicom.config import DicomConfig, DicomNode
from appliance.dicom.fastpath import RawInstance
from appliance.dicom.ingest import IngestError, prepare
from appliance.dicom.sources import MeshAccess, UnionReader, central_answers, central_items
from appliance.store import (
    CommitTimeout,
    PutOutcome,
    Store,
    StoreClosed,
    StoreError,
    StoreFull,
)

log = logging.getLogger(__name__)

FIND_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: "patient",
    StudyRootQueryRetrieveInformationModelFind: "study",
}
GET_MODELS = {
    PatientRootQueryRetrieveInformationModelGet: "patient",
    StudyRootQueryRetrieveInformationModelGet: "study",
}
MOVE_MODELS = {
    PatientRootQueryRetrieveInformationModelMove: "patient",
    StudyRootQueryRetrieveInformationModelMove: "study",
}
# Query/retrieve messages are small: the uncompressed syntaxes (and deflate) suffice.
_QR_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"]


@dataclass
class Counters:
    """What the node did since start (exported as metrics later)."""

    associations_accepted: int = 0
    associations_rejected: int = 0
    stores_ok: int = 0
    stores_duplicate: int = 0
    stores_failed: int = 0
    bytes_stored: int = 0
    finds: int = 0
    retrieves: int = 0


class _Stats:
    """Thread-safe counters: handlers run on many association threads at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = Counters()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._c, name, getattr(self._c, name) + delta)

    def snapshot(self) -> Counters:
        with self._lock:
            return Counters(**asdict(self._c))


class _SharedContexts(list):
    """The server's supported contexts, shared by every association instead of copied.

    pynetdicom deep-copies the server's context list for each accepted association: with
    every storage class x every transfer syntax that is ~42 ms per association on an x86
    core (several times that on a Pi), paid before the A-ASSOCIATE-AC, so on each C-MOVE
    sub-association from a PACS. Negotiation only reads these contexts
    (presentation.negotiate_as_acceptor builds new ones for the result), so one copy of the
    list itself is enough.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class GatewayAE(AE):
    """An AE whose outgoing associations (C-MOVE sub-operations) get the fast path too."""

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        fastpath.tune_association(assoc, sock)
        return sock


class DicomNodeServer:
    """Our DICOM listener: Verification, Storage, Query/Retrieve (FIND/GET/MOVE) SCPs."""

    def __init__(self, cfg: DicomConfig, store: Store, mesh: MeshAccess | None = None) -> None:
        """With `mesh`, C-FIND also lists studies held elsewhere (if it says so) and
        C-GET/C-MOVE fetch what is not held here from the mesh as they send."""
        self.cfg = cfg
        self.store = store
        self.mesh = mesh
        self.stats = _Stats()
        self._ids = itertools.count(1)
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dicom-read")
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._build_ae()

    # -- lifecycle ------------------------------------------------------------------------

    @staticmethod
    def _configure_ae(ae: AE, cfg: DicomConfig) -> None:
        """The AE's settings from `cfg` (at build and on `apply`): title, PDU size,
        association limit, timeouts, called/calling AE title checks."""
        ae.ae_title = cfg.ae_title.strip()
        ae.maximum_pdu_size = cfg.max_pdu
        ae.maximum_associations = cfg.max_associations
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.connection_timeout = cfg.acse_timeout_s
        ae.require_called_aet = cfg.strict_called_ae
        ae.require_calling_aet = [t.strip() for t in cfg.allowed_calling]

    def _build_ae(self) -> GatewayAE:
        fastpath.install()
        ae = GatewayAE(ae_title=self.cfg.ae_title.strip())
        self._configure_ae(ae, self.cfg)
        ae.add_supported_context(Verification, _QR_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            # scu_role/scp_role True: accept a C-GET requestor's proposal to act as Storage
            # SCP, so C-GET sub-operations can flow back on the same association.
            ae.add_supported_context(
                cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        for sop_class in (*FIND_MODELS, *GET_MODELS, *MOVE_MODELS):
            ae.add_supported_context(sop_class, _QR_SYNTAXES)
        return ae

    def start(self) -> None:
        """Bind the port and serve in background threads; raises OSError if it cannot bind."""
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed, ["released"]),
            (evt.EVT_ABORTED, self._on_closed, ["aborted"]),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
        ]
        server = self.ae.make_server(
            (self.cfg.listen, self.cfg.port),
            evt_handlers=handlers,
            server_class=ThreadedAssociationServer,
        )
        server.contexts = _SharedContexts(server.contexts)
        self.ae._servers.append(server)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="dicom-listener", daemon=True
        )
        self._thread.start()

    def apply(self, cfg: DicomConfig) -> list[str]:
        """Take a new config while running: everything but the listening address applies to
        the next association. Returns the keys that need a restart (listen, port)."""
        restart = [key for key in ("listen", "port") if getattr(cfg, key) != getattr(self.cfg, key)]
        self.cfg = cfg
        self._configure_ae(self.ae, cfg)
        if self._server is not None:
            # pynetdicom gives each accepted association the server's AE title.
            self._server.ae_title = cfg.ae_title.strip()
        return restart

    @property
    def port(self) -> int:
        """The bound port (differs from the config when it asked for port 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def active_associations(self) -> list[Association]:
        return self._server.active_associations if self._server else []

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, give open associations `grace` seconds, then abort the rest."""
        if self._server is None:
            return
        grace = self.cfg.shutdown_grace_s if grace is None else grace
        self._server.shutdown()  # closes the listening socket; open associations go on
        deadline = time.monotonic() + grace
        while self._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self._server.active_associations
        if left:
            log.warning("aborting %d association(s) still open after %.0f s", len(left), grace)
        self.ae.shutdown()  # aborts what is left, including outgoing C-MOVE associations
        for assoc in left:
            assoc.join(timeout=5)
        self._readers.shutdown(wait=True, cancel_futures=True)
        self._server = None

    # -- association events -------------------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        fastpath.tune_association(event.assoc)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        assoc.dicomesh_id = f"a{next(self._ids)}"  # type: ignore[attr-defined]
        assoc.dicomesh_counts = [0, 0, 0]  # type: ignore[attr-defined]  stored, refused, bytes
        self.stats.add(associations_accepted=1)
        log.info(
            "[%s] association from %s at %s accepted",
            assoc.dicomesh_id,  # type: ignore[attr-defined]
            assoc.requestor.ae_title,
            assoc.requestor.address,
        )

    def _on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        self.stats.add(associations_rejected=1)
        log.warning(
            "association from %s at %s (called %s) rejected",
            assoc.requestor.ae_title,
            assoc.requestor.address,
            assoc.requestor.primitive.called_ae_title,
        )

    def _on_closed(self, event: evt.Event, how: str) -> None:
        assoc = event.assoc
        ident = getattr(assoc, "dicomesh_id", None)
        if ident is None:  # closed before it was accepted
            return
        stored, refused, nbytes = assoc.dicomesh_counts  # type: ignore[attr-defined]
        log.info(
            "[%s] association %s: %d instance(s) stored (%.1f MB), %d refused",
            ident,
            how,
            stored,
            nbytes / 1e6,
            refused,
        )

    # -- services ---------------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """C-STORE: success only once the instance is durable (PS3.4 B.2.3 statuses)."""
        req = event.request
        assoc = event.assoc
        sop = str(req.AffectedSOPInstanceUID or "")
        counts = getattr(assoc, "dicomesh_counts", [0, 0, 0])
        try:
            inc = prepare(
                req.DataSet.getvalue(),
                event.context.transfer_syntax,
                str(req.AffectedSOPClassUID or ""),
                sop,
                assoc.requestor.ae_title,
                compress=self.store.cfg.compression == "zstd",
            )
            outcome = self.store.put_instance(inc)
        except IngestError as exc:
            return self._store_failed(assoc, sop, exc.status, exc.comment)
        except StoreFull as exc:
            return self._store_failed(assoc, sop, status.OUT_OF_RESOURCES, str(exc), quiet=True)
        except (CommitTimeout, StoreClosed) as exc:
            return self._store_failed(assoc, sop, status.OUT_OF_RESOURCES, str(exc))
        except StoreError as exc:
            return self._store_failed(assoc, sop, status.PROCESSING_FAILURE, str(exc))
        counts[0] += 1
        counts[2] += inc.manifest.size
        if outcome is PutOutcome.DUPLICATE:
            self.stats.add(stores_duplicate=1)
        else:
            self.stats.add(stores_ok=1, bytes_stored=inc.manifest.size)
        if outcome is PutOutcome.REPLACED:
            log.info("instance %s replaced by a different version", sop)
        return status.SUCCESS

    def _store_failed(
        self, assoc: Association, sop: str, code: int, comment: str, *, quiet: bool = False
    ) -> Dataset:
        counts = getattr(assoc, "dicomesh_counts", None)
        if counts is not None:
            counts[1] += 1
        self.stats.add(stores_failed=1)
        # A full store is logged once by the store itself, not once per refused instance.
        (log.debug if quiet else log.warning)(
            "[%s] C-STORE of %s refused: 0x%04X %s",
            getattr(assoc, "dicomesh_id", "-"),
            sop,
            code,
            comment,
        )
        rsp = Dataset()
        rsp.Status = code
        rsp.ErrorComment = comment[:64]
        return rsp

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND over the local index (PS3.4 C.4.1)."""
        model = FIND_MODELS[event.request.AffectedSOPClassUID]
        self.stats.add(finds=1)
        try:
            q = query.parse(event.identifier, model)
            with self.store.reader() as reader:
                listed = self.mesh is not None and self.mesh.list_remote
                source = UnionReader(reader, self.mesh.remote_reader()) if listed else reader
                rows = query.execute(q, source)
        except query.QueryError as exc:
            log.info("C-FIND refused: 0x%04X %s", exc.status, exc.comment)
            yield exc.status, None
            return
        except Exception:
            log.exception("C-FIND failed")
            yield status.QR_UNABLE_TO_PROCESS, None
            return
        ae_title = self.cfg.ae_title.strip()
        extra = central_answers(self.mesh, q, event.identifier, rows, ae_title)
        log.info(
            "[%s] C-FIND %s level %s: %d match(es)%s",
            getattr(event.assoc, "dicomesh_id", "-"),
            model,
            q.level,
            len(rows),
            f", {len(extra)} more from the central PACS" if extra else "",
        )
        for row in rows:
            if event.is_cancelled:
                yield status.CANCEL, None
                return
            yield status.PENDING, query.answer(q, row, ae_title)
        for ds in extra:
            if event.is_cancelled:
                yield status.CANCEL, None
                return
            yield status.PENDING, ds

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET: sub-operations on the same association (PS3.4 C.4.3)."""
        model = GET_MODELS[event.request.AffectedSOPClassUID]
        self.stats.add(retrieves=1)
        try:
            items = self._resolve(event.identifier, model)
        except query.QueryError as exc:
            yield 1  # pynetdicom wants a count first; the failure status ends the request
            yield exc.status, None
            return
        yield len(items)
        yield from self._send(event, items)

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE to a known node (PS3.4 C.4.2); unknown destinations get 0xA801."""
        model = MOVE_MODELS[event.request.AffectedSOPClassUID]
        self.stats.add(retrieves=1)
        destination = self._node(event.move_destination)
        if destination is None:
            log.warning("C-MOVE to unknown destination %r refused", event.move_destination)
            yield None, None
            return
        try:
            items = self._resolve(event.identifier, model)
            contexts = retrieve.move_contexts(items)
        except query.QueryError as exc:
            # pynetdicom associates with the destination before it reads the failure, and
            # needs at least one context to propose.
            yield destination.host, destination.port, {"contexts": [build_context(Verification)]}
            yield 1
            yield exc.status, None
            return
        yield destination.host, destination.port, {"contexts": contexts or None}
        yield len(items)
        yield from self._send(event, items)

    def _node(self, ae_title: str | None) -> DicomNode | None:
        wanted = (ae_title or "").strip()
        return next((n for n in self.cfg.nodes if n.ae_title.strip() == wanted), None)

    def _resolve(self, identifier: Dataset, model: str) -> list[retrieve.Item]:
        with self.store.reader() as reader:
            source = reader if self.mesh is None else UnionReader(reader, self.mesh.remote_reader())
            items = retrieve.resolve(identifier, model, source)
        return central_items(self.mesh, identifier, items)

    def _arrivals(self, items: list[retrieve.Item]) -> Arrivals:
        """Instances held here first; the others are fetched from the mesh (one swarm
        download per study, shared with other requests for it) and follow as they land."""
        with self.store.reader() as reader:
            local = [i for i in items if reader.instance(i.uid) is not None]
        held = {i.uid for i in local}
        remote = [i for i in items if i.uid not in held]
        downloads = []
        if remote and self.mesh is not None:
            for study in sorted({i.study_uid for i in remote}):
                log.info("fetching study %s from the mesh for a retrieval", study)
                downloads.append(self.mesh.fetch(study))
        return Arrivals(local, remote, downloads)

    def _load(self, got: retrieve.Item | Failed) -> Future:
        if isinstance(got, Failed):
            done: Future = Future()
            item = got.item
            done.set_result(RawInstance(None, item.sop_class_uid, item.uid, item.transfer_syntax))
            return done
        return self._readers.submit(retrieve.load, self.store, got)

    def resolve_study(self, study_uid: str) -> list[retrieve.Item]:
        """The instances of a study held here or (with the mesh) anywhere in the mesh."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_uid
        return self._resolve(identifier, "study")

    def instances(
        self, items: list[retrieve.Item], cancelled: Callable[[], bool]
    ) -> Iterator[RawInstance]:
        """The instances to send, held ones first, the others as the mesh delivers them (an
        unreadable or undelivered one has `raw` None); stops early once `cancelled()`.
        Thread side: blocks while waiting for the mesh."""
        arrivals = self._arrivals(items)
        # Read and verify the next instance (LMDB read + SHA-256, ~1 ms per CT slice) while
        # one is on the wire; hashlib and LMDB reads release the GIL.
        current: Future | None = None
        while not cancelled():
            if current is None:
                got = arrivals.next(block=True)
                if got is END:
                    return
                if got is WAIT:
                    continue
                current = self._load(got)  # type: ignore[arg-type]
            instance = current.result()
            following = arrivals.next(block=False)
            current = None if following in (WAIT, END) else self._load(following)  # type: ignore[arg-type]
            yield instance
            if following is END:
                return

    def _send(self, event: evt.Event, items: list[retrieve.Item]) -> Iterator[Any]:
        started = time.monotonic()
        stopped = False  # a cancel seen by instances(), not one after the last instance

        def cancelled() -> bool:
            nonlocal stopped
            stopped = stopped or event.is_cancelled
            return stopped

        for instance in self.instances(items, cancelled):
            yield status.PENDING, instance
        if stopped:
            yield status.CANCEL, None
            return
        self.store.record_access({item.study_uid for item in items})
        log.info(
            "[%s] %d instance(s) retrieved in %.1f s",
            getattr(event.assoc, "dicomesh_id", "-"),
            len(items),
            time.monotonic() - started,
        )
