"""Any gateway's way to the central PACS: through its own broker when it is a replica, else
through the replicas of the mesh. Clinics never talk to the central PACS directly.

- find: a C-FIND here also asks a replica (more when it is slow, all within
  `relay_timeout_s`); answers are merged and de-duplicated by the level's unique key. A dead
  replica or PACS costs at most that timeout, never the local results.
- fetch: a study not complete anywhere in the mesh is filled from the central PACS: the
  replicas that answer list its instances (IMAGE-level C-FIND), each retrieves its share
  (core.shares: the same split at every gateway, so the PACS sends each instance once per
  replica set), and this gateway swarms what they already hold, round after round, until
  every listed instance is here. A replica that stops delivering has its share re-split
  among the others after `stall_s`.

Loop side; `*_threadsafe` twins for the DICOM node's handler threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any

from pydicom.dataset import Dataset

from appliance.central import core
from appliance.central.broker import CentralBroker, expect
from appliance.central.config import CentralConfig
from appliance.central.core import ListedInstance
from appliance.mesh.catalog_model import COMPLETE
from appliance.mesh.errors import MeshError
from appliance.mesh.node import MeshNode, PeerState
from appliance.mesh.peers import Peer
from appliance.mesh.swarm.download import DownloadError, DownloadState
from appliance.store import Store

log = logging.getLogger(__name__)

POLL_S = 0.5  # between fill rounds: how often the replicas' new holdings are looked at
# In a fill's first seconds, when the replicas announce their first instances and the time
# to first image is made, holdings are looked at more often.
START_POLL_S = 0.1
START_POLL_FOR_S = 5.0
PULL_TIMEOUT_S = 5.0
ASSIGN_TIMEOUT_S = 10.0
MAX_STALLS = 6
MAX_FILLS = 256  # finished fills remembered (their states), beyond the running ones
LISTING_TTL_S = 120.0
MAX_LISTINGS = 64
_OFFLINE = PeerState()


class CentralRelay:
    """Queries and study fills through the replicas (or this replica's own broker)."""

    def __init__(
        self, cfg: CentralConfig, mesh: MeshNode, store: Store, broker: CentralBroker | None
    ) -> None:
        self.cfg = cfg
        self.mesh = mesh
        self.store = store
        self.broker = broker
        self._listings: OrderedDict[str, tuple[float, list[ListedInstance], list[str]]] = (
            OrderedDict()
        )
        self._fills: OrderedDict[str, _Fill] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self._turn = 0

    @property
    def name(self) -> str:
        return self.mesh.cfg.name

    def replicas(self) -> list[Peer]:
        """Admitted peers whose role talks to the central PACS."""
        return [p for p in self.mesh.registry.peers() if p.role in self.cfg.roles]

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- query ------------------------------------------------------------------------------

    async def find(self, identifier: Dataset, model: str) -> list[Dataset]:
        """The central PACS's matches, de-duplicated: asked directly on a replica; else of
        one replica (an online one first, turn by turn), and of all the others too when it
        has not answered within half of `relay_timeout_s` (so the PACS usually sees one
        query per C-FIND, and a dead replica costs at most the timeout)."""
        if self.broker is not None:
            calls = {self.name: self.broker.find(identifier, model)}
            results = await _within(calls, self.cfg.relay_timeout_s, "central find")
        else:
            results = await self._hedged_find(identifier, model)
        level = core.level_of(identifier)
        seen: set[str] = set()
        out: list[Dataset] = []
        for name in sorted(results):
            out += core.merge(seen, results[name], level)
        return out

    async def _hedged_find(self, identifier: Dataset, model: str) -> dict[str, list[Dataset]]:
        peers = self.replicas()
        if not peers:
            return {}
        body = {"model": model, "identifier": core.to_wire(identifier)}
        self._turn += 1
        online = [p for p in peers if self.mesh.peer_state.get(p.name, _OFFLINE).online]
        first = (online or peers)[self._turn % len(online or peers)]
        half = self.cfg.relay_timeout_s / 2
        task = asyncio.ensure_future(self._remote_find(first, body))
        await asyncio.wait({task}, timeout=half)
        if task.done() and not task.cancelled() and task.exception() is None:
            return {first.name: task.result()}
        # Slow or failed: the others too (the first may still answer meanwhile); the first
        # answer wins, all replicas ask the same PACS.
        tasks = {first.name: task}
        tasks.update(
            (p.name, asyncio.ensure_future(self._remote_find(p, body)))
            for p in peers
            if p is not first
        )
        return await _first_answer(tasks, self.cfg.relay_timeout_s - half, "central find")

    async def _remote_find(self, peer: Peer, body: dict[str, Any]) -> list[Dataset]:
        answer = await self.mesh.client(peer).post_json("/mesh/v1/central/find", body)
        return core.answers_from_wire(answer)

    def find_threadsafe(self, identifier: Dataset, model: str) -> list[Dataset]:
        """find() for the DICOM node's threads; [] on any failure (logged)."""
        return self._threadsafe(self.find(identifier, model), self.cfg.relay_timeout_s + 2, [])

    def _threadsafe(self, coro: Any, timeout: float, default: Any) -> Any:
        loop = self.mesh.loop
        if loop is None or loop.is_closed():
            coro.close()
            return default
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return fut.result(timeout)
        except Exception as exc:
            fut.cancel()
            log.info("central request failed: %s", exc.__class__.__name__)
            return default

    # -- study listing and shares ----------------------------------------------------------

    async def listing(
        self, study_uid: str, fresh: bool = False
    ) -> tuple[list[ListedInstance], list[str]]:
        """(the study's instances at the central PACS, the replicas that answered)."""
        cached = self._listings.get(study_uid)
        if cached is not None and not fresh and time.monotonic() - cached[0] < LISTING_TTL_S:
            return cached[1], cached[2]
        calls: dict[str, Awaitable[list[ListedInstance]]] = {}
        if self.broker is not None:
            calls[self.name] = self.broker.instances(study_uid, fresh)
        body = {"study": study_uid, "fresh": fresh}
        for peer in self.replicas():
            calls[peer.name] = self._remote_instances(peer, body)
        results = await _within(calls, self.cfg.find_timeout_s + 2, "central listing")
        alive = sorted(results)
        listing = max(results.values(), key=len, default=[])
        if listing:
            self._listings[study_uid] = (time.monotonic(), listing, alive)
            self._listings.move_to_end(study_uid)
            while len(self._listings) > MAX_LISTINGS:
                self._listings.popitem(last=False)
        return listing, alive

    async def _remote_instances(self, peer: Peer, body: dict[str, Any]) -> list[ListedInstance]:
        answer = await self.mesh.client(peer).post_json("/mesh/v1/central/instances", body)
        return core.listing_from_wire(answer)

    async def assign(
        self, study_uid: str, split: dict[str, list[ListedInstance]], total: int
    ) -> list[str]:
        """Ask each replica to retrieve its part; returns those that accepted."""
        calls: dict[str, Awaitable[Any]] = {}
        for name, part in split.items():
            if not part:
                continue
            if name == self.name and self.broker is not None:
                calls[name] = self.broker.retrieve(study_uid, part, total)
                continue
            peer = self.mesh.registry.get(name)
            if peer is not None:
                body = {"study": study_uid, "instances": [i.to_wire() for i in part], "of": total}
                calls[name] = self.mesh.client(peer).post_json("/mesh/v1/central/retrieve", body)
        results = await _within(calls, ASSIGN_TIMEOUT_S, "central retrieve")
        log.info("central study %s: shares of %s asked of %s",
                 study_uid, ", ".join(f"{n}={len(p)}" for n, p in sorted(split.items())),
                 ", ".join(sorted(results)) or "nobody")  # fmt: skip
        return sorted(results)

    async def pull_replicas(self) -> None:
        """Catalog pulls from the replicas now (their new holdings, not at the next round)."""
        peers = self.replicas()
        await asyncio.gather(
            *(asyncio.wait_for(self.mesh.pull_from(p), PULL_TIMEOUT_S) for p in peers),
            return_exceptions=True,
        )

    # -- retrieval --------------------------------------------------------------------------

    def needs_central(self, study_uid: str) -> bool:
        """Thread side: whether the study must come from the central PACS (at least in
        part): not complete here, not complete at an admitted peer, or still filling."""
        with self.store.reader() as r:
            local = r.study(study_uid)
            record = r.download(study_uid)
        if record is not None and json.loads(record).get("expect"):
            return True
        if local is not None and record is None:
            return False
        view = self.mesh.catalog.view(study_uid)
        if not view.described:
            return True
        return not any(
            origin != self.name
            and self.mesh.registry.get(origin) is not None
            and hold.get("state") == COMPLETE
            and hold.get("instances", 0) >= len(view.instances)
            for origin, hold in view.holders.items()
        )

    async def stage(self, study_uid: str) -> list[ListedInstance] | None:
        """The study's instances when it must come from the central PACS, else None."""
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self.needs_central, study_uid):
            return None
        listing, _alive = await self.listing(study_uid)
        return listing or None

    def stage_threadsafe(self, study_uid: str) -> list[ListedInstance] | None:
        return self._threadsafe(self.stage(study_uid), self.cfg.find_timeout_s + 5, None)

    def fetch(self, study_uid: str) -> DownloadState:
        """Start, or join, the download of a study, from the central PACS if it must (loop
        side; MeshNode.fetch calls this with [central] on)."""
        fill = self._fills.get(study_uid)
        if fill is not None and not fill.state.finished:
            return fill.state
        fill = _Fill(self, study_uid)
        self._fills[study_uid] = fill
        self._fills.move_to_end(study_uid)
        for uid in [u for u, f in self._fills.items() if f.state.finished]:
            if len(self._fills) <= MAX_FILLS:
                break
            del self._fills[uid]
        task = asyncio.ensure_future(fill.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill.state


class _Fill:
    """One study download that may fill from the central PACS through the replicas."""

    def __init__(self, relay: CentralRelay, study_uid: str) -> None:
        self.relay = relay
        self.study_uid = study_uid
        self.state = DownloadState(study_uid)
        self._expected: set[str] = set()
        self._done: set[str] = set()

    async def run(self) -> None:
        started = time.monotonic()
        try:
            await self._run()
        except (DownloadError, MeshError) as exc:
            self.state.error = str(exc)
            log.warning("fetch %s failed: %s", self.study_uid, exc)
        except Exception as exc:
            self.state.error = str(exc) or exc.__class__.__name__
            log.exception("fetch %s failed", self.study_uid)
        finally:
            self.state.finished = True
            self.state.notify()
        if self.state.error is None and self._expected:
            log.info("fetch %s from the central PACS done: %d instance(s) in %.1f s",
                     self.study_uid, len(self._done), time.monotonic() - started)  # fmt: skip

    async def _run(self) -> None:
        relay, study = self.relay, self.study_uid
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, relay.needs_central, study):
            await self._follow(relay.mesh.swarm_fetch(study), plain=True)
            return
        listing, alive = await relay.listing(study)
        if not listing and await loop.run_in_executor(None, self._described):
            # Not in the central PACS (or no replica answered): whatever the mesh has.
            await self._follow(relay.mesh.swarm_fetch(study), plain=True)
            return
        if not listing:
            if not alive:
                raise DownloadError(f"no replica answered for study {study}")
            raise DownloadError(f"study {study} is not in the central PACS")
        self._expected = {i.sop for i in listing}
        total = len(listing)
        self.state.instances_total = total
        await expect(relay.store, study, total)
        await self._update()
        if self._missing():
            await relay.assign(study, core.shares(listing, alive), total)
        assigned = last_new = time.monotonic()
        stalls = 0
        while self._missing():
            await relay.pull_replicas()
            if not await loop.run_in_executor(None, self._describable) or not (
                await self._follow(relay.mesh.swarm_fetch(study), plain=False)
            ):
                starting = time.monotonic() - assigned < START_POLL_FOR_S
                await asyncio.sleep(START_POLL_S if starting else POLL_S)
            if await self._update():
                last_new, stalls = time.monotonic(), 0
                continue
            if time.monotonic() - last_new < relay.cfg.stall_s:
                continue
            stalls += 1
            if stalls > MAX_STALLS:
                raise DownloadError(f"{len(self._missing())} instance(s) did not arrive")
            alive = await self._reassign(listing, alive, total)
            last_new = time.monotonic()
        await loop.run_in_executor(None, self._finish)

    async def _reassign(
        self, listing: list[ListedInstance], alive: list[str], total: int
    ) -> list[str]:
        """No new instance for `stall_s`: ask again. The same replicas get the same shares
        (they skip what they hold or are retrieving); with fewer, the missing instances are
        split among those answering."""
        relay, missing = self.relay, self._missing()
        _listing, now_alive = await relay.listing(self.study_uid, fresh=True)
        if not now_alive:
            log.warning("fetch %s: no replica answers; %d instance(s) missing",
                        self.study_uid, len(missing))  # fmt: skip
            return alive
        if now_alive == alive:
            split = core.shares(listing, alive)
            split = {n: [i for i in part if i.sop in missing] for n, part in split.items()}
        else:
            log.info("fetch %s: replicas now %s (were %s); %d missing instance(s) re-split",
                     self.study_uid, ", ".join(now_alive), ", ".join(alive),
                     len(missing))  # fmt: skip
            split = core.shares([i for i in listing if i.sop in missing], now_alive)
        await relay.assign(self.study_uid, split, total)
        return now_alive

    def _described(self) -> bool:
        return self.relay.mesh.catalog.view(self.study_uid).described

    def _missing(self) -> set[str]:
        return self._expected - self._done

    def _describable(self) -> bool:
        """Thread side: some missing instance is described by an admitted holder."""
        relay = self.relay
        view = relay.mesh.catalog.view(self.study_uid)
        missing = self._missing()
        if not any(sop in missing for sop in view.instances):
            return False
        return any(o != relay.name and relay.mesh.registry.get(o) for o in view.holders)

    async def _follow(self, round_state: DownloadState, *, plain: bool) -> bool:
        """Mirror a swarm round's progress until it ends (and what lands here meanwhile);
        whether it ended without error."""
        while True:
            self.state.progress = round_state.progress
            if plain:
                self.state.instances_total = round_state.instances_total
                for sop in round_state.instances_done[len(self.state.instances_done) :]:
                    self.state.instances_done.append(sop)
            else:
                await self._update()
            self.state.notify()
            if round_state.finished:
                break
            round_state.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(round_state.changed.wait(), POLL_S)
        if round_state.error is not None:
            if plain:
                raise DownloadError(round_state.error)
            log.info("fetch %s: a swarm round ended early: %s", self.study_uid, round_state.error)
            return False
        return True

    async def _update(self) -> bool:
        """Add the expected instances that landed here since last time; whether any did."""
        loop = asyncio.get_running_loop()
        held = await loop.run_in_executor(None, self._held)
        new = sorted((held & self._expected) - self._done)
        if new:
            self._done.update(new)
            self.state.instances_done.extend(new)
            self.state.notify()
        return bool(new)

    def _held(self) -> set[str]:
        with self.relay.store.reader() as r:
            return {i.uid for se in r.series_of(self.study_uid) for i in r.instances_of(se.uid)}

    def _finish(self) -> None:
        """Every instance is here: the study is held complete (its record goes)."""
        with self.relay.store.reader() as r:
            present = r.download(self.study_uid) is not None
        if present:
            self.relay.store.submit_download(self.study_uid, None).result(30)


