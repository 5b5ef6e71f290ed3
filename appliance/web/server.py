"""The admin page's HTTP server: builds the aiohttp app (guard, API, pages, static files),
listens on the configured addresses only, and runs zeroconf."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance.mesh.peers import PEERS_FILE, PeerRegistry
from appliance.web.api import MAX_BODY, Api
from appliance.web.auth import Account
from appliance.web.config import LAN, WebConfig
from appliance.web.guard import Guard
from appliance.web.logbuffer import LogBuffer
from appliance.web.parts import GatewayParts
from appliance.web.sessions import SessionStore

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
SHUTDOWN_TIMEOUT_S = 2.0  # live streams end at stop; nothing else takes long
LAN_POLL_S = 10.0  # how often "lan" in web.listen looks for a new address (DHCP, cable in)


def url_of(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/"


def on_uplinks(listen: list[str], net_status: dict[str, Any] | None) -> set[str]:
    """The `listen` addresses that are an uplink's own address (the network manager's
    status): the page must never be reachable from the internet side."""
    sources = {
        str(u.get("source")) for u in (net_status or {}).get("uplinks", []) if u.get("source")
    }
    return {a for a in listen if a in sources}


class WebServer:
    """The page for one gateway. Constructed early (so the log buffer sees start-up lines),
    started once the other subsystems run."""

    def __init__(
        self,
        cfg: WebConfig,
        parts: GatewayParts,
        clock: Callable[[], float] = time.monotonic,
        *,
        lan_nic: str | None = None,
        lan_poll_s: float = LAN_POLL_S,
    ) -> None:
        """`lan_nic`: the board's LAN interface, which "lan" in `cfg.listen` stands for."""
        self.cfg = cfg
        self.lan_nic = lan_nic
        self._lan_poll_s = lan_poll_s
        self._lan_task: asyncio.Task | None = None
        self._stopping = False  # the watcher ends on it too (net/monitor.py: swallowed cancels)
        self._bound: set[str] = set()
        self.parts = parts
        self.logs = LogBuffer(cfg.log_lines)
        self.logs.install()
        state_dir = Path(parts.cfg.state_dir)
        self.account = Account(state_dir)
        self.sessions = SessionStore(cfg.session_ttl_s, cfg.session_idle_s)
        self._own_registry: PeerRegistry | None = None
        self._state_dir = state_dir
        self.guard = Guard(cfg, self.sessions, self._registry, parts.cfg.mesh.address, clock)
        self.api = Api(cfg, parts, self.account, self.sessions, self.guard, self.logs, clock)
        self.app = web.Application(middlewares=self.guard.middlewares(), client_max_size=MAX_BODY)
        self.api.routes(self.app)
        self.app.router.add_get("/", self._page("index.html"))
        self.app.router.add_get("/login", self._page("login.html"))
        self.app.router.add_static("/static/", STATIC_DIR, show_index=False)
        self._runner: web.AppRunner | None = None
        self.urls: list[str] = []

    def _registry(self) -> PeerRegistry | None:
        """The mesh's live registry; without the mesh our own, reloaded when it changes."""
        if self.parts.mesh is not None:
            return self.parts.mesh.registry
        if self._own_registry is None:
            self._own_registry = PeerRegistry(self._state_dir / PEERS_FILE)
        self._own_registry.reload_if_changed()
        return self._own_registry

    @staticmethod
    def _page(name: str) -> Callable[[web.Request], asyncio.Future]:
        path = STATIC_DIR / name

        async def page(request: web.Request) -> web.FileResponse:
            return web.FileResponse(path, headers={"Cache-Control": "no-store"})

        return page  # type: ignore[return-value]

    async def start(self) -> None:
        """Listen on every configured address; an address that cannot be bound is logged
        and skipped (the DICOM node must run whatever the page does)."""
        code = await asyncio.get_running_loop().run_in_executor(
            None, self.account.ensure_setup_code
        )
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self._runner.setup()
        net_status = await self._net_status()
        listen = [a for a in self.cfg.listen if a != LAN]
        if LAN in self.cfg.listen:
            lan = await self._lan_addresses()
            if not lan and self.lan_nic is not None:
                log.warning(
                    "admin page: the LAN NIC %s has no IPv4 address yet; listening on it once "
                    "it has one", self.lan_nic,
                )  # fmt: skip
            listen += [a for a in lan if a not in listen]
        await self._listen_on(listen, net_status)
        if not self.urls:
            log.error("admin page off: no address could be bound")
        else:
            log.info("admin page on %s", " ".join(self.urls))
        if LAN in self.cfg.listen and self.lan_nic is not None:
            self._lan_task = asyncio.create_task(self._follow_lan(), name="web-lan")
        if code is not None:
            # First boot: the code is a one-time credential, not a patient attribute; it is
            # logged this once, and kept 0600 in the state directory until it is used.
            log.warning("admin page setup code: %s (also in %s)", code, self.account.code_path)
        elif not self.account.configured:
            log.warning("admin page not set up yet: setup code in %s", self.account.code_path)
        if self.cfg.zeroconf:
            await self._start_discovery()

    async def _listen_on(self, addresses: list[str], net_status: dict[str, Any] | None) -> None:
        """Bind the page on each address not bound yet; failures are logged and skipped."""
        assert self._runner is not None
        refused = on_uplinks(addresses, net_status)
        for address in addresses:
            if address in self._bound:
                continue
            if address in refused:
                log.error("admin page not on %s: that is an uplink's address (web.listen)", address)
                continue
            try:
                await web.TCPSite(self._runner, address, self.cfg.port, reuse_address=True).start()
            except OSError as exc:
                log.error("admin page cannot listen on %s:%d: %s", address, self.cfg.port, exc)
                continue
            self._bound.add(address)
            self.urls.append(url_of(address, self.port or self.cfg.port))

    async def _lan_addresses(self) -> list[str]:
        """The IPv4 addresses on the board's LAN NIC now ([] without one, or on error)."""
        if self.lan_nic is None:
            log.error('admin page: web.listen has "lan" but no LAN NIC is known (no board)')
            return []
        from appliance.net.errors import NetError
        from appliance.net.netlink import Netlink

        try:
            async with Netlink() as netlink:
                return await netlink.ipv4_addresses(self.lan_nic)
        except (NetError, OSError) as exc:
            log.error("admin page: addresses of %s unreadable: %s", self.lan_nic, exc)
            return []

    async def _follow_lan(self) -> None:
        """Listen on addresses the LAN NIC gains later (DHCP lease, cable plugged in). One
        that goes away keeps its socket, which serves again if the address comes back."""
        while not self._stopping:
            await asyncio.sleep(self._lan_poll_s)
            new = [a for a in await self._lan_addresses() if a not in self._bound]
            if new:
                before = len(self.urls)
                await self._listen_on(new, await self._net_status())
                if len(self.urls) > before:
                    log.info("admin page now also on %s", " ".join(self.urls[before:]))

    async def _net_status(self) -> dict[str, Any] | None:
        if self.parts.net is None:
            return None
        try:
            found: dict[str, Any] = await self.parts.net.status()
        except Exception as exc:  # the page starts whatever the lines do
            log.debug("uplink status unavailable: %s", exc)
            return None
        return found

    @property
    def port(self) -> int | None:
        """The bound port (the configured one unless it was 0)."""
        if self._runner is None or not self._runner.addresses:
            return None
        return int(self._runner.addresses[0][1])

    async def _start_discovery(self) -> None:
        addresses = self.cfg.announce_addresses(sorted(self._bound))
        if not addresses:
            log.info("zeroconf off: the page listens on no LAN address (web.zeroconf_addresses)")
            return
        from appliance.web.discovery import Advert, Discovery  # zeroconf only when used

        parts = self.parts
        keys: tuple[str, ...] = ()
        if parts.net is not None:
            keys = tuple(parts.net.public_keys().values())
        mesh = parts.cfg.mesh
        advert = Advert(
            ae_title=parts.cfg.dicom.ae_title,
            dicom_port=parts.dicom.port if parts.dicom else parts.cfg.dicom.port,
            web_port=self.port or self.cfg.port,
            mesh_name=mesh.name, mesh_role=mesh.role, mesh_address=mesh.address,
            mesh_port=parts.mesh.server.port if parts.mesh else mesh.port, public_keys=keys,
        )  # fmt: skip
        discovery = Discovery(advert, addresses)
        try:
            await discovery.start()
        except Exception as exc:  # e.g. a name mDNS refuses: the page and DICOM run on
            log.error("zeroconf off: %s: %s", type(exc).__name__, exc)
            await discovery.stop()
            return
        self.api.discovery = discovery

    async def stop(self) -> None:
        self._stopping = True
        if self._lan_task is not None:
            self._lan_task.cancel()
            await asyncio.gather(self._lan_task, return_exceptions=True)
            self._lan_task = None
        await self.api.stop()
        if self.api.discovery is not None:
            await self.api.discovery.stop()
            self.api.discovery = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.logs.uninstall()
