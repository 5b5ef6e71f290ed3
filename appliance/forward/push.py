"""Peer gateways and the central PACS as forwarding destinations, over the mesh API.

A "peer:NAME" job asks that admitted gateway to fetch the study from the mesh (its own swarm
downloader, as `dicomesh fetch`), then asks again every `push_poll_s` until it reports that
it holds every instance of the job with the same manifest (the same bytes). A "central" job
does the same with a replica (a gateway whose role talks to the central PACS) and also asks
it to C-STORE the instances into the central PACS: done once the PACS answered Success (or
Warning) for each. Clinics never talk to the central PACS themselves; a gateway that does
(a replica) stores into it directly.

The job is durable on the sending side only (its queue); the receiver keeps just an
in-memory note per push and does idempotent work (a fetch joins a running one; a C-STORE of
an instance the PACS has is accepted again), so a receiver that restarts is simply asked
again. A refusal, a dead peer or no progress for `push_stall_s` fail the try with the
reason, and the queue's backoff applies as for any failure.

Wire: POST /mesh/v1/forward/push, JSON, admitted peers only (identity = source address):

    request {"study": UID, "to": "here" | "central", "push": ID,
             "instances": {SOP UID: manifest SHA-256 hex}}      # the list: first ask only
    answer  {"state": STATE, "push": ID, "held": n, "of": n, "chunks": n, "stored": n,
             "reason": text}

ID = push_id(study, to, instances), checked by the receiver. STATE: "unknown" (the receiver
does not know ID: send the list again), "refused", "fetching", "storing" (into the central
PACS), "complete", "failed" (the central PACS refused; "reason" says why). Progress: "held"
instances (same manifest), "chunks" stored durably by the fetch so far, "stored" into the
central PACS; "reason" while fetching: the last fetch's error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from appliance.central.config import CentralConfig
from appliance.central.core import is_uid  # the catalog's rule: printable, no space
from appliance.dicom import retrieve
from appliance.dicom.config import DicomConfig, DicomNode
from appliance.forward.config import CENTRAL, PEER, ForwardConfig
from appliance.forward.core import Job
from appliance.forward.sender import Destination, DicomDestination, Outcome
from appliance.mesh import protocol
from appliance.mesh.errors import MeshError, PeerInputError
from appliance.mesh.node import MeshNode
from appliance.mesh.peers import Peer
from appliance.mesh.server import PEER_KEY
from appliance.mesh.swarm.download import DownloadState
from appliance.store import Store

log = logging.getLogger(__name__)

PUSH_PATH = "/mesh/v1/forward/push"
HERE = "here"
TARGETS = (HERE, CENTRAL)
# What a receiver remembers of pushes (maps keyed by what peers send): at most this many
# pushes and instances in all, the least recently asked about forgotten first (its sender
# then sends the list again).
MAX_PUSHES = 256
MAX_REMEMBERED = 4 * 65536
MAX_INSTANCES = 65535
PULL_TIMEOUT_S = 5.0
# After a failed fetch a push waits before the next (each fetch may move bytes over the
# sender's slow uplink): 2 s, doubling up to 60 s, back to 2 s after a fetch that succeeded.
FETCH_RETRY_S = 2.0
FETCH_RETRY_MAX_S = 60.0
CALL_TIMEOUT_S = 40.0  # one exchange (the mesh client gives up after 30 s)
_HEX64 = frozenset("0123456789abcdef")


# -- the wire (I/O-free) ---------------------------------------------------------------------


def push_id(study: str, to: str, instances: dict[str, str]) -> str:
    """The id of a push: SHA-256 over its canonical content (hex)."""
    canon = json.dumps([study, to, sorted(instances.items())], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


@dataclass(frozen=True)
class PushRequest:
    study: str
    to: str
    push: str
    instances: dict[str, str] | None  # None: a progress question about a known push


def parse_request(body: Any) -> PushRequest:
    """A validated request; raises PeerInputError."""
    if not isinstance(body, dict):
        raise PeerInputError("push: need an object")
    study, to, pid = body.get("study"), body.get("to"), body.get("push")
    if not is_uid(study) or to not in TARGETS or not _is_hex64(pid):
        raise PeerInputError("push: need a study UID, to = here|central and a push id")
    raw = body.get("instances")
    if raw is None:
        return PushRequest(study, to, pid, None)
    if not isinstance(raw, dict) or not 0 < len(raw) <= MAX_INSTANCES:
        raise PeerInputError(f"push: instances must map 1-{MAX_INSTANCES} SOP UIDs")
    if not all(is_uid(k) and _is_hex64(v) for k, v in raw.items()):
        raise PeerInputError("push: instances must map SOP UIDs to manifest digests")
    if push_id(study, to, raw) != pid:
        raise PeerInputError("push: id does not match its content")
    return PushRequest(study, to, pid, dict(raw))


@dataclass
class StallWatch:
    """No change in a peer's reported progress for `stall_s` means stalled."""

    stall_s: float
    _last: Any = None
    _since: float = 0.0

    def stalled(self, progress: Any, now: float) -> bool:
        if progress != self._last:
            self._last, self._since = progress, now
            return False
        return now - self._since > self.stall_s


