"""Updates between peers: a gateway offers the bundle of the version it runs to the admitted
peers (over the mesh server, which identifies them by tunnel source address and refuses
everyone else), and pulls a newer one from a named peer into its inbox.

    GET /mesh/v1/update          {"version": V, "size": N}  (404: nothing to share)
    GET /mesh/v1/update/bundle   the bundle's bytes

What is offered is `updates/installed.bundle`, kept by dicomesh-update.service once the
bundle proved healthy (`dicomesh-update install --keep`); a factory image has none until its
first update. The puller trusts nothing of the peer's: the bundle streams into
`inbox.receive`, which checks the Ed25519 signature and every file's hash before it queues
anything, and the *signed* version must be newer than the running one (unless forced).

Loop side (aiohttp); the file work runs in a one-thread executor of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from packaging.version import InvalidVersion, Version

from appliance.control import stream_progress
from appliance.firmware import FirmwareError, inbox
from appliance.firmware.bundle import BundleError, peek_manifest
from appliance.mesh.server import PEER_KEY

if TYPE_CHECKING:
    from appliance.mesh.node import MeshNode

log = logging.getLogger(__name__)

OFFER_ROUTE = "/mesh/v1/update"
BUNDLE_ROUTE = "/mesh/v1/update/bundle"
_CHUNK = 256 * 1024
# A line may be slow (an ADSL upload shared with chunk streams) but never silent this long.
READ_TIMEOUT_S = 60.0
OFFER_TIMEOUT = aiohttp.ClientTimeout(total=30.0, sock_connect=5.0, sock_read=15.0)


class PullError(FirmwareError):
    """A pull that cannot start or did not finish; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- serving


def offer(state_dir: Path) -> dict[str, Any] | None:
    """The version and size of the bundle this gateway shares, None if it has none.
    Blocking (reads the bundle's first member)."""
    path = state_dir / inbox.UPDATES_DIR / inbox.INSTALLED
    try:
        with path.open("rb") as f:
            manifest = peek_manifest(f)
            size = path.stat().st_size
    except FileNotFoundError:
        return None
    except (OSError, BundleError) as exc:
        log.warning("update bundle %s not shared: %s", path, exc)
        return None
    return {"version": manifest.version, "size": size}


def serve_routes(state_dir: Path) -> Callable[[web.Application], None]:
    """Routes for the mesh server (its middleware admits registered peers only)."""
    path = state_dir / inbox.UPDATES_DIR / inbox.INSTALLED

    async def get_offer(request: web.Request) -> web.Response:
        found = await asyncio.get_running_loop().run_in_executor(None, offer, state_dir)
        if found is None:
            raise web.HTTPNotFound(text="no update bundle to share\n")
        return web.json_response(found)

    async def get_bundle(request: web.Request) -> web.StreamResponse:
        if not path.is_file():
            raise web.HTTPNotFound(text="no update bundle to share\n")
        log.info("update: sending the installed bundle to %s", request[PEER_KEY].name)
        # Opened once: an install replacing the file meanwhile does not cut this download.
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    def register(app: web.Application) -> None:
        app.router.add_get(OFFER_ROUTE, get_offer)
        app.router.add_get(BUNDLE_ROUTE, get_bundle)

    return register


# ---------------------------------------------------------------- pulling


def check_newer(offered: str, running: str, peer: str, force: bool) -> None:
    """Raise PullError (409) unless `offered` is a newer version than `running` or `force`."""
    if force:
        return
    try:
        newer = Version(offered) > Version(running)
    except InvalidVersion:
        raise PullError(
            409, f"cannot compare {peer}'s version {offered!r} with the running {running!r}; "
            "force to install it anyway",
        ) from None  # fmt: skip
    if not newer:
        what = "the version running here" if offered == running else f"older than {running}"
        raise PullError(
            409, f"{peer} offers version {offered}, {what}: not pulled (a downgrade or "
            "reinstall needs force)",
        )  # fmt: skip


@dataclass
class PullState:
    """One pull from a peer, as the admin page and `dicomesh update pull` show it."""

    peer: str
    version: str  # offered; once queued, the signed one
    size: int | None
    received: int = 0
    finished: bool = False
    queued: bool = False
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "version": self.version,
            "size": self.size,
            "received": self.received,
            "finished": self.finished,
            "queued": self.queued,
            "error": self.error,
        }


