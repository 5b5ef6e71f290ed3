"""API: firmware updates (`/api/system/update`). The page uploads a signed bundle; the gateway
checks the signature at once (a quick, clear answer) and queues it for
dicomesh-update.service, which installs it into the inactive slot and rolls back unless the
new version proves healthy. The gateway never installs anything itself."""

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
from appliance.web.replies import error, reply

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

    def _state_dir(self) -> Path:
        return Path(self.api.parts.cfg.state_dir)

    async def state(self, request: web.Request) -> web.Response:
        updates = self._state_dir() / inbox.UPDATES_DIR
        return reply({
            "version": __version__,
            "pending": (updates / inbox.INCOMING).exists(),
            "last_result": inbox.last_result(self._state_dir()),
        })  # fmt: skip

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