# -- what a job sends ------------------------------------------------------------------------


def job_manifests(store: Store, job: Job) -> dict[str, tuple[str, int]]:
    """The job's instances as stored now: SOP UID -> (manifest digest hex, size)."""
    with store.reader() as r:
        if job.level == "instance":
            sops = [job.sop_instance_uid]
        else:
            sops = [i.uid for s in r.series_of(job.study_uid) for i in r.instances_of(s.uid)]
        out = {}
        for sop in sops:
            manifest, inst = r.manifest(sop), r.instance(sop)
            if manifest is not None and inst is not None:
                out[sop] = (manifest.digest.hex(), inst.size)
        return out


# -- sending side (forwarder threads) ----------------------------------------------------------


class MeshLink:
    """The mesh as forwarder threads use it: every call runs on the mesh's loop."""

    def __init__(self, mesh: MeshNode) -> None:
        self.mesh = mesh

    def call(self, make: Callable[[], Awaitable[Any]], timeout: float = CALL_TIMEOUT_S) -> Any:
        """Run `make()` on the mesh loop and wait for it; raises MeshError if the mesh does
        not run, TimeoutError if it takes longer than `timeout`."""
        loop = self.mesh.loop
        if loop is None or loop.is_closed():
            raise MeshError("the mesh is not running")

        async def run() -> Any:
            return await make()

        fut = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no answer within {timeout:.0f} s") from None

    def peer(self, name: str) -> Peer | None:
        return self.mesh.registry.get(name)

    def replicas(self, roles: list[str]) -> list[Peer]:
        """Admitted peers whose role talks to the central PACS: online ones first, by name."""
        found = [p for p in self.mesh.registry.peers() if p.role in roles]
        state = self.mesh.peer_state

        def offline(p: Peer) -> bool:
            s = state.get(p.name)
            return s is None or not s.online

        return sorted(found, key=lambda p: (offline(p), p.name))


