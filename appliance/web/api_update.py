"""API: firmware updates (`/api/system/update`). The page uploads a signed bundle; the gateway
checks the signature at once (a quick, clear answer) and queues it for
dicomesh-update.service, which installs it into the inactive slot and rolls back unless the
new version proves healthy. Or the page names an admitted peer and the gateway pulls the
bundle that peer runs, if newer (appliance/firmware/share.py), through the same checks. The
gateway never installs anything itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from appliance import __version__
from appliance.firmware import FirmwareError, inbox
from appliance.firmware.bundle import BundleError
from appliance.firmware.share import PullError
from appliance.web.replies import body_of, error, reply

if TYPE_CHECKING:
    from appliance.web.api import Api

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_READ_TIMEOUT_S = 60.0  # a stalled upload must not hold the executor thread forever


class UpdateRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/system/update", self.state)
        app.router.add_post("/api/system/update", self.upload)
        app.router.add_post("/api/system/update/pull", self.pull)

    def _state_dir(self) -> Path:
        return Path(self.api.parts.cfg.state_dir)

    async def state(self, request: web.Request) -> web.Response:
        updates = self._state_dir() / inbox.UPDATES_DIR
        puller = getattr(self.api.parts, "updates", None)
        return reply({
            "version": __version__,
            "pending": (updates / inbox.INCOMING).exists(),
            "last_result": inbox.last_result(self._state_dir()),
            "pull": puller.state.to_json() if puller and puller.state else None,
        })  # fmt: skip

    async def pull(self, request: web.Request) -> web.Response:
        """`{"peer": NAME, "force": false}`: start pulling the bundle that peer offers; 202
        once the peer offered a newer version (progress: `pull` in GET)."""
        body = await body_of(request)
        peer, force = body.get("peer"), body.get("force", False)
        if not isinstance(peer, str) or not peer or not isinstance(force, bool):
            return error(400, "peer: need an admitted peer's name (and force: true/false)")
        puller = getattr(self.api.parts, "updates", None)
        if puller is None:
            return error(409, "the mesh is off: no peer to pull from")
        try:
            state = await puller.start(peer, force=force)
        except PullError as exc:
            return error(exc.status, str(exc))
        return reply(state.to_json(), 202)

    async def upload(self, request: web.Request) -> web.Response:
        """The request body is the bundle (application/octet-stream), streamed to disk."""
        loop = asyncio.get_running_loop()
        key = Path(self.api.cfg.update_key)

        def body() -> Iterator[bytes]:
            # Runs on the executor thread; each read is done on the loop.
            while True:
                fut = asyncio.run_coroutine_threadsafe(request.content.read(_CHUNK), loop)
                chunk = fut.result(_READ_TIMEOUT_S)
                if not chunk:
                    return
                yield chunk

        try:
            version = await loop.run_in_executor(
                None, inbox.receive, self._state_dir(), body(), key
            )
        except BundleError as exc:
            log.warning("web: update bundle refused: %s", exc)
            return error(400, f"bundle: {exc}")
        except FirmwareError as exc:
            return error(409, str(exc))
        except OSError as exc:
            log.error("web: update bundle not stored: %s", exc)
            return error(500, f"bundle not stored: {exc}")
        log.info("web: update to version %s verified and queued for installation", version)
        return reply({"version": version, "queued": True}, 202)
