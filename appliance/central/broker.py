"""A replica's side of the broker: it queries the central PACS for the mesh (and publishes
what it found into the catalog), lists a study's instances there, and retrieves its share of
a study by image-level C-MOVE to its own DICOM node, where the instances land through the
normal C-STORE path (durable, indexed, published as a partial holding as they arrive).

Runs on the loop; the SCU's blocking associations run in this module's executors (one for
queries, one for retrievals, so a long retrieval never delays a query).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from pydicom.dataset import Dataset

from appliance.central import core
from appliance.central.core import CentralInputError, ListedInstance
from appliance.central.scu import CentralError, CentralSCU
from appliance.mesh import protocol
from appliance.mesh.catalog import Catalog
from appliance.mesh.catalog_model import MalformedEntry
from appliance.store import Store, StoreError

log = logging.getLogger(__name__)

LISTING_TTL_S = 120.0
MAX_LISTINGS = 64  # cached study listings
MAX_RETRIEVING = 256  # studies with instances asked for and not yet retrieved


class CentralBroker:
    """Queries and retrievals at the central PACS on behalf of the mesh (replicas only)."""

    def __init__(
        self,
        scu: CentralSCU,
        store: Store,
        catalog: Catalog | None,
        origin: str,
        on_share_done: Callable[[str], None] | None = None,
        on_arrived: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """`origin`: the catalog origin to publish the central PACS's holdings under;
        `on_share_done(study)`: called (on the loop) once this replica's share is in;
        `on_arrived(study)`: awaited (on the loop) after each C-MOVE request of a retrieval
        that brought instances (the first brings one), to announce our holding at once: the
        clinic swarms what is announced (calls for one study never overlap)."""
        self.scu = scu
        self.store = store
        self.catalog = catalog
        self.origin = origin
        self.on_share_done = on_share_done
        self.on_arrived = on_arrived
        self._announcing: set[str] = set()  # studies with an on_arrived call running
        self._announce_again: set[str] = set()  # ... and instances arrived meanwhile
        self._finds = ThreadPoolExecutor(max_workers=2, thread_name_prefix="central-find")
        self._moves = ThreadPoolExecutor(max_workers=1, thread_name_prefix="central-move")
        self._listings: OrderedDict[str, tuple[float, list[ListedInstance]]] = OrderedDict()
        self._wanted: dict[str, set[str]] = {}  # study -> SOPs queued or being retrieved
        self._tasks: set[asyncio.Task] = set()
        self.counters = {"finds": 0, "listings": 0, "moved": 0, "move_failed": 0}

    async def stop(self) -> None:
        self.scu.stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._finds.shutdown(wait=False, cancel_futures=True)
        self._moves.shutdown(wait=False, cancel_futures=True)

    # -- query --------------------------------------------------------------------------------

    async def find(self, identifier: Dataset, model: str) -> list[Dataset]:
        """The central PACS's matches; STUDY-level ones are published into the catalog as
        held by the central PACS. Raises CentralError."""
        loop = asyncio.get_running_loop()
        ask = core.with_summary_keys(identifier)
        self.counters["finds"] += 1
        answers = await loop.run_in_executor(self._finds, self.scu.find, ask, model)
        if core.level_of(identifier) == "STUDY" and self.catalog is not None:
            if answers:
                self._spawn(self._publish(answers))
            elif (uid := core.single_study(identifier)) is not None:
                # Asked for one study by its UID and the PACS has it no more.
                self._spawn(self._withdraw(uid))
        return answers

    async def _publish(self, answers: list[Dataset]) -> None:
        assert self.catalog is not None
        changes = [c for ds in answers for c in core.summary(ds)]
        # Entries are authored by our central origin (not our own: we do not hold these).
        catalog = Catalog(self.store, self.origin)
        try:
            await catalog.async_publish_all(changes)
        except (MalformedEntry, StoreError) as exc:
            log.warning("publishing %d central studies failed: %s", len(changes) // 2, exc)

    async def _withdraw(self, study_uid: str) -> None:
        """The central PACS no longer has this study: our origin's entries for it become
        tombstones (a deletion reaches every gateway like any change), if there are any."""
        if self.catalog is None:
            return
        loop = asyncio.get_running_loop()
        catalog = Catalog(self.store, self.origin)
        entries = await loop.run_in_executor(None, catalog.entries, study_uid)
        kinds = [e.kind for e in entries if e.origin == self.origin and e.payload is not None]
        if not kinds:
            return
        try:
            await catalog.async_publish_all([(kind, study_uid, None) for kind in kinds])
        except (MalformedEntry, StoreError) as exc:
            log.warning("withdrawing central study %s failed: %s", study_uid, exc)
            return
        log.info("central study %s is no longer in the central PACS: withdrawn", study_uid)

    async def instances(self, study_uid: str, fresh: bool = False) -> list[ListedInstance]:
        """The study's instances at the central PACS (IMAGE-level C-FIND), cached briefly."""
        cached = self._listings.get(study_uid)
        if cached is not None and not fresh and time.monotonic() - cached[0] < LISTING_TTL_S:
            return cached[1]
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = ""
        ds.SOPInstanceUID = ""
        ds.SOPClassUID = ""
        loop = asyncio.get_running_loop()
        self.counters["listings"] += 1
        answers = await loop.run_in_executor(self._finds, self.scu.find, ds, "study")
        listing = core.listing_from_answers(answers, study_uid)
        self._listings[study_uid] = (time.monotonic(), listing)
        self._listings.move_to_end(study_uid)
        while len(self._listings) > MAX_LISTINGS:
            self._listings.popitem(last=False)
        log.info("central study %s lists %d instance(s)", study_uid, len(listing))
        if not listing:
            self._spawn(self._withdraw(study_uid))
        return listing

    # -- retrieval ----------------------------------------------------------------------------

    async def retrieve(self, study_uid: str, wanted: list[ListedInstance], total: int) -> int:
        """Retrieve these instances of a study (of `total`) into the store, in the background;
        those held or already being retrieved are skipped. Returns how many were queued."""
        loop = asyncio.get_running_loop()
        held = await loop.run_in_executor(None, self._held, study_uid)
        busy = self._wanted.get(study_uid, set())
        todo = [i for i in wanted if i.sop not in held and i.sop not in busy]
        if not todo:
            return 0
        if study_uid not in self._wanted and len(self._wanted) >= MAX_RETRIEVING:
            raise CentralError("too many central retrievals running")
        await self._expect(study_uid, total)
        self._wanted.setdefault(study_uid, set()).update(i.sop for i in todo)
        self._spawn(self._retrieve(study_uid, todo))
        return len(todo)

    def _held(self, study_uid: str) -> set[str]:
        with self.store.reader() as r:
            return {i.uid for se in r.series_of(study_uid) for i in r.instances_of(se.uid)}

    async def _expect(self, study_uid: str, total: int) -> None:
        """Mark the study as filling (a partial holding of `total` instances) until every
        instance is here: see appliance/mesh/describe.py holding()."""
        await expect(self.store, study_uid, total)

    async def _retrieve(self, study_uid: str, todo: list[ListedInstance]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        pairs = [(i.series, i.sop) for i in todo]
        announced = 0

        def on_batch(completed: int, _failed: int) -> None:  # the move thread
            nonlocal announced
            if completed > announced:
                announced = completed
                loop.call_soon_threadsafe(self._arrived, study_uid)

        try:
            done, failed = await loop.run_in_executor(
                self._moves, self.scu.move, study_uid, pairs, on_batch
            )
        except CentralError as exc:
            log.warning("central retrieval of %d instance(s) of %s failed: %s",
                        len(todo), study_uid, exc)  # fmt: skip
            self.counters["move_failed"] += len(todo)
            return
        finally:
            wanted = self._wanted.get(study_uid, set())
            wanted.difference_update(i.sop for i in todo)
            if not wanted:
                self._wanted.pop(study_uid, None)
        self.counters["moved"] += done
        self.counters["move_failed"] += failed
        log.info("central retrieval of study %s: %d instance(s) in %.1f s, %d failed",
                 study_uid, done, time.monotonic() - started, failed)  # fmt: skip
        if self.on_share_done is not None and study_uid not in self._wanted:
            self.on_share_done(study_uid)

    def _arrived(self, study_uid: str) -> None:
        if self.on_arrived is None:
            return
        if study_uid in self._announcing:
            self._announce_again.add(study_uid)
            return
        self._announcing.add(study_uid)
        self._spawn(self._announce(self.on_arrived, study_uid))

    async def _announce(self, on_arrived: Callable[[str], Awaitable[None]], study: str) -> None:
        try:
            while True:
                self._announce_again.discard(study)
                try:
                    await on_arrived(study)
                except Exception as exc:  # the debounced publication follows anyway
                    log.warning("announcing study %s failed: %s", study, exc)
                if study not in self._announce_again:
                    break
        finally:
            self._announcing.discard(study)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- mesh API ---------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/mesh/v1/central/find", self._serve_find)
        app.router.add_post("/mesh/v1/central/instances", self._serve_instances)
        app.router.add_post("/mesh/v1/central/retrieve", self._serve_retrieve)

    async def _serve_find(self, request: web.Request) -> web.Response:
        body = protocol.decode_json(await request.read())
        if not isinstance(body, dict) or body.get("model") not in ("study", "patient"):
            raise CentralInputError("central find: need model and identifier")
        identifier = core.from_wire(body.get("identifier"))
        try:
            answers = await self.find(identifier, body["model"])
        except CentralError as exc:
            raise web.HTTPBadGateway(text=f"{exc}\n") from None
        return _json({"answers": [core.to_wire(ds) for ds in answers]})

    async def _serve_instances(self, request: web.Request) -> web.Response:
        body = protocol.decode_json(await request.read())
        study = body.get("study") if isinstance(body, dict) else None
        if not core.is_uid(study):
            raise CentralInputError("central instances: need a study UID")
        try:
            listing = await self.instances(study, fresh=bool(body.get("fresh")))
        except CentralError as exc:
            raise web.HTTPBadGateway(text=f"{exc}\n") from None
        return _json({"instances": [i.to_wire() for i in listing]})

    async def _serve_retrieve(self, request: web.Request) -> web.Response:
        body = protocol.decode_json(await request.read())
        study, wanted, total = core.retrieve_request_from_wire(body)
        try:
            accepted = await self.retrieve(study, wanted, total)
        except CentralError as exc:
            raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
        return _json({"accepted": accepted})


async def expect(store: Store, study_uid: str, total: int) -> None:
    """Record that `total` instances of a study are coming (from the central PACS), merged
    into its download record; nothing when the study is already complete here."""
    loop = asyncio.get_running_loop()

    def current() -> tuple[dict[str, Any], int]:
        with store.reader() as r:
            raw = r.download(study_uid)
            study = r.study(study_uid)
        return (json.loads(raw) if raw else {}), (study.n_instances if study else 0)

    record, held = await loop.run_in_executor(None, current)
    if held >= total or record.get("expect") == total:
        return
    record["expect"] = total
    await asyncio.wrap_future(store.submit_download(study_uid, json.dumps(record).encode()))


def _json(obj: Any) -> web.Response:
    return web.Response(body=protocol.encode_json(obj), content_type=protocol.JSON_TYPE)