class Pusher:
    """One push to one peer, asked until it reports complete (thread side, blocking)."""

    def __init__(self, link: MeshLink, cfg: ForwardConfig, stopping: threading.Event) -> None:
        self.link = link
        self.cfg = cfg
        self.stopping = stopping

    def push(self, peer: Peer, study: str, wanted: dict[str, tuple[str, int]], to: str) -> Outcome:
        instances = {sop: digest for sop, (digest, _size) in wanted.items()}
        pid = push_id(study, to, instances)
        size = sum(s for _d, s in wanted.values())
        name = peer.name
        try:
            # The peer fetches what our catalog describes: make it current before it pulls.
            self.link.call(lambda: self.link.mesh.publish({study}))
        except (MeshError, TimeoutError) as exc:
            log.info("forward: publishing study %s before a push failed: %s", study, exc)
        watch = StallWatch(self.cfg.push_stall_s)
        deadline = time.monotonic() + self.cfg.push_timeout_s
        full = True
        for _ in range(1_000_000):  # bounded by the deadline and the stall watch anyway
            if self.stopping.is_set():
                return Outcome(False, "gateway stopping", interrupted=True)
            body: dict[str, Any] = {"study": study, "to": to, "push": pid}
            if full:
                body["instances"] = instances
            try:
                answer = self.link.call(
                    lambda body=body: self.link.mesh.client(peer).post_json(PUSH_PATH, body)
                )
            except (MeshError, TimeoutError) as exc:
                if "HTTP 403" in str(exc):  # its registry does not know our address
                    return Outcome(False, f"peer {name} refused: {exc} (does it admit us?)")
                return Outcome(False, f"peer {name} unreachable: {exc}")
            if not isinstance(answer, dict) or not isinstance(answer.get("state"), str):
                return Outcome(False, f"peer {name}: malformed answer")
            state = answer["state"]
            reason = str(answer.get("reason") or "")[:300]
            held, of, stored = (_int(answer, k) for k in ("held", "of", "stored"))
            if state == "unknown":
                if full:
                    return Outcome(False, f"peer {name}: push not taken")
                full = True  # it restarted or forgot: the list again, at once
                continue
            full = False
            if state == "complete":
                return Outcome(True, "", len(wanted), size)
            if state == "refused":
                return Outcome(False, f"peer {name} refused: {reason}")
            if state == "failed":
                return Outcome(False, f"peer {name}: {reason}")
            if state not in ("fetching", "storing"):
                return Outcome(False, f"peer {name}: unknown state {state[:40]!r}")
            now = time.monotonic()
            progress = (state, held, _int(answer, "chunks"), stored)
            if watch.stalled(progress, now):
                where = f"{stored}/{len(wanted)} stored" if state == "storing" else (
                    f"{held}/{of} held")  # fmt: skip
                note = f"; {reason}" if reason else ""
                stall = self.cfg.push_stall_s
                return Outcome(
                    False, f"peer {name}: no progress for {stall:.0f} s ({state}, {where}{note})"
                )
            if now > deadline:
                return Outcome(False, f"peer {name}: not complete within "
                               f"{self.cfg.push_timeout_s:.0f} s ({state})")  # fmt: skip
            self.stopping.wait(self.cfg.push_poll_s)
        return Outcome(False, f"peer {name}: too many questions")


def _int(answer: dict, key: str) -> int:
    value = answer.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class PeerDestination:
    """ "peer:NAME": that admitted gateway fetches the job's instances from the mesh."""

    def __init__(self, pusher: Pusher, name: str) -> None:
        self.pusher = pusher
        self.name = name

    def send(self, store: Store, job: Job) -> Outcome:
        wanted = job_manifests(store, job)
        if not wanted:
            return Outcome(False, "no stored instance left to send")
        peer = self.pusher.link.peer(self.name)
        if peer is None:
            return Outcome(False, f"peer {self.name} is not admitted")
        return self.pusher.push(peer, job.study_uid, wanted, HERE)


class CentralDestination:
    """ "central": a replica fetches the job's instances and C-STOREs them into the central
    PACS; on a gateway that talks to the central PACS itself, a direct C-STORE."""

    def __init__(
        self, pusher: Pusher, central: CentralConfig, direct: DicomDestination | None
    ) -> None:
        self.pusher = pusher
        self.central = central
        self.direct = direct

    def send(self, store: Store, job: Job) -> Outcome:
        if self.direct is not None:
            return self.direct.send(store, job)
        wanted = job_manifests(store, job)
        if not wanted:
            return Outcome(False, "no stored instance left to send")
        replicas = self.pusher.link.replicas(list(self.central.roles))
        if not replicas:
            return Outcome(False, "no replica admitted to reach the central PACS through")
        reasons = []
        for peer in replicas:  # the next replica when one refuses, is down or stalls
            outcome = self.pusher.push(peer, job.study_uid, wanted, CENTRAL)
            if outcome.ok or outcome.interrupted:
                return outcome
            reasons.append(outcome.reason)
        return Outcome(False, "; ".join(reasons))


