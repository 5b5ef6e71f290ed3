"""The mesh subsystem as the lifecycle runs it: peer registry, server, catalog sync and
publishing of what this gateway holds. Runs on the asyncio loop; blocking store work goes
to executors, store commit notifications arrive from the writer thread."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance.control import stream_progress
from appliance.mesh import protocol
from appliance.mesh.catalog import Catalog, Change
from appliance.mesh.catalog_model import Delta
from appliance.mesh.client import PeerClient
from appliance.mesh.config import MeshConfig
from appliance.mesh.describe import describe_study, holding
from appliance.mesh.errors import MeshError, PeerInputError
from appliance.mesh.peers import PEERS_FILE, Peer, PeerRegistry
from appliance.mesh.server import MeshServer
from appliance.mesh.swarm.download import DownloadError, DownloadState, StudyDownload
from appliance.mesh.uplinks import MeshNetwork, UplinkChange
from appliance.store import Store

log = logging.getLogger(__name__)

PULL_LIMIT = 1000
REGISTRY_POLL_S = 2.0
PUBLISH_DEBOUNCE_S = 1.0
# Connections per (peer, uplink) path: a chunk stream and the next request's, plus spares.
CONNECTIONS_PER_PATH = 4


@dataclass
class PeerState:
    """What we know about an admitted peer's reachability."""

    online: bool = False
    last_seen: float = 0.0
    last_error: str | None = None
    pulls: int = 0


def _progress_line(state: DownloadState) -> dict[str, Any]:
    p = state.progress
    return {
        "study": state.study_uid,
        "instances_done": len(state.instances_done),
        "instances_total": state.instances_total,
        "bytes_done": p.bytes_done if p else 0,
        "bytes_total": p.bytes_total if p else 0,
        "eta_s": p.eta_s if p else None,
        "peers": {name: b for name, b in p.peer_bytes.items()} if p else {},
        "finished": state.finished,
        "error": state.error,
    }