async def _first_answer(
    tasks: dict[str, asyncio.Future], timeout: float, what: str
) -> dict[str, Any]:
    """The first successful result among the tasks within `timeout` ({} if none); the
    others are cancelled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = set(tasks.values())
    found: dict[str, Any] = {}
    while pending and not found:
        done, pending = await asyncio.wait(
            pending, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            break
        for name, task in tasks.items():
            if task in done and not task.cancelled():
                if task.exception() is None:
                    found.setdefault(name, task.result())
                else:
                    log.info("%s via %s failed: %s", what, name, task.exception())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if not found:
        log.info("%s: no replica answered within the timeout", what)
    return found


async def _within(calls: dict[str, Awaitable[Any]], timeout: float, what: str) -> dict[str, Any]:
    """Run the calls concurrently; the results of those that succeeded within `timeout`."""
    if not calls:
        return {}
    tasks = {name: asyncio.ensure_future(call) for name, call in calls.items()}
    done, pending = await asyncio.wait(tasks.values(), timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    results: dict[str, Any] = {}
    for name, task in tasks.items():
        if task not in done:
            log.info("%s via %s: no answer within %.1f s", what, name, timeout)
        elif task.exception() is not None:
            log.info("%s via %s failed: %s", what, name, task.exception())
        else:
            results[name] = task.result()
    return results