def central_node(central: CentralConfig) -> DicomNode:
    return DicomNode(central.ae_title, central.host, central.port)


def mesh_destinations(
    link: MeshLink,
    cfg: ForwardConfig,
    central: CentralConfig,
    direct: DicomDestination | None,
    stopping: threading.Event,
) -> Callable[[str, str], Destination | None]:
    """The forwarder's resolver for "peer:NAME" and "central" destinations. `direct`: the
    central PACS as a DICOM node, on a gateway that talks to it itself."""
    pusher = Pusher(link, cfg, stopping)

    def resolve(kind: str, target: str) -> Destination | None:
        if kind == PEER:
            return PeerDestination(pusher, target)
        if kind == CENTRAL and central.enabled:
            return CentralDestination(pusher, central, direct)
        return None

    return resolve


# -- receiving side (mesh loop) -----------------------------------------------------------------


@dataclass
class _Push:
    study: str
    to: str
    instances: dict[str, bytes]  # SOP UID -> manifest digest
    requester: str
    download: DownloadState | None = None
    error: str = ""  # the last failed download's error
    failed: DownloadState | None = None  # the last failed download (seen once)
    delay: float = 0.0  # before the next fetch after a failed one
    next_fetch: float = 0.0  # loop time
    central: asyncio.Future | None = None  # -> Outcome
    stored: int = 0