class MeshNode:
    """Runs the mesh for one gateway."""

    def __init__(
        self, cfg: MeshConfig, state_dir: Path, store: Store, network: MeshNetwork | None = None
    ) -> None:
        """`network`: the uplinks to spread swarm paths over and where to listen (app.py
        builds it from the NetworkManager); None: one path per peer from `[mesh] address`."""
        self.cfg = cfg
        self.store = store
        self.network = network
        self.registry = PeerRegistry(state_dir / PEERS_FILE)
        self.catalog = Catalog(store, cfg.name)
        self.server = MeshServer(
            cfg,
            self.registry,
            store,
            extra_routes=self._routes,
            listen=network.listen if network else (),
            overlay_network=network.overlay_network if network else None,
        )
        self.peer_state: dict[str, PeerState] = {}
        # One client per (peer, uplink): uplink None is `[mesh] address`, unbound to a line.
        self._clients: dict[tuple[str, str | None], PeerClient] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self._down_uplinks: set[str] = set()
        self._verifier = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mesh-verify")
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # Loops end on this as well as on their cancel: Python 3.11's asyncio.wait_for can
        # swallow a cancellation (net/monitor.py, UplinkMonitor.stop).
        self._closing = False
        self._spawned: set[asyncio.Future] = set()
        self._downloads: dict[str, StudyDownload] = {}
        # Useful bytes received per peer by finished downloads (running ones: downloads()).
        self.bytes_from_peer: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by app.py with [central] on: downloads that may need the central PACS first.
        self.central_fetch: Callable[[str], DownloadState] | None = None

    def add_routes(self, register: Callable[[web.Application], None]) -> None:
        """More mesh API routes (before start), e.g. the central broker's."""
        register(self.server.app)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the mesh runs on (None before start)."""
        return self._loop

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self.registry.reload_if_changed()
        await self.server.start()
        self.store.add_commit_listener(self._on_commit)
        if self.network is not None:
            self._unsubscribe = self.network.uplinks.subscribe(self._on_uplink_change)
        self._tasks = [
            asyncio.create_task(self._watch_registry(), name="mesh-registry"),
            asyncio.create_task(self._publisher(), name="mesh-publisher"),
            asyncio.create_task(self._sync_loop(), name="mesh-sync"),
            asyncio.create_task(self._reconcile(), name="mesh-reconcile"),
            asyncio.create_task(self._resume_downloads(), name="mesh-resume"),
        ]
        log.info(
            "mesh %s (%s) listening on %s:%d, %d peer(s) admitted",
            self.cfg.name, self.cfg.role, ", ".join(self.server.addresses), self.server.port,
            len(self.registry.peers()),
        )  # fmt: skip

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._closing = True
        # Downloads stop too: their verified chunks are durable, and the next start resumes.
        for task in [*self._tasks, *self._spawned]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._spawned, return_exceptions=True)
        self._tasks = []
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        await self.server.stop()
        self._verifier.shutdown(wait=False, cancel_futures=True)

    # -- peers ---------------------------------------------------------------------------

    def client(self, peer: Peer) -> PeerClient:
        """The client for a peer's small exchanges (catalog, manifests, have): over the first
        usable uplink when there are uplinks, else from `[mesh] address`."""
        usable = self.network.usable() if self.network is not None else []
        return self.path_client(peer, usable[0].uplink if usable else None)

    def path_client(self, peer: Peer, uplink: str | None, remote: int | None = None) -> PeerClient:
        """The client for a peer over one uplink (None: from `[mesh] address`, unbound) to
        its tunnel address `remote` (None: the one paired with the uplink's index),
        recreated when the peer's registry entry or the uplink's address changed."""
        found = None
        if uplink is not None and self.network is not None:
            found = self.network.binding(uplink)
        if found is None:
            uplink = None
        source = found[1].source if found is not None else self.cfg.address
        if found is not None and remote is None:
            remote = found[0]
        key = (peer.name, uplink, remote)
        current = self._clients.get(key)
        if current is None or current.peer != peer or current.local_address != source:
            if current is not None:
                self._background(current.close())
            if found is None or self.network is None:
                current = PeerClient(peer, source, self._verifier)
            else:
                # By default local uplink i talks to the peer's tunnel address i (mod its
                # count); the swarm names the address for each of its paths.
                index, binding = found
                current = PeerClient(
                    peer,
                    source,
                    self._verifier,
                    connector=self.network.connector(binding, CONNECTIONS_PER_PATH),
                    address=peer.addresses[(index if remote is None else remote)
                                           % len(peer.addresses)],
                )  # fmt: skip
            self._clients[key] = current
        return current

    def usable_uplinks(self) -> list[str]:
        """The uplinks swarm paths use now, config order (none without a network)."""
        if self.network is None:
            return []
        return [b.uplink for b in self.network.usable()]

    def _on_uplink_change(self, change: UplinkChange) -> None:
        """Running downloads add or drop the uplink's paths at once (a dead line's chunks go
        to the other paths); a line back up gets fresh connections (the old ones may be
        wedged in retransmission)."""
        if not change.usable:
            self._down_uplinks.add(change.uplink)
        elif change.uplink in self._down_uplinks:
            self._down_uplinks.discard(change.uplink)
            for key in [k for k in self._clients if k[1] == change.uplink]:
                client = self._clients.pop(key)
                self._background(client.close())
        for download in self._downloads.values():
            if not download.state.finished:
                download.uplinks_changed()

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._spawned.add(task)  # keep a reference until done (the loop holds only weak ones)
        task.add_done_callback(self._spawned.discard)

    def _seen(self, peer: Peer, error: str | None = None) -> None:
        state = self.peer_state.setdefault(peer.name, PeerState())
        online = error is None
        if online != state.online:
            if online:
                log.info("peer %s is online", peer.name)
            else:
                log.info("peer %s is offline: %s", peer.name, error)
        state.online = online
        state.last_error = error
        if online:
            state.last_seen = time.time()

    async def _watch_registry(self) -> None:
        while not self._closing:
            await asyncio.sleep(REGISTRY_POLL_S)
            if self.registry.reload_if_changed():
                admitted = {p.name for p in self.registry.peers()}
                for key in list(self._clients):
                    if key[0] not in admitted:
                        await self._clients.pop(key).close()
                        self.peer_state.pop(key[0], None)

    # -- catalog sync ----------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/mesh/v1/catalog/pull", self._serve_pull)

    async def _serve_pull(self, request: web.Request) -> web.Response:
        body = protocol.decode_json(await request.read())
        if not isinstance(body, dict):
            raise PeerInputError("catalog pull: need an object")
        limit = body.get("limit", PULL_LIMIT)
        delta = await self.catalog.async_delta(body.get("vv", {}), min(int(limit), PULL_LIMIT))
        return web.Response(body=protocol.encode_json(delta.to_wire()),
                            content_type=protocol.JSON_TYPE)  # fmt: skip

    async def pull_from(self, peer: Peer) -> int:
        """Pull everything `peer` knows that we lack; returns the number of changed studies."""
        client = self.client(peer)
        changed = 0
        for _ in range(10_000):  # bounded: each page advances the version vector
            vv = await asyncio.get_running_loop().run_in_executor(None, self.catalog.version_vector)
            answer = await client.post_json(
                "/mesh/v1/catalog/pull", {"vv": vv, "limit": PULL_LIMIT}
            )
            delta = Delta.from_wire(answer)
            if delta.entries:
                changed += len(await self.catalog.async_apply(delta.entries))
            if not delta.more:
                break
        return changed

    async def sync_once(self) -> None:
        """One anti-entropy round with every admitted peer (concurrently). A peer that does
        not answer in time is marked offline; it never holds up the others' rounds."""
        peers = self.registry.peers()
        limit = max(15.0, 3 * self.cfg.sync_interval_s)
        results = await asyncio.gather(
            *(asyncio.wait_for(self.pull_from(p), limit) for p in peers), return_exceptions=True
        )
        for peer, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, TimeoutError):
                    result = MeshError("no answer in time")
                elif not isinstance(result, MeshError):
                    log.error("catalog pull from %s failed", peer.name, exc_info=result)
                self._seen(peer, str(result))
            else:
                self._seen(peer)
                state = self.peer_state[peer.name]
                state.pulls += 1
                if result:
                    log.info("catalog: %d study entries changed from %s", result, peer.name)

    async def _sync_loop(self) -> None:
        while not self._closing:
            try:
                await self.sync_once()
            except Exception:
                log.exception("catalog sync round failed")
            await asyncio.sleep(self.cfg.sync_interval_s)

    # -- swarm downloads --------------------------------------------------------------------

    def fetch(self, study_uid: str) -> DownloadState:
        """Start, or join, the download of a study (loop side): through `central_fetch`
        when set (it may fill the study from the central PACS first), else a swarm."""
        if self.central_fetch is not None:
            return self.central_fetch(study_uid)
        return self.swarm_fetch(study_uid)

    def swarm_fetch(self, study_uid: str) -> DownloadState:
        """Start, or join, the swarm download of what the catalog describes of a study."""
        running = self._downloads.get(study_uid)
        if running is not None and not running.state.finished:
            return running.state
        download = StudyDownload(
            study_uid,
            cfg=self.cfg,
            store=self.store,
            catalog=self.catalog,
            registry=self.registry,
            client=self.client,
            io=self._verifier,
            path_client=self.path_client,
            uplinks=self.usable_uplinks if self.network is not None else None,
        )
        self._downloads[study_uid] = download
        self._background(self._run_download(download))
        return download.state

    def fetch_threadsafe(self, study_uid: str, timeout: float = 30.0) -> DownloadState:
        """fetch() for threads (DICOM handlers): the state to watch with wait_change()."""
        assert self._loop is not None

        async def start() -> DownloadState:
            return self.fetch(study_uid)

        return asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout)

    def downloads(self) -> list[DownloadState]:
        """The downloads started since start, running and finished (for status pages)."""
        return [d.state for d in self._downloads.values()]

    def bytes_received(self) -> Counter[str]:
        """Useful bytes received per peer since start, running downloads included."""
        total = Counter(self.bytes_from_peer)
        for d in self._downloads.values():
            progress = d.state.progress
            if progress is not None and not d.state.finished:
                total.update(progress.peer_bytes)
        return total

    async def _run_download(self, download: StudyDownload) -> None:
        started = time.monotonic()
        try:
            state = await download.run()
        except DownloadError as exc:
            log.warning("fetch %s failed: %s", download.study_uid, exc)
            return
        except Exception:
            log.exception("fetch %s failed", download.study_uid)
            return
        finally:
            if (progress := download.state.progress) is not None:
                self.bytes_from_peer.update(progress.peer_bytes)
        progress = state.progress
        per_uplink = ", ".join(
            f"{name} {n / 1e6:.1f} MB" for name, n in sorted(state.uplink_bytes.items())
        )
        total = progress.bytes_total if progress else 0
        log.info(
            "fetch %s done: %d instance(s), %.1f MB in %.2f s (%.1f MB fetched twice, "
            "%.1f MB corrupt, %.2f MB received beyond the study)%s",
            download.study_uid,
            len(state.instances_done),
            total / 1e6,
            time.monotonic() - started,
            (progress.duplicate_bytes if progress else 0) / 1e6,
            (progress.corrupt_bytes if progress else 0) / 1e6,
            max(0, state.bytes_received - total) / 1e6,
            f"; received per uplink: {per_uplink}" if per_uplink else "",
        )

    def control_routes(self, app: web.Application) -> None:
        """Routes for local tools on the control socket (`dicomesh fetch`)."""
        app.router.add_post("/fetch", self._control_fetch)

    async def _control_fetch(self, request: web.Request) -> web.StreamResponse:
        """Start or join a fetch and stream its progress as JSON lines until it ends."""
        body = await request.json()
        study = body.get("study") if isinstance(body, dict) else None
        if not isinstance(study, str) or not 0 < len(study) <= 64:
            raise web.HTTPBadRequest(text="need a Study Instance UID\n")
        state = self.fetch(study)
        return await stream_progress(request, state, lambda: _progress_line(state))

    async def _resume_downloads(self) -> None:
        """Downloads interrupted by a restart carry on (verified chunks are kept)."""
        loop = asyncio.get_running_loop()
        pending = await loop.run_in_executor(None, self._pending_downloads)
        await asyncio.sleep(self.cfg.sync_interval_s)  # first catalog round first
        for study_uid in pending:
            log.info("resuming fetch %s", study_uid)
            self.fetch(study_uid)

    def _pending_downloads(self) -> list[str]:
        with self.store.reader() as r:
            return r.downloads()

    # -- publishing what we hold ----------------------------------------------------------

    def _on_commit(self, studies: set[str]) -> None:
        """Writer thread: studies changed; publish them from the loop (debounced)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.mark_dirty, studies)

    def mark_dirty(self, studies: set[str]) -> None:
        self._dirty |= studies
        self._dirty_event.set()

    async def _publisher(self) -> None:
        while not self._closing:
            await self._dirty_event.wait()
            # Debounce: a study arriving instance by instance is republished once a second,
            # not once per instance.
            await asyncio.sleep(PUBLISH_DEBOUNCE_S)
            self._dirty_event.clear()
            studies, self._dirty = self._dirty, set()
            try:
                await self.publish(studies)
            except Exception:
                log.exception("publishing %d studies to the catalog failed", len(studies))
                self.mark_dirty(studies)  # retry on the next round

    async def publish(self, studies: set[str]) -> None:
        """Publish this gateway's description and holding of these studies."""
        loop = asyncio.get_running_loop()
        changes = await loop.run_in_executor(None, self._describe, sorted(studies))
        if changes:
            await self.catalog.async_publish_all(changes)

    def _describe(self, studies: list[str]) -> list[Change]:
        changes: list[Change] = []
        with self.store.reader() as r:
            for uid in studies:
                changes.append(("desc", uid, describe_study(r, uid)))
                changes.append(("hold", uid, holding(r, uid)))
        return changes

    async def _reconcile(self) -> None:
        """At start: publish every locally held study, withdraw what we no longer hold."""
        loop = asyncio.get_running_loop()
        local, published = await loop.run_in_executor(None, self._local_and_published)
        stale = set(published) - local
        pending = sorted(local | stale)
        for i in range(0, len(pending), 50):
            await self.publish(set(pending[i : i + 50]))
        if pending:
            log.info("catalog: published %d local studies, withdrew %d", len(local), len(stale))

    def _local_and_published(self) -> tuple[set[str], dict[str, Any]]:
        with self.store.reader() as r:
            local = {s.uid for s in r.studies()}
        return local, self.catalog.held_by(self.cfg.name)
