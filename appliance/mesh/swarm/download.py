"""The swarm downloader's asyncio adapter: drives the I/O-free Scheduler (core.py) with real
fetches, verifies and pins every chunk durably in the store as it lands (so partial data is
served to others and survives a restart), and commits each instance as soon as its last
chunk is stored, so DICOM retrievals can stream instances while the rest is still coming.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from appliance.mesh.catalog import Catalog
from appliance.mesh.catalog_model import StudyView
from appliance.mesh.client import FetchError, PeerClient, StreamedFrame
from appliance.mesh.config import MeshConfig
from appliance.mesh.errors import MeshError, PeerInputError
from appliance.mesh.peers import Peer, PeerRegistry
from appliance.mesh.swarm.core import Cancel, PeerCutOff, Progress, Request, Scheduler, SwarmConfig
from appliance.mesh.swarm.paths import PathState
from appliance.store import IncomingInstance, LevelAttrs, Manifest, Store, StoreError
from appliance.store.chunking import ChunkRef, Codec, EncodedChunk, decode

log = logging.getLogger(__name__)

# How often partial holders are asked again what they hold.
PARTIAL_REFRESH_S = 2.0
# Give up when no usable path made progress for this long (peers gone); the record stays, so
# the download resumes when asked again or at the next start.
NO_PROGRESS_LIMIT_S = 120.0
MANIFEST_BATCH = 1024
_HAVE_BATCH = 8192


class DownloadError(MeshError):
    """The study cannot be downloaded now (nobody holds it, store full, peers gone)."""


@dataclass
class DownloadState:
    """What watchers of a download see (progress bars, C-MOVE pending responses). Updated on
    the loop; loop-side watchers await `changed`, thread-side ones call `wait_change`."""

    study_uid: str
    instances_total: int = 0
    instances_done: list[str] = field(default_factory=list)  # SOP UIDs, in completion order
    progress: Progress | None = None
    # Chunk bytes received per uplink (paths per uplink only), dropped paths included.
    uplink_bytes: Counter[str] = field(default_factory=Counter)
    # Chunk bytes received on every path, including what cancelled or broken streams carried
    # and duplicates: compared with the study's size it shows what the tail wasted.
    bytes_received: int = 0
    error: str | None = None
    finished: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _version: int = 0

    def notify(self) -> None:
        self.changed.set()
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def wait_change(self, seen: int, timeout: float) -> int:
        """Thread side: wait until the state changed after version `seen`; the new version."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen, timeout)
            return self._version


@dataclass
class _Instance:
    view_uid: str
    manifest: Manifest
    missing: set[bytes]  # chunk digests not yet durably stored


