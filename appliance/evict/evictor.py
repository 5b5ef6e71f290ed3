"""The eviction runner: gathers study facts from the store and the mesh catalog, plans with
`core.plan`, deletes through the store's writer and withdraws the studies from the catalog.

Facts are gathered in two steps so a periodic run stays cheap on a Pi with a large cache:
- for every study, from small records only: usage, size, the other gateways' "hold" entries
  (complete, with at least our number of instances), busy downloads and forwarding jobs;
  whether it came from a modality or from the central PACS is not known yet and assumed in
  its favour (these facts can only make a study *less* evictable);
- for each study the plan picks, exactly: every local instance's calling AE and manifest
  digest, checked against each counted holder's "desc" entry (a holder counts only when it
  describes every one of our instances in the same version). A study whose exact facts
  differ is re-planned; victims are therefore always checked exactly before they go.

A deletion is a compare-and-delete against the usage record the plan saw: a study stored
to, retrieved, or being downloaded since is left alone. The catalog then gets tombstones for
our "desc" and "hold" of each deleted study, so other gateways stop asking us for its chunks
(MeshNode's commit listener would publish the same; publishing twice changes nothing).
Writes happen on the store's writer thread; `run_once` blocks, `async_*` run it in an
executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from appliance.evict import core
from appliance.evict.config import EvictConfig
from appliance.evict.core import Plan, Policy, Space, StudyFacts
from appliance.forward.core import Job, State
from appliance.mesh.catalog import Catalog, CatalogReader
from appliance.mesh.catalog_model import COMPLETE, DESC, HOLD
from appliance.store import Store
from appliance.store.errors import StoreError
from appliance.store.index import Reader
from appliance.store.records import UsageRecord

log = logging.getLogger(__name__)

_FORWARD_PENDING = {State.WAITING, State.QUEUED, State.HELD, State.RUNNING}
_MAX_REPLANS = 64  # each re-plan makes at least one fact exact; bounded anyway


@dataclass(frozen=True)
class Report:
    """One run: its plan, and what actually happened to the victims."""

    plan: Plan
    dry_run: bool
    evicted: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # changed since planned, or the delete failed
    freed_bytes: int = 0

    def text(self) -> str:
        out = core.format_plan(self.plan, dry_run=self.dry_run)
        if not self.dry_run:
            out += f"\nevicted {len(self.evicted)}, skipped {len(self.skipped)}"
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            **core.plan_json(self.plan),
            "dry_run": self.dry_run,
            "evicted": list(self.evicted),
            "skipped": list(self.skipped),
            "freed_bytes": self.freed_bytes,
        }


@dataclass(frozen=True)
class _Gathered:
    facts: dict[str, StudyFacts]
    usage: dict[str, UsageRecord]
    candidates: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]  # (holders, central ones)
    space: Space


class Evictor:
    """Eviction for one gateway's store. `catalog` None: no mesh (only studies the central
    PACS sent count as retrievable elsewhere). `central_aes`: AE titles of the central PACS
    (instances it sent us are held there); `central_origins`: catalog origins speaking for
    the central PACS (their complete holds confirm a study is there)."""

    def __init__(
        self,
        cfg: EvictConfig,
        store: Store,
        catalog: Catalog | None = None,
        *,
        central_aes: Iterable[str] = (),
        central_origins: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.catalog = catalog
        self.central_aes = frozenset(a.strip().upper() for a in central_aes if a.strip())
        self.central_origins = frozenset(central_origins)
        self.clock = clock
        self.last_report: Report | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._nudged = asyncio.Event()
        self._lock = asyncio.Lock()

    def apply(self, cfg: EvictConfig) -> list[str]:
        """Take new settings; they apply from the next run (no key needs a restart)."""
        self.cfg = cfg
        return []

    # -- thread side ------------------------------------------------------------------------

    def space(self) -> Space:
        with self.store.db.read() as txn:
            return _space(self.store, self.store.db.used_bytes(txn))

    def plan(self, now: float | None = None, *, exact: bool = False) -> Plan:
        """What a run would evict now and why; changes nothing. `exact`: check every study
        exactly (slower), so the reasons given for kept studies are exact too."""
        return self._plan(self._gather(), self.clock() if now is None else now, exact)

    def run_once(self, now: float | None = None, *, dry_run: bool | None = None) -> Report:
        """Plan, then (unless dry run) delete the victims durably and withdraw them from the
        catalog. Blocking: call from a thread."""
        now = self.clock() if now is None else now
        dry = self.cfg.dry_run if dry_run is None else dry_run
        gathered = self._gather()
        plan = self._plan(gathered, now, exact=False)
        if dry or not plan.victims:
            report = Report(plan, dry)
            if plan.victims:
                log.info("eviction (dry run):\n%s", report.text())
            self.last_report = report
            return report
        evicted: list[str] = []
        skipped: list[str] = []
        freed = 0
        for victim in plan.victims:
            try:
                result = self.store.delete_study(victim.uid, gathered.usage[victim.uid])
            except StoreError as exc:
                log.warning("evicting study %s failed: %s", victim.uid, exc)
                skipped.append(victim.uid)
                continue
            if result is None:
                log.info("study %s changed since planned: not evicted", victim.uid)
                skipped.append(victim.uid)
                continue
            log.info("evicted study %s (%d bytes): %s", victim.uid, result, victim.reason)
            evicted.append(victim.uid)
            freed += result
        self._withdraw(evicted)
        report = Report(plan, False, tuple(evicted), tuple(skipped), freed)
        self.last_report = report
        return report

    def _withdraw(self, studies: list[str]) -> None:
        if self.catalog is None or not studies:
            return
        changes = [(kind, uid, None) for uid in studies for kind in (DESC, HOLD)]
        try:
            self.catalog.publish_all(changes)
        except StoreError as exc:
            # The mesh's start-up reconcile withdraws what we no longer hold.
            log.warning("withdrawing %d evicted studies from the catalog failed: %s",
                        len(studies), exc)  # fmt: skip

    def _gather(self) -> _Gathered:
        with self.store.reader() as r:
            space = _space(self.store, self.store.db.used_bytes(r.txn))
            holds = self._other_holds(r)
            downloads = set(r.downloads())
            forwarding = _forwarding_studies(r)
            facts: dict[str, StudyFacts] = {}
            usage: dict[str, UsageRecord] = {}
            candidates: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
            for study in r.studies():
                u = r.usage(study.uid) or UsageRecord(0.0, 0.0)
                usage[study.uid] = u
                holders, central = [], []
                for origin, held in holds.items():
                    h = held.get(study.uid)
                    if (
                        h
                        and h.get("state") == COMPLETE
                        and h.get("instances", 0) >= study.n_instances
                    ):
                        (central if origin in self.central_origins else holders).append(origin)
                candidates[study.uid] = (tuple(holders), tuple(central))
                busy = ""
                if study.uid in downloads:
                    busy = "swarm download in progress"
                elif study.uid in forwarding:
                    busy = "forwarding pending"
                facts[study.uid] = StudyFacts(
                    uid=study.uid,
                    bytes=study.bytes,
                    last_access=u.last_access,
                    access_count=u.access_count,
                    last_stored=u.last_stored,
                    # Unknown until checked exactly: assumed in the study's favour.
                    locally_acquired=False,
                    in_central=bool(central) or bool(self.central_aes),
                    holders=tuple(holders),
                    busy=busy,
                )
        return _Gathered(facts, usage, candidates, space)

    def _other_holds(self, r: Reader) -> dict[str, dict[str, dict[str, Any]]]:
        if self.catalog is None:
            return {}
        cat = CatalogReader(r)
        return {
            origin: cat.held_by(origin)
            for origin in cat.version_vector()
            if origin != self.catalog.own
        }

    def _plan(self, gathered: _Gathered, now: float, exact: bool) -> Plan:
        policy = Policy.from_config(self.cfg, self.catalog.own if self.catalog else "")
        facts = dict(gathered.facts)
        checked: set[str] = set()
        if exact:
            facts.update(self._exact(gathered, list(facts)))
            checked.update(facts)
        for _ in range(_MAX_REPLANS):
            p = core.plan(facts.values(), policy, gathered.space, now)
            todo = [v.uid for v in p.victims if v.uid not in checked]
            if not todo:
                return p
            exact_facts = self._exact(gathered, todo)
            checked.update(todo)
            facts.update(exact_facts)
        # Pathological: keep only victims already checked exactly.
        return replace(p, victims=tuple(v for v in p.victims if v.uid in checked))

    def _exact(self, gathered: _Gathered, uids: list[str]) -> dict[str, StudyFacts]:
        """Exact facts: where each instance came from, and which holders describe every one
        of our instances in the same version."""
        out: dict[str, StudyFacts] = {}
        with self.store.reader() as r:
            cat = CatalogReader(r) if self.catalog is not None else None
            for uid in uids:
                local: dict[str, str] = {}
                aes: set[str] = set()
                for series in r.series_of(uid):
                    for inst in r.instances_of(series.uid):
                        manifest = r.manifest(inst.uid)
                        local[inst.uid] = manifest.digest.hex() if manifest else ""
                        aes.add(inst.calling_ae.strip().upper())
                # Fetched from the mesh: no calling AE (appliance/mesh/swarm/download.py).
                acquired = {ae for ae in aes if ae} - self.central_aes
                from_central = bool(aes) and aes <= self.central_aes
                holders, central = gathered.candidates[uid]
                if cat is not None:
                    holders = tuple(o for o in holders if _covers(cat, o, uid, local))
                    central = tuple(o for o in central if _covers(cat, o, uid, local))
                else:
                    holders, central = (), ()
                out[uid] = replace(
                    gathered.facts[uid],
                    locally_acquired=bool(acquired),
                    in_central=from_central or bool(central),
                    holders=holders,
                )
        return out

    # -- loop side --------------------------------------------------------------------------

    async def async_plan(self, *, exact: bool = True) -> Plan:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.plan(exact=exact))

    async def async_run_once(self, *, dry_run: bool | None = None) -> Report:
        """One run in an executor; runs never overlap."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            return await loop.run_in_executor(None, lambda: self.run_once(dry_run=dry_run))

    async def start(self) -> None:
        """Check periodically, and soon after new data when the store nears its limits."""
        self._loop = asyncio.get_running_loop()
        self.store.add_commit_listener(self._on_commit)
        self._task = asyncio.create_task(self._run(), name="evict")

    async def stop(self) -> None:
        self._loop = None  # the commit listener stays registered but goes quiet
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _on_commit(self, _studies: set[str]) -> None:
        """Writer thread: something was stored or deleted."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._nudged.set)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.cfg.check_after_store_s
        # Until stop() (which clears _loop): also when Python 3.11's wait_for swallowed the
        # cancel (net/monitor.py, UplinkMonitor.stop).
        while self._loop is not None:
            timeout = max(0.0, next_full - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), timeout)
            self._nudged.clear()
            full = loop.time() >= next_full
            if self.cfg.enabled:
                try:
                    if full or await self._under_pressure():
                        await self.async_run_once()
                except Exception:
                    log.exception("eviction run failed")
            if full:
                next_full = loop.time() + self.cfg.interval_s
            # After new data, look again at most this often (stats are cheap, plans are not).
            await asyncio.sleep(self.cfg.check_after_store_s)

    async def _under_pressure(self) -> bool:
        space = await asyncio.get_running_loop().run_in_executor(None, self.space)
        crossed, _ = core.pressure(space, Policy.from_config(self.cfg))
        return bool(crossed)


def _space(store: Store, used: int) -> Space:
    reusable = max(0, store.db.file_bytes() - used)
    return Space(used_bytes=used, available_bytes=store.db.disk_free() + reusable)


def _forwarding_studies(r: Reader) -> set[str]:
    """Studies with a forwarding job still to run (their data must stay until it has)."""
    out = set()
    for _key, raw in r.txn.cursor(db=r.t.fwd_jobs):
        job = Job.decode(bytes(raw))
        if job.state in _FORWARD_PENDING:
            out.add(job.study_uid)
    return out


def _covers(cat: CatalogReader, origin: str, study_uid: str, local: dict[str, str]) -> bool:
    """`origin` describes each of our instances with the same manifest digest."""
    entry = cat.get(origin, DESC, study_uid)
    if entry is None or entry.payload is None:
        return False
    theirs = entry.payload.get("instances", {})
    return all(sop in theirs and theirs[sop].get("manifest") == d for sop, d in local.items())