class UpdatePuller:
    """Pulls an update bundle from an admitted peer into the inbox; one pull at a time."""

    def __init__(self, state_dir: Path, key_path: Path, mesh: MeshNode, running: str) -> None:
        self.state_dir = state_dir
        self.key_path = key_path
        self.mesh = mesh
        self.running = running
        self.state: PullState | None = None
        self._task: asyncio.Task | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-pull")

    async def start(self, peer_name: str, force: bool = False) -> PullState:
        """Ask the peer what it offers and start downloading it if it is newer.
        Raises PullError (unknown peer, nothing newer, busy, peer unreachable)."""
        if self._task is not None and not self._task.done():
            assert self.state is not None
            raise PullError(409, f"a pull from {self.state.peer} is running")
        if (self.state_dir / inbox.UPDATES_DIR / inbox.INCOMING).exists():
            raise PullError(409, "an update is already being installed")
        peer = self.mesh.registry.get(peer_name)
        if peer is None:
            raise PullError(404, f"no admitted peer called {peer_name!r}")
        session = self.mesh.client(peer).session
        try:
            async with session.get(OFFER_ROUTE, timeout=OFFER_TIMEOUT) as resp:
                if resp.status == 404:
                    raise PullError(404, f"{peer.name} has no update bundle to share")
                if resp.status != 200:
                    text = (await resp.text(errors="replace"))[:200].strip()
                    raise PullError(502, f"{peer.name} refused: HTTP {resp.status} {text}")
                body = json.loads(await resp.read())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PullError(502, f"{peer.name} unreachable: {type(exc).__name__} {exc}") from None
        except ValueError:
            raise PullError(502, f"{peer.name}: malformed offer") from None
        version = body.get("version") if isinstance(body, dict) else None
        size = body.get("size") if isinstance(body, dict) else None
        if not isinstance(version, str) or not 0 < len(version) <= 64:
            raise PullError(502, f"{peer.name}: malformed offer")
        check_newer(version, self.running, peer.name, force)
        state = PullState(peer.name, version, size if isinstance(size, int) else None)
        self.state = state
        log.info("update: pulling version %s from %s", version, peer.name)
        self._task = asyncio.create_task(self._download(session, state, force))
        return state

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._io.shutdown(wait=True)

    async def _download(
        self, session: aiohttp.ClientSession, state: PullState, force: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=READ_TIMEOUT_S)
        try:
            async with session.get(BUNDLE_ROUTE, timeout=timeout) as resp:
                if resp.status != 200:
                    raise PullError(502, f"{state.peer} refused the bundle: HTTP {resp.status}")
                if resp.content_length is not None:
                    state.size = resp.content_length

                async def read() -> bytes:
                    chunk = await resp.content.read(_CHUNK)
                    state.received += len(chunk)
                    state.changed.set()
                    return chunk

                def chunks() -> Iterator[bytes]:
                    # On the executor thread; each read runs on the loop.
                    while True:
                        fut = asyncio.run_coroutine_threadsafe(read(), loop)
                        chunk = fut.result(READ_TIMEOUT_S + 5)
                        if not chunk:
                            return
                        yield chunk

                def accept(signed: str) -> None:
                    check_newer(signed, self.running, state.peer, force)

                receiving = loop.run_in_executor(
                    self._io, inbox.receive, self.state_dir, chunks(), self.key_path, accept
                )
                try:
                    version = await asyncio.shield(receiving)
                except asyncio.CancelledError:
                    resp.close()  # the thread's next read fails: it removes its part file
                    with contextlib.suppress(Exception):
                        await receiving
                    raise
            state.version, state.queued = version, True
            log.info("update: version %s from %s verified and queued", version, state.peer)
        except BundleError as exc:
            state.error = f"bundle from {state.peer} refused: {exc}"
            log.warning("update: %s", state.error)
        except FirmwareError as exc:
            state.error = str(exc)
            log.warning("update: pull from %s: %s", state.peer, exc)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            state.error = f"{state.peer}: download broke off ({type(exc).__name__} {exc})"
            log.warning("update: %s", state.error)
        finally:
            state.finished = True
            state.changed.set()

    # -- `dicomesh update pull` over the control socket

    def control_routes(self, app: web.Application) -> None:
        app.router.add_post("/update/pull", self._control_pull)

    async def _control_pull(self, request: web.Request) -> web.StreamResponse:
        """Start a pull and stream its progress as JSON lines until it ends."""
        body = await request.json()
        peer = body.get("peer") if isinstance(body, dict) else None
        if not isinstance(peer, str) or not peer:
            raise web.HTTPBadRequest(text="need a peer name\n")
        try:
            state = await self.start(peer, force=bool(body.get("force")))
        except PullError as exc:
            raise _http_error(exc) from None
        return await stream_progress(request, state, state.to_json)


def _http_error(exc: PullError) -> web.HTTPException:
    kinds: dict[int, type[web.HTTPException]] = {
        404: web.HTTPNotFound,
        409: web.HTTPConflict,
        502: web.HTTPBadGateway,
    }
    return kinds.get(exc.status, web.HTTPInternalServerError)(text=f"{exc}\n")
