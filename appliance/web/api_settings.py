"""API: settings (`/api/settings/dicom`, `/api/settings/store`, `/api/settings/net`), each
validated with its TOML schema, checked with the whole file (rules across sections, e.g.
forwarding destinations must stay known DICOM nodes), written atomically into the config
file (settings.py), then applied where the running subsystem can take it.

The DICOM node takes everything but its listening address at once (`DicomNodeServer.apply`).
Storage limits and codec apply at once. The network (uplinks, policy routing, tunnels) is
set up by the network manager at start only, so a change is written and takes effect at
the next restart: the answer and the page say so (`restart_needed: ["net"]`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from appliance.dicom.config import DicomConfig
from appliance.evict.config import EvictConfig
from appliance.evict.evictor import Report
from appliance.forward.sender import dicom_destinations
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
    "refuses new instances (C-STORE answers 0xA700) until space is freed: on a cache "
    "(replica), let eviction free space before that (its limits below these)."
)
EVICT_NOTE = (
    "Applied from the next eviction check. Only studies that other gateways (or the central "
    "PACS) hold complete are evicted, lowest usage score first; the plan shows what would go "
    "now and why, without changing anything."
)
NET_NOTE = (
    "Uplinks, policy routing and tunnels are set up when the gateway starts: changes are "
    "saved now and applied at the next restart."
)


class SettingsRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/settings/dicom", self.get_dicom)
        app.router.add_put("/api/settings/dicom", self.put_dicom)
        app.router.add_get("/api/settings/store", self.get_store)
        app.router.add_put("/api/settings/store", self.put_store)
        app.router.add_get("/api/settings/net", self.get_net)
        app.router.add_put("/api/settings/net", self.put_net)
        app.router.add_get("/api/settings/evict", self.get_evict)
        app.router.add_put("/api/settings/evict", self.put_evict)
        app.router.add_get("/api/evict/plan", self.evict_plan)

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

    async def get_dicom(self, request: web.Request) -> web.Response:
        return reply({
            "settings": dump(self.api.parts.cfg.dicom),
            "file": str(self.api.parts.config_path),
            "restart_needed": sorted(self.api.restart_needed),
        })  # fmt: skip

    async def put_dicom(self, request: web.Request) -> web.Response:
        new = await self._write("dicom", DicomConfig, await body_of(request))
        if isinstance(new, web.Response):
            return new
        parts = self.api.parts
        if parts.dicom is not None:
            parts.dicom.apply(new)  # all but listen/port, from the next association
        parts.cfg = dataclasses.replace(parts.cfg, dicom=new)
        # Compared with what listens (not with the previous save): a port changed back needs
        # no restart any more.
        running = self.api.started_cfg.dicom
        restart = [key for key in ("listen", "port") if getattr(new, key) != getattr(running, key)]
        # C-MOVE and sends read the nodes live; the forwarder is told.
        if getattr(parts, "forwarder", None) is not None:
            parts.forwarder.set_destinations(dicom_destinations(new))
        self.api.restart_needed -= {"dicom.listen", "dicom.port", "dicom.nodes"}
        self.api.restart_needed.update(f"dicom.{key}" for key in restart)
        log.info("web: DICOM settings written to %s and applied%s", parts.config_path,
                 f" (restart needed for {', '.join(restart)})" if restart else "")  # fmt: skip
        if self.api.discovery is not None:
            try:
                await self.api.discovery.update_ae(new.ae_title)
            except Exception as exc:  # saved and applied; only the LAN advert is stale
                log.error("zeroconf: cannot re-announce AE title %s: %s", new.ae_title, exc)
        return reply({
            "settings": dump(new), "file": str(parts.config_path),
            "applied": True, "restart_needed": sorted(self.api.restart_needed),
        })  # fmt: skip

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

    async def get_evict(self, request: web.Request) -> web.Response:
        return self._answer(self.api.parts.cfg.evict, EVICT_NOTE,
                            running=self.api.parts.evictor is not None)  # fmt: skip

    async def put_evict(self, request: web.Request) -> web.Response:
        new = await self._write("evict", EvictConfig, await body_of(request))
        if isinstance(new, web.Response):
            return new
        parts = self.api.parts
        restart = parts.evictor.apply(new) if parts.evictor is not None else []
        parts.cfg = dataclasses.replace(parts.cfg, evict=new)
        self.api.restart_needed.update(f"evict.{k}" for k in restart)
        state = ("enabled" if new.enabled else "off") + (", dry run" if new.dry_run else "")
        log.info("web: eviction settings written to %s and applied (%s)", parts.config_path,
                 state)  # fmt: skip
        return self._answer(new, EVICT_NOTE, applied=parts.evictor is not None,
                            running=parts.evictor is not None)  # fmt: skip

    async def evict_plan(self, request: web.Request) -> web.Response:
        """What eviction would do now and why (a dry run: nothing changes), and the last run."""
        evictor = self.api.parts.evictor
        if evictor is None:
            return error(409, "eviction is not running on this gateway")
        plan = await evictor.async_plan(exact=True)
        shown = Report(plan, dry_run=True)
        last = evictor.last_report
        return reply({
            **shown.to_json(), "text": shown.text(),
            "last_run": None if last is None else {**last.to_json(), "text": last.text()},
        })  # fmt: skip