class _Assembly:
    """The pieces of one split chunk received so far (unverified until all are there)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.spans: list[tuple[int, int]] = []

    def add(self, span: tuple[int, int], piece: bytes) -> bool:
        """Store a piece; True once the pieces cover the whole chunk."""
        self.data[span[0] : span[1]] = piece
        self.spans.append(span)
        covered = 0
        for start, end in sorted(self.spans):
            if start > covered:
                return False
            covered = max(covered, end)
        return covered >= len(self.data)


class StudyDownload:
    """Fetches one study into the local store from the gateways holding it."""

    def __init__(
        self,
        study_uid: str,
        *,
        cfg: MeshConfig,
        store: Store,
        catalog: Catalog,
        registry: PeerRegistry,
        client: Callable[[Peer], PeerClient],
        io: Executor,
        clock: Callable[[], float] = time.monotonic,
        path_client: Callable[[Peer, str | None, int], PeerClient] | None = None,
        uplinks: Callable[[], list[str]] | None = None,
    ) -> None:
        """`client(peer)`: for manifests and `have` queries. `uplinks()`: the uplinks usable
        now; with it, the swarm's paths to a peer pair our uplinks with the peer's tunnel
        addresses (`_paths_of`) and their chunk requests go through
        `path_client(peer, uplink, address index)`; without it (or while it lists none), one
        path per peer through `client(peer)`."""
        self.study_uid = study_uid
        self.cfg = cfg
        self.store = store
        self.catalog = catalog
        self.registry = registry
        self.client = client
        self.io = io
        self.clock = clock
        self.state = DownloadState(study_uid)
        self._wake = asyncio.Event()
        self._fetches: dict[int, asyncio.Task] = {}
        # Whole-chunk streams in flight: request id -> (its frame being read, peer, path).
        self._streams: dict[int, tuple[StreamedFrame, Peer, str]] = {}
        self._writes: set[asyncio.Task] = set()
        self._instances: dict[str, _Instance] = {}
        self._by_chunk: dict[bytes, list[str]] = {}
        self._assembly: dict[bytes, _Assembly] = {}  # split chunks being put together
        self._sizes: dict[bytes, int] = {}
        self._view: StudyView | None = None
        self._sched: Scheduler | None = None
        self._failure: BaseException | None = None
        self._failing: dict[str, bool] = {}
        self._path_client = path_client
        self._uplinks = uplinks
        self._holder_names: list[str] = []
        # path -> (peer, our uplink, index of the peer's tunnel address)
        self._path_ends: dict[str, tuple[str, str | None, int]] = {}
        self._paths_dirty = False
        self._keep_record = False
        # Per path: bytes received and when the first and the last arrived (the round's log
        # line shows whether every holder's line was busy to the end).
        self._path_span: dict[str, list[float]] = {}

    # -- the whole download --------------------------------------------------------------

    async def run(self) -> DownloadState:
        try:
            await self._run()
        except BaseException as exc:
            self.state.error = str(exc) or exc.__class__.__name__
            raise
        finally:
            for task in [*self._fetches.values(), *self._writes]:
                task.cancel()
            await asyncio.gather(*self._fetches.values(), *self._writes, return_exceptions=True)
            self.state.finished = True
            self.state.notify()
        return self.state

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        view = await loop.run_in_executor(self.io, self.catalog.view, self.study_uid)
        if not view.described:
            raise DownloadError(f"study {self.study_uid} is not in the mesh catalog")
        self._view = view
        self.state.instances_total = len(view.instances)
        holders = self._holders(view)
        record = await loop.run_in_executor(self.io, self._load_record)
        manifests = dict(record.get("manifests", {}))
        done_local = await loop.run_in_executor(self.io, self._locally_complete, view)
        wanted = [sop for sop in view.instances if sop not in done_local]
        self.state.instances_done.extend(done_local)
        self.state.notify()
        # A study still filling from the central PACS (appliance/central) expects more
        # instances than described yet: its record stays, so it is announced as partial.
        self._keep_record = record.get("expect", 0) > len(view.instances)
        if not wanted:
            await self._finish(record_exists=bool(record))
            return
        if not holders:
            raise DownloadError(f"no admitted gateway holds study {self.study_uid}")
        missing = [sop for sop in wanted if sop not in manifests]
        if missing:
            manifests.update(await self._fetch_manifests(holders, missing))
        record = {**record, "started": record.get("started", time.time()),
                  "of": len(view.instances), "manifests": manifests}  # fmt: skip
        await asyncio.wrap_future(
            self.store.submit_download(self.study_uid, json.dumps(record).encode())
        )
        stored = await loop.run_in_executor(self.io, self._prepare, manifests, wanted)
        for sop in [s for s, inst in self._instances.items() if not inst.missing]:
            await self._complete(sop)
        if self._instances:
            await self._swarm(holders, stored)
        await self._finish(record_exists=True)

    def _holders(self, view: StudyView) -> list[tuple[Peer, bool]]:
        """Admitted peers holding (part of) the study, complete holders first."""
        found = []
        for origin, hold in view.holders.items():
            peer = self.registry.get(origin)
            if origin != self.cfg.name and peer is not None:
                found.append((peer, hold.get("state") == "complete"))
        return sorted(found, key=lambda h: (not h[1], h[0].name))

    def _load_record(self) -> dict:
        with self.store.reader() as r:
            raw = r.download(self.study_uid)
        return json.loads(raw) if raw else {}

    def _locally_complete(self, view: StudyView) -> list[str]:
        done = []
        with self.store.reader() as r:
            for sop, inst in view.instances.items():
                manifest = r.manifest(sop)
                if manifest is not None and manifest.digest == inst.manifest:
                    done.append(sop)
        return done

    async def _fetch_manifests(
        self, holders: list[tuple[Peer, bool]], sops: list[str]
    ) -> dict[str, str]:
        """Manifests from holders (complete ones first), each verified against the digest
        the catalog carries for it."""
        assert self._view is not None
        found: dict[str, str] = {}
        for peer, _complete in holders:
            todo = [s for s in sops if s not in found]
            if not todo:
                break
            for i in range(0, len(todo), MANIFEST_BATCH):
                try:
                    got = await self.client(peer).manifests(todo[i : i + MANIFEST_BATCH])
                except (FetchError, PeerInputError) as exc:
                    log.info("[%s] manifests from %s failed: %s", self._tag, peer.name, exc)
                    break
                for sop, text in got.items():
                    expected = self._view.instances.get(sop)
                    digest = hashlib.sha256(text.encode()).digest()
                    if expected is None or digest != expected.manifest:
                        log.warning("[%s] %s sent a manifest not matching the catalog for %s",
                                    self._tag, peer.name, sop)  # fmt: skip
                        continue
                    found[sop] = text
        lacking = [s for s in sops if s not in found]
        if lacking:
            raise DownloadError(f"no holder could give the manifests of {len(lacking)} instances")
        return found

    def _prepare(self, manifests: dict[str, str], wanted: list[str]) -> set[bytes]:
        """Instances to complete and the chunks already stored (a resumed download)."""
        stored: set[bytes] = set()
        with self.store.reader() as r:
            for sop in wanted:
                manifest = Manifest.decode(manifests[sop].encode())
                digests = {c.digest for c in manifest.chunks}
                held = {d for d in digests if r.chunk(d) is not None}
                stored |= held
                self._instances[sop] = _Instance(sop, manifest, digests - held)
                for d in digests - held:
                    self._by_chunk.setdefault(d, []).append(sop)
        return stored

    # -- the swarm --------------------------------------------------------------------------

    async def _swarm(self, holders: list[tuple[Peer, bool]], stored: set[bytes]) -> None:
        sizes = self._sizes = {
            c.digest: c.size for inst in self._instances.values() for c in inst.manifest.chunks
        }
        seed = int.from_bytes(
            hashlib.sha256(f"{self.cfg.name}/{self.study_uid}".encode()).digest()[:4]
        )
        sched = Scheduler(sizes, have=stored, config=SwarmConfig.from_mesh(self.cfg, seed=seed))
        self._sched = sched
        now = self.clock()
        partial = []
        for peer, complete in holders:
            sched.set_peer_chunks(peer.name, None if complete else (), now)
            if not complete:
                partial.append(peer)
        self._holder_names = [peer.name for peer, _complete in holders]
        self._sync_paths(now)
        started = now
        await self._refresh_partial(partial)
        next_refresh = self.clock() + PARTIAL_REFRESH_S
        next_paths = self.clock() + PARTIAL_REFRESH_S
        last_progress = (self.clock(), 0)
        while self._instances:
            if self._failure is not None:
                raise self._failure
            now = self.clock()
            if self._paths_dirty or now >= next_paths:
                # On every uplink change, and now and then in case one was missed.
                self._paths_dirty = False
                self._sync_paths(now)
                next_paths = now + PARTIAL_REFRESH_S
            for action in sched.actions(now):
                self._act(action)
            progress = sched.progress(now)
            self._log_path_changes(progress)
            self.state.progress = progress
            self.state.notify()
            if progress.bytes_done > last_progress[1]:
                last_progress = (now, progress.bytes_done)
            elif now - last_progress[0] > NO_PROGRESS_LIMIT_S:
                raise DownloadError("no progress from any holder for 120 s")
            if partial and now >= next_refresh:
                await self._refresh_partial(partial)
                next_refresh = self.clock() + PARTIAL_REFRESH_S
            deadline = sched.next_deadline()
            timeout = PARTIAL_REFRESH_S if deadline is None else max(0.0, deadline - now)
            timeout = min(timeout, PARTIAL_REFRESH_S)
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
        self.state.progress = sched.progress(self.clock())
        end = self.clock()
        log.info("[%s] per path: %s", self._tag, ", ".join(
            f"{path} {n / 1e6:.2f} MB from +{first - started:.2f} s to -{end - last:.2f} s"
            for path, (n, first, last) in sorted(self._path_span.items())))  # fmt: skip

    def _log_path_changes(self, progress: Progress) -> None:
        """One line when a path stops delivering (its chunks go to the others) or resumes."""
        for name, path in progress.paths.items():
            failing = path.state is PathState.BACKOFF
            if failing != self._failing.get(name, False):
                if failing:
                    log.info("[%s] path %s stalled or failed: its chunks go to other paths",
                             self._tag, name)  # fmt: skip
                else:
                    log.info("[%s] path %s is tried again", self._tag, name)
                self._failing[name] = failing

    def uplinks_changed(self) -> None:
        """An uplink went down or came back: add or drop its paths at the next step."""
        self._paths_dirty = True
        self._wake.set()

    def _paths_of(self, peer: str) -> dict[str, tuple[str | None, int]]:
        """The paths to `peer` now (see `pair_paths`); one unbound path without uplinks."""
        uplinks = self._uplinks() if self._uplinks is not None else []
        if not uplinks:
            return {f"{peer}/default": (None, 0)}
        record = self.registry.get(peer)
        return pair_paths(peer, uplinks, len(record.addresses) if record is not None else 1)

    def _sync_paths(self, now: float) -> None:
        """Make the scheduler's paths those of the usable uplinks. A dropped path's requests
        are cancelled and their chunks re-queued at once (core: remove_path)."""
        assert self._sched is not None
        first = not self._path_ends
        want: dict[str, tuple[str, str | None, int]] = {}
        for peer in self._holder_names:
            want.update((name, (peer, *ends)) for name, ends in self._paths_of(peer).items())
        for name in [n for n in self._path_ends if n not in want]:
            self._sched.remove_path(name, now)
            # Salvage the chunks its streams were reading now, before the next actions()
            # hands those chunks to other paths (a chunk asked again elsewhere is not kept).
            for frame, peer, path in list(self._streams.values()):
                if path == name:
                    self._salvage(frame, peer)
            del self._path_ends[name]
            self._failing.pop(name, None)
            if self._uplinks is not None:
                log.info("[%s] path %s left: its uplink is down", self._tag, name)
        for name, ends in want.items():
            if name not in self._path_ends:
                self._sched.add_path(name, ends[0], now, line=ends[1])
                self._path_ends[name] = ends
                if self._uplinks is not None and not first:
                    log.info("[%s] path %s joined: its uplink is up", self._tag, name)

    def _client(self, peer: Peer, uplink: str | None, remote: int) -> PeerClient:
        if self._path_client is None:
            return self.client(peer)
        return self._path_client(peer, uplink, remote)

    async def _refresh_partial(self, peers: list[Peer]) -> None:
        """Ask partial holders which of the chunks we still need they hold now."""
        assert self._sched is not None
        needed = [d for d in self._by_chunk]
        for peer in peers:
            held: set[bytes] = set()
            try:
                for i in range(0, len(needed), _HAVE_BATCH):
                    part = needed[i : i + _HAVE_BATCH]
                    bits = await self.client(peer).have([d[:8] for d in part])
                    held.update(d for d, bit in zip(part, bits, strict=True) if bit)
            except (FetchError, PeerInputError) as exc:
                log.debug("[%s] have from %s failed: %s", self._tag, peer.name, exc)
                continue
            self._sched.set_peer_chunks(peer.name, held, self.clock())
        self._wake.set()

    def _act(self, action: Request | Cancel | PeerCutOff) -> None:
        if isinstance(action, Request):
            peer_name, uplink, remote = self._path_ends.get(action.path, ("", None, 0))
            peer = self.registry.get(peer_name)
            if peer is None:  # revoked meanwhile: the request ends at once
                assert self._sched is not None
                self._sched.on_request_end(action.id, self.clock(), "peer revoked")
                self._wake.set()
                return
            client = self._client(peer, uplink, remote)
            fetch = self._fetch if action.span is None else self._fetch_span
            task = asyncio.create_task(fetch(action, peer, client, uplink))
            self._fetches[action.id] = task
        elif isinstance(action, Cancel):
            stream = self._streams.get(action.id)
            if stream is not None:
                # Now, before the next actions(): the scheduler holds a stalled path's part-way
                # chunk back only until then (core: on_partial).
                self._salvage(stream[0], stream[1])
            task = self._fetches.pop(action.id, None)
            if task is not None:
                task.cancel()
        else:
            left = action.until - self.clock()
            log.warning("[%s] peer %s sent %d corrupt chunks: not used for %.0f s",
                        self._tag, action.peer, action.strikes, left)  # fmt: skip

    async def _fetch(
        self, req: Request, peer: Peer, client: PeerClient, uplink: str | None
    ) -> None:
        sched = self._sched
        assert sched is not None
        on_bytes = self._on_bytes(req, uplink)
        error: str | None = None
        frame = StreamedFrame()
        self._streams[req.id] = (frame, peer, req.path)
        try:
            async for fetched in client.fetch_chunks(
                list(req.chunks), on_bytes, zstd=self.cfg.wire_compression, frame=frame
            ):
                if fetched.chunk is not None:
                    self._store(fetched.chunk)
                    sched.on_chunk(req.id, fetched.digest, True, self.clock())
                elif fetched.corrupt:
                    log.info("[%s] corrupt chunk %s from %s",
                             self._tag, fetched.digest.hex()[:16], peer.name)  # fmt: skip
                    sched.on_chunk(req.id, fetched.digest, False, self.clock())
                self._wake.set()
        except (FetchError, PeerInputError) as exc:
            error = str(exc)
        except asyncio.CancelledError:
            self._salvage(frame, peer)  # cancelled (stalled path): keep what it sent, if unclaimed
            raise
        finally:
            self._fetches.pop(req.id, None)
            self._streams.pop(req.id, None)
        sched.on_request_end(req.id, self.clock(), error)
        if error is not None:
            self._salvage(frame, peer)  # after the end: the chunk is free again
        self._wake.set()

    def _on_bytes(self, req: Request, uplink: str | None) -> Callable[[int], None]:
        sched = self._sched
        assert sched is not None
        state = self.state
        counts = state.uplink_bytes

        span = self._path_span.setdefault(req.path, [0.0, 0.0, 0.0])

        def on_bytes(n: int) -> None:
            now = self.clock()
            sched.on_bytes(req.id, n, now)
            if not span[0]:
                span[1] = now
            span[0] += n
            span[2] = now
            state.bytes_received += n
            if uplink is not None:
                counts[uplink] += n

        return on_bytes

    def _salvage(self, frame: StreamedFrame, peer: Peer) -> None:
        """Keep the received start of a chunk whose stream broke: the rest comes as pieces."""
        partial = frame.prefix()
        frame.parts = []  # salvaged once: later calls for this stream find nothing
        if partial is None or self._sched is None:
            return
        digest, prefix = partial
        kept = self._sched.on_partial(digest, len(prefix), self.clock())
        if kept:
            self._assembly[digest] = assembly = _Assembly(self._sizes[digest])
            assembly.add((0, kept), prefix[:kept])
            log.info("[%s] kept %d KiB of chunk %s from the broken stream of %s",
                     self._tag, kept // 1024, digest.hex()[:16], peer.name)  # fmt: skip

    async def _fetch_span(
        self, req: Request, peer: Peer, client: PeerClient, uplink: str | None
    ) -> None:
        """A piece of a split chunk; the chunk is checked once all its pieces are here."""
        sched = self._sched
        assert sched is not None and req.span is not None
        digest = req.chunks[0]
        on_bytes = self._on_bytes(req, uplink)

        error: str | None = None
        try:
            piece = await client.fetch_span(
                digest, req.span, on_bytes, zstd=self.cfg.wire_compression
            )
            if piece is not None:
                sched.on_span(req.id, digest, self.clock())
                await self._add_piece(digest, req.span, piece, peer)
        except (FetchError, PeerInputError) as exc:
            error = str(exc)
        finally:
            self._fetches.pop(req.id, None)
        sched.on_request_end(req.id, self.clock(), error)  # ignored after on_span
        self._wake.set()

    async def _add_piece(
        self, digest: bytes, span: tuple[int, int], piece: bytes, peer: Peer
    ) -> None:
        assembly = self._assembly.get(digest)
        if assembly is None:
            assembly = self._assembly[digest] = _Assembly(self._sizes[digest])
        if not assembly.add(span, piece):
            return
        del self._assembly[digest]
        data = bytes(assembly.data)
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self.io, _sha256, data) == digest
        if ok:
            self._store(EncodedChunk(ChunkRef(digest, len(data)), Codec.RAW, data))
        else:
            log.info("[%s] split chunk %s failed its check (last piece from %s): fetched whole",
                     self._tag, digest.hex()[:16], peer.name)  # fmt: skip
        assert self._sched is not None
        self._sched.on_assembled(digest, ok, self.clock())

    def _store(self, chunk: EncodedChunk) -> None:
        """Pin a verified chunk durably; complete the instances it was the last one of."""

        async def write() -> None:
            try:
                await asyncio.wrap_future(self.store.submit_pins(self.study_uid, [chunk]))
            except StoreError as exc:
                self._failure = DownloadError(f"cannot store chunks: {exc}")
                self._wake.set()
                return
            for sop in self._by_chunk.pop(chunk.ref.digest, []):
                inst = self._instances.get(sop)
                if inst is None:
                    continue
                inst.missing.discard(chunk.ref.digest)
                if not inst.missing:
                    await self._complete(sop)

        task = asyncio.create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _complete(self, sop: str) -> None:
        """Index an instance whose chunks are all stored, after checking its whole hash."""
        assert self._view is not None
        inst = self._instances.pop(sop)
        view = self._view.instances[sop]
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(self.io, self._whole_hash_ok, inst.manifest):
            self._failure = DownloadError(f"instance {sop}: chunks do not add up to its hash")
            self._wake.set()
            return
        incoming = IncomingInstance(
            manifest=inst.manifest,
            chunks=tuple(EncodedChunk(ref, Codec.RAW, None) for ref in inst.manifest.chunks),
            study_uid=self.study_uid,
            series_uid=view.series_uid,
            patient_key=self._view.patient_key,
            attrs=LevelAttrs(
                patient=self._view.patient,
                study=self._view.study,
                series=self._view.series.get(view.series_uid, {}),
                instance=view.attrs,
            ),
            calling_ae="",
            received_at=view.at or time.time(),
        )
        try:
            await asyncio.wrap_future(self.store.submit_instance(incoming))
        except StoreError as exc:
            self._failure = DownloadError(f"cannot store instance {sop}: {exc}")
            self._wake.set()
            return
        self.state.instances_done.append(sop)
        self.state.notify()
        self._wake.set()

    def _whole_hash_ok(self, manifest: Manifest) -> bool:
        sha = hashlib.sha256()
        with self.store.reader() as r:
            for ref in manifest.chunks:
                found = r.chunk(ref.digest)
                if found is None:
                    return False
                sha.update(decode(found[0], found[1], ref.size))
        return sha.digest() == manifest.sha256

    async def _finish(self, record_exists: bool) -> None:
        while self._writes:
            await asyncio.gather(*list(self._writes))
        if self._failure is not None:
            raise self._failure
        if record_exists and not self._keep_record:
            await asyncio.wrap_future(self.store.submit_download(self.study_uid, None))

    @property
    def _tag(self) -> str:
        return f"fetch {self.study_uid}"


def pair_paths(peer: str, uplinks: list[str], remotes: int) -> dict[str, tuple[str, int]]:
    """Swarm paths to a peer with `remotes` tunnel addresses over our `uplinks`, name ->
    (our uplink, the peer's address index): max(L, R) paths, path k from our uplink k mod L to
    its address k mod R, so every line at both ends carries one (a one-line site fetching
    from a three-line clinic uses the clinic's three uploads; three lines on each side pair
    line i with line i)."""
    remotes = max(1, remotes)
    paths: dict[str, tuple[str, int]] = {}
    for k in range(max(len(uplinks), remotes)):
        uplink, remote = uplinks[k % len(uplinks)], k % remotes
        # Named by both ends when the peer has several tunnels: a name keeps its meaning
        # when one of our uplinks goes and the pairing shifts.
        name = f"{peer}@{uplink}" if remotes == 1 else f"{peer}@{uplink}>{remote}"
        paths[name] = (uplink, remote)
    return paths


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