class PushReceiver:
    """Serves PUSH_PATH: fetches what admitted peers push here and, on a gateway talking to
    the central PACS (`central` set), stores it there."""

    def __init__(
        self,
        cfg: ForwardConfig,
        mesh: MeshNode,
        store: Store,
        dicom: DicomConfig,
        central: DicomNode | None,
    ) -> None:
        self.cfg = cfg
        self.mesh = mesh
        self.store = store
        self.central = DicomDestination(central, dicom) if central is not None else None
        self._pushes: OrderedDict[str, _Push] = OrderedDict()
        self._remembered = 0  # instances in _pushes
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward-central")
        self.counters = {"pushes": 0, "refused": 0, "fetches": 0, "central_stores": 0}

    def routes(self, app: web.Application) -> None:
        app.router.add_post(PUSH_PATH, self._serve)

    async def stop(self) -> None:
        for push in self._pushes.values():
            if push.central is not None:
                push.central.cancel()
        self._io.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, request: web.Request) -> web.Response:
        peer = request[PEER_KEY]
        req = parse_request(protocol.decode_json(await request.read()))
        answer = await self.answer(peer, req)
        return web.Response(body=protocol.encode_json(answer), content_type=protocol.JSON_TYPE)

    async def answer(self, peer: Peer, req: PushRequest) -> dict[str, Any]:
        base: dict[str, Any] = {"push": req.push}
        if not self.cfg.accept_push:
            self.counters["refused"] += 1
            reason = "this gateway does not accept pushes ([forward] accept_push)"
            return {**base, "state": "refused", "reason": reason}
        if req.to == CENTRAL and self.central is None:
            self.counters["refused"] += 1
            return {**base, "state": "refused",
                    "reason": "this gateway does not talk to the central PACS"}  # fmt: skip
        push = self._pushes.get(req.push)
        if push is None:
            if req.instances is None:
                return {**base, "state": "unknown"}
            wanted = {s: bytes.fromhex(d) for s, d in req.instances.items()}
            push = _Push(req.study, req.to, wanted, peer.name)
            self._remember(req.push, push)
            self.counters["pushes"] += 1
            log.info("push from %s: study %s, %d instance(s), to %s",
                     peer.name, req.study, len(push.instances), req.to)  # fmt: skip
        else:
            self._pushes.move_to_end(req.push)
        loop = asyncio.get_running_loop()
        held, chunks = await loop.run_in_executor(None, self._held, push)
        of = len(push.instances)
        base.update(held=held, of=of)
        if held < of:
            await self._fetch(push, peer)
            return {**base, "state": "fetching", "chunks": chunks, "reason": push.error}
        if push.to == HERE:
            return {**base, "state": "complete"}
        return self._central_answer(push, base)

    def _remember(self, pid: str, push: _Push) -> None:
        self._pushes[pid] = push
        self._remembered += len(push.instances)
        while len(self._pushes) > 1 and (
            len(self._pushes) > MAX_PUSHES or self._remembered > MAX_REMEMBERED
        ):
            _old, dropped = self._pushes.popitem(last=False)
            self._remembered -= len(dropped.instances)
            if dropped.central is not None:
                dropped.central.cancel()  # its sender asks again with the list

    def _held(self, push: _Push) -> tuple[int, int]:
        """(instances of the push here with the same manifest, chunks the study's download
        has stored durably so far): progress that only grows when something really landed,
        so a fetch failing over and over (a full store) reads as stalled."""
        held = 0
        with self.store.reader() as r:
            for sop, digest in push.instances.items():
                manifest = r.manifest(sop)
                if manifest is not None and manifest.digest == digest:
                    held += 1
            return held, len(r.pinned(push.study))

    async def _fetch(self, push: _Push, peer: Peer) -> None:
        """Start (or keep) a fetch of the study; a new one after the last ended (after a
        failed one, not before the retry delay), from a fresh copy of the requester's
        catalog (it just published the study)."""
        last = push.download
        if last is not None and not last.finished:
            return
        now = asyncio.get_running_loop().time()
        if last is not None and last.error and push.failed is not last:
            push.failed, push.error = last, last.error[:300]
            push.delay = min(FETCH_RETRY_MAX_S, push.delay * 2 or FETCH_RETRY_S)
            push.next_fetch = now + push.delay
        elif last is not None and not last.error:
            push.delay = 0.0
        if now < push.next_fetch:
            return
        try:
            await asyncio.wait_for(self.mesh.pull_from(peer), PULL_TIMEOUT_S)
        except (MeshError, TimeoutError) as exc:
            log.info("push from %s: catalog pull failed: %s", peer.name, exc)
        self.counters["fetches"] += 1
        push.download = self.mesh.fetch(push.study)

    def _central_answer(self, push: _Push, base: dict[str, Any]) -> dict[str, Any]:
        if push.central is None:
            push.stored = 0
            push.central = asyncio.get_running_loop().run_in_executor(
                self._io, self._store_central, push
            )
            self.counters["central_stores"] += 1
        if not push.central.done():
            return {**base, "state": "storing", "stored": push.stored}
        if push.central.cancelled():
            push.central = None
            return {**base, "state": "failed", "reason": "central store interrupted"}
        exc = push.central.exception()
        outcome = Outcome(False, f"{type(exc).__name__}: {exc}") if exc else push.central.result()
        if outcome.ok:
            return {**base, "state": "complete", "stored": outcome.sent}
        push.central = None  # the next try starts over
        return {**base, "state": "failed", "stored": outcome.sent,
                "reason": f"central PACS: {outcome.reason}"}  # fmt: skip

    def _store_central(self, push: _Push) -> Outcome:
        """Thread side: C-STORE the push's instances into the central PACS."""
        assert self.central is not None
        with self.store.reader() as r:
            items = []
            for sop in push.instances:
                inst = r.instance(sop)
                if inst is None:
                    return Outcome(False, f"instance {sop} no longer held here")
                items.append(
                    retrieve.Item(inst.uid, inst.sop_class_uid, inst.transfer_syntax, push.study)
                )

        def on_sent(n: int) -> None:
            push.stored = n

        started = time.monotonic()
        outcome = self.central.send_items(self.store, items, on_sent)
        log.info("push from %s: study %s into the central PACS: %d/%d instance(s) in %.1f s%s",
                 push.requester, push.study, outcome.sent, len(items),
                 time.monotonic() - started,
                 "" if outcome.ok else f": {outcome.reason}")  # fmt: skip
        return outcome
