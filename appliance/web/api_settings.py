"""API: storage and network settings (`/api/settings/store`, `/api/settings/net`), each
validated with its TOML schema and written atomically into the config file (settings.py).

Storage limits and codec apply at once. The network (uplinks, policy routing, tunnels) is
set up by the network manager at start only, so a change is written and takes effect at
the next restart: the answer and the page say so (`restart_needed: ["net"]`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from appliance.net.config import NetConfig
from appliance.schema import ConfigError, dump
from appliance.store.config import StoreConfig
from appliance.web import settings
from appliance.web.replies import body_of, error, reply

if TYPE_CHECKING:
    from appliance.web.api import Api

log = logging.getLogger(__name__)

STORE_NOTE = (
    "Limits apply at once. When the quota or the free-space reserve is reached the store "
    "refuses new instances (C-STORE answers 0xA700) until space is freed; automatic "
    "eviction by usage statistics is not available yet."
)
NET_NOTE = (
    "Uplinks, policy routing and tunnels are set up when the gateway starts: changes are "
    "saved now and applied at the next restart."
)


class SettingsRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/settings/store", self.get_store)
        app.router.add_put("/api/settings/store", self.put_store)
        app.router.add_get("/api/settings/net", self.get_net)
        app.router.add_put("/api/settings/net", self.put_net)

    def _answer(self, value: Any, note: str, **extra: Any) -> web.Response:
        return reply({
            "settings": dump(value), "file": str(self.api.parts.config_path), "note": note,
            "restart_needed": sorted(self.api.restart_needed), **extra,
        })  # fmt: skip

    async def _write(self, section: str, cls: type, body: dict[str, Any]) -> Any:
        """The validated section, written; a reply (400/500) when it cannot be."""
        try:
            new = settings.validate_section(cls, section, body)
        except ConfigError as exc:
            return error(400, "invalid settings", errors=exc.errors)
        path = self.api.parts.config_path
        try:
            await self.api._executor(settings.check_whole, path, section, new)
        except ConfigError as exc:
            return error(400, "invalid settings", errors=exc.errors)
        try:
            await self.api._executor(settings.write_section, path, section, new)
        except (OSError, ConfigError) as exc:
            return error(500, f"cannot write {path}: {exc}")
        return new

    async def get_store(self, request: web.Request) -> web.Response:
        return self._answer(self.api.parts.cfg.store, STORE_NOTE)

    async def put_store(self, request: web.Request) -> web.Response:
        new = await self._write("store", StoreConfig, await body_of(request))
        if isinstance(new, web.Response):
            return new
        parts = self.api.parts
        restart = parts.store.apply(new) if parts.store is not None else []
        parts.cfg = dataclasses.replace(parts.cfg, store=new)
        self.api.restart_needed.update(f"store.{k}" for k in restart)
        log.info("web: storage settings written to %s and applied (quota %d bytes, reserve "
                 "%d bytes)", parts.config_path, new.max_bytes, new.min_free_bytes)  # fmt: skip
        return self._answer(new, STORE_NOTE, applied=True)

    async def get_net(self, request: web.Request) -> web.Response:
        return self._answer(self.api.parts.cfg.net, NET_NOTE, applied=False,
                            running=self.api.parts.net is not None)  # fmt: skip

    async def put_net(self, request: web.Request) -> web.Response:
        new = await self._write("net", NetConfig, await body_of(request))
        if isinstance(new, web.Response):
            return new
        parts = self.api.parts
        parts.cfg = dataclasses.replace(parts.cfg, net=new)
        # Compared with what runs: changing back clears the banner.
        if new != self.api.started_cfg.net:
            self.api.restart_needed.add("net")
        else:
            self.api.restart_needed.discard("net")
        log.info("web: network settings written to %s (%d uplink(s)); applied at restart",
                 parts.config_path, len(new.uplinks))  # fmt: skip
        return self._answer(new, NET_NOTE, applied=False,
                            running=parts.net is not None)  # fmt: skip
