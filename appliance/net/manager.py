"""NetworkManager: the network subsystem's lifecycle object.

start() brings up one WireGuard device per uplink (if enabled), reconciles rules, routes,
shapers and tunnel addresses, and starts one health monitor per uplink; a loop reconciles
again every `reconcile_interval_s` and at once when an uplink changes state or the peer
registry changes. stop() removes exactly what it set up (found by its numbers, plan.py).

For the swarm: `bindings()` lists usable uplinks (source address + fwmark, see binding.py);
`subscribe(callback)` reports every health change (a down uplink's paths are to be dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web
from pyroute2.netlink.exceptions import NetlinkError

from appliance.mesh.peers import PEERS_FILE, Peer, PeerRegistry
from appliance.net import plan
from appliance.net.binding import UplinkBinding
from appliance.net.config import NetConfig, UplinkConfig
from appliance.net.errors import NetError
from appliance.net.health import Health
from appliance.net.keys import KeyPair, load_or_create
from appliance.net.monitor import UplinkMonitor
from appliance.net.netlink import Netlink
from appliance.net.reconcile import diff, teardown
from appliance.net.wireguard import WgBackend, WgDevice, WgUpdate, tunnel_peers, update_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UplinkChange:
    """An uplink's health changed; `binding` is where to bind sockets to use it."""

    uplink: str
    old: Health
    new: Health
    binding: UplinkBinding

    @property
    def usable(self) -> bool:
        return self.new.usable


Subscriber = Callable[[UplinkChange], None]


async def choose_backend(kind: str, netns: str | None) -> WgBackend:
    """The WireGuard backend for `kind` ("auto": the kernel module if present)."""
    from appliance.net.wg_kernel import KernelBackend, kernel_available
    from appliance.net.wg_userspace import UserspaceBackend

    # The kernel backend configures devices of this process's own namespace only.
    # pyroute2's sync sockets run their own event loop: probe from a thread without one.
    loop = asyncio.get_running_loop()
    kernel_ok = (
        netns is None
        and kind in ("auto", "kernel")
        and await loop.run_in_executor(None, kernel_available)
    )
    if kernel_ok:
        return KernelBackend()
    if kind == "kernel":
        raise NetError("WireGuard backend 'kernel': the kernel has no WireGuard module")
    if not UserspaceBackend.available():
        raise NetError("no WireGuard backend: no kernel module and no wireguard-go")
    return UserspaceBackend(netns)


class NetworkManager:
    """Uplinks, policy routing, shaping, health and WireGuard tunnels of one gateway."""

    def __init__(
        self,
        cfg: NetConfig,
        state_dir: Path,
        *,
        peers: Callable[[], list[Peer]] | None = None,
        netns: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self.netns = netns
        self._registry = PeerRegistry(state_dir / PEERS_FILE) if peers is None else None
        self._peers = peers or self._registry_peers
        self._nl = Netlink(netns)
        self._backend: WgBackend | None = None
        self._keys: dict[str, KeyPair] = {}
        self._applied: dict[str, WgDevice] = {}
        self._sources: dict[str, str | None] = {}
        self._gateways: dict[str, str | None] = {}
        self._monitors: dict[str, UplinkMonitor] = {}
        self._subscribers: list[Subscriber] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = asyncio.Lock()
        self.last_failures = 0

    # ------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._nl.open()
        try:
            if self.cfg.wireguard.enabled:
                self._backend = await choose_backend(self.cfg.wireguard.backend, self.netns)
                log.info("WireGuard backend: %s", self._backend.name)
                for up in self.cfg.uplinks:
                    self._keys[up.name] = load_or_create(self.state_dir, up.name)
            await self.reconcile()
        except NetlinkError as exc:
            await self._shutdown()
            raise NetError(f"netlink: {exc}") from exc
        except BaseException:
            await self._shutdown()
            raise
        for up in self.cfg.uplinks:
            monitor = UplinkMonitor(
                up.name, self.cfg.health, self._probe_plan(up), self._on_health_change
            )
            self._monitors[up.name] = monitor
            monitor.start()
        self._stopping = False
        self._loop_task = asyncio.create_task(self._reconcile_loop(), name="net-reconcile")
        log.info("network: %d uplink(s) managed", len(self.cfg.uplinks))

    async def stop(self) -> None:
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        for monitor in self._monitors.values():
            await monitor.stop()
        await self._shutdown()

    async def _shutdown(self) -> None:
        """Remove our rules, routes, shapers and tunnels; close netlink."""
        try:
            async with self._lock:
                observed = await self._nl.observe(self._tunnel_names())
                await self._nl.apply(teardown(observed))
        except Exception:
            log.exception("network: teardown incomplete")
        if self._backend is not None:
            close = getattr(self._backend, "close", None)
            if close is not None:
                await close()
        self._applied.clear()
        await self._nl.close()

    async def _reconcile_loop(self) -> None:
        # Until stopped, also when a cancellation was swallowed (monitor.py, UplinkMonitor.stop).
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.reconcile_interval_s)
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:  # keep trying: the next round may find the interface back
                log.exception("network: reconcile failed")

    # ------------------------------------------------------------------------ reconcile

    def tunnel_name(self, index: int) -> str:
        return f"{self.cfg.wireguard.interface_prefix}{index}"

    def _tunnel_names(self) -> list[str]:
        if not self.cfg.wireguard.enabled:
            return []
        return [self.tunnel_name(i) for i in range(len(self.cfg.uplinks))]

    async def reconcile(self) -> int:
        """Bring tunnels, rules, routes and shapers to the desired state; return the number
        of changes made (0 when everything already was as desired)."""
        async with self._lock:
            # Order matters (issue 4): a tunnel sends its first handshake as soon as it has a
            # peer and is up. Sent before its fwmark rule and its table exist, it leaves by the
            # main table's line; the remote roams its endpoint there (WireGuard follows the
            # last authenticated source) and answers there, and wireguard-go's sticky source
            # (IP_PKTINFO address + ifindex of the last received packet) then pins all of that
            # tunnel's UDP to that line for good, fwmark or not. So: devices first (keys, port,
            # fwmark, link up, no peers: nothing sent), then routing, then peers.
            changes, pending = await self._reconcile_devices()
            facts = []
            for i, up in enumerate(self.cfg.uplinks):
                source = up.source or next(iter(await self._nl.ipv4_addresses(up.interface)), None)
                gateway = up.gateway
                if gateway == "dhcp":
                    gateway = await self._nl.dhcp_gateway(up.interface)
                self._note_change(self._sources, up.name, source, "source address")
                self._note_change(self._gateways, up.name, gateway, "gateway")
                shaper = None
                if up.shape.enabled:
                    shaper = plan.shaper_for(up.interface, up.shaped_kbps(), up.shape.latency_ms)
                tunnel = self.tunnel_name(i) if self.cfg.wireguard.enabled else None
                facts.append(
                    plan.UplinkFacts(
                        i, up.name, up.interface, source, gateway, shaper, tunnel,
                        up.overlay_address,
                    )
                )  # fmt: skip
            desired = plan.desired_state(
                facts,
                self.cfg.wireguard.overlay_network if self.cfg.wireguard.enabled else None,
                self._overlay_default(),
            )
            observed = await self._nl.observe(self._tunnel_names())
            ops = diff(desired, observed)
            self.last_failures = await self._nl.apply(ops) if ops else 0
            # A tunnel whose table has no default route yet (no address or lease on its line)
            # waits for its peers: its marked UDP would fall through to the main table's line.
            routed = {f.tunnel for f in facts if f.source is not None and f.gateway is not None}
            changes += await self._reconcile_peers([p for p in pending if p[0].ifname in routed])
            return changes + len(ops)

    def _note_change(
        self, seen: dict[str, str | None], name: str, value: str | None, what: str
    ) -> None:
        if name in seen and seen[name] == value:
            return
        if value is None:
            log.warning("uplink %s: no %s yet", name, what)
        elif name in seen:
            log.info("uplink %s: %s is now %s", name, what, value)
        seen[name] = value

    def _overlay_default(self) -> int | None:
        """The uplink whose tunnel carries unbound overlay traffic: the first usable one."""
        if not self.cfg.wireguard.enabled or not self.cfg.uplinks:
            return None
        for i, up in enumerate(self.cfg.uplinks):
            monitor = self._monitors.get(up.name)
            if monitor is None or monitor.state.usable:
                return i
        return 0

    async def _reconcile_devices(self) -> tuple[int, list[tuple[WgUpdate, WgDevice]]]:
        """Devices exist, are up and carry key, port and fwmark; returns the changes made and
        the peer updates still to apply (after routing, see reconcile())."""
        if self._backend is None:
            return 0, []
        if self._registry is not None:
            self._registry.reload_if_changed()
        peers = self._peers()
        changes = 0
        pending: list[tuple[WgUpdate, WgDevice]] = []
        for i, up in enumerate(self.cfg.uplinks):
            ifname = self.tunnel_name(i)
            await self._backend.ensure_device(ifname)
            desired = WgDevice(
                ifname,
                self._keys[up.name].private,
                self.cfg.wireguard.listen_port + i,
                plan.mark_of(i),
                tunnel_peers(peers, i, self.cfg.wireguard.keepalive_s),
            )
            observed = await self._backend.read(ifname)
            update = update_for(desired, observed, self._applied.get(ifname))
            device_part = replace(update, remove=(), upsert=())
            if not device_part.empty:
                await self._backend.apply(device_part)
                changes += 1
            if not await self._nl.is_up(ifname):
                await self._nl.set_up(ifname)
                changes += 1
            pending.append((WgUpdate(ifname, remove=update.remove, upsert=update.upsert), desired))
        return changes, pending

    async def _reconcile_peers(self, pending: list[tuple[WgUpdate, WgDevice]]) -> int:
        """Apply the peer updates of `_reconcile_devices` (routing is in place by now)."""
        changes = 0
        for update, desired in pending:
            if not update.empty:
                assert self._backend is not None
                await self._backend.apply(update)
                changes += 1
                log.info(
                    "tunnel %s: configured (%d peer(s), %d changed, %d removed)",
                    update.ifname, len(desired.peers), len(update.upsert), len(update.remove),
                )  # fmt: skip
            self._applied[update.ifname] = desired
        return changes

    def _registry_peers(self) -> list[Peer]:
        assert self._registry is not None
        return self._registry.peers()

    # ------------------------------------------------------------------------ health

    def _underlay_binding(self, index: int, up: UplinkConfig) -> UplinkBinding | None:
        source = self._sources.get(up.name)
        if source is None:
            return None
        return UplinkBinding(up.name, source, plan.mark_of(index), self.netns)

    def _probe_plan(self, up: UplinkConfig) -> Callable[[], tuple[UplinkBinding, list[str]] | None]:
        index = self.cfg.uplinks.index(up)

        def current() -> tuple[UplinkBinding, list[str]] | None:
            binding = self._underlay_binding(index, up)
            gateway = self._gateways.get(up.name)
            targets = list(self.cfg.health.targets) or ([gateway] if gateway else [])
            return (binding, targets) if binding is not None and targets else None

        return current

    def _on_health_change(self, name: str, old: Health, new: Health) -> None:
        self._wake.set()  # e.g. move unbound overlay traffic off a dead tunnel
        binding = self.binding(name)
        if binding is None:
            return
        change = UplinkChange(name, old, new, binding)
        for callback in list(self._subscribers):
            try:
                callback(change)
            except Exception:
                log.exception("network: subscriber failed on %s", change)

    # ------------------------------------------------------------------------ for others

    def control_routes(self, app: web.Application) -> None:
        """Routes for local tools on the control socket (`dicomesh net status`)."""

        async def status(request: web.Request) -> web.Response:
            return web.Response(
                text=json.dumps(await self.status()) + "\n", content_type="application/x-ndjson"
            )

        app.router.add_post("/net/status", status)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(UplinkChange)` on the loop at every health change; returns the
        function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def binding(self, name: str) -> UplinkBinding | None:
        """How to bind a mesh socket to uplink `name` (overlay address when WireGuard is on);
        None while its address is not known."""
        for i, up in enumerate(self.cfg.uplinks):
            if up.name != name:
                continue
            if self.cfg.wireguard.enabled and up.overlay_address:
                return UplinkBinding(up.name, up.overlay_address, plan.mark_of(i), self.netns)
            return self._underlay_binding(i, up)
        return None

    def health(self, name: str) -> Health:
        monitor = self._monitors.get(name)
        return monitor.state if monitor is not None else Health.UNKNOWN

    def bindings(self, usable_only: bool = True) -> list[UplinkBinding]:
        """The uplinks to spread connections over (usable ones by default), config order."""
        out = []
        for up in self.cfg.uplinks:
            binding = self.binding(up.name)
            if binding is not None and (not usable_only or self.health(up.name).usable):
                out.append(binding)
        return out

    def public_keys(self) -> dict[str, str]:
        """Uplink name -> its tunnel's public key (base64)."""
        return {name: pair.public_b64 for name, pair in self._keys.items()}

    async def status(self) -> dict[str, object]:
        """Everything the admin page shows about the network (no secrets)."""
        uplinks = []
        for i, up in enumerate(self.cfg.uplinks):
            monitor = self._monitors.get(up.name)
            fsm = monitor.fsm if monitor is not None else None
            entry: dict[str, object] = {
                "name": up.name,
                "interface": up.interface,
                "source": self._sources.get(up.name),
                "gateway": self._gateways.get(up.name),
                "table": plan.table_of(i),
                "fwmark": plan.mark_of(i),
                "state": self.health(up.name).value,
                "rtt_ms": round(fsm.last_rtt_s * 1000, 1) if fsm and fsm.last_rtt_s else None,
                "loss": round(fsm.loss, 3) if fsm else None,
                "up_kbps": up.up_kbps,
                "down_kbps": up.down_kbps,
                "shaped_kbps": up.shaped_kbps() if up.shape.enabled else None,
            }
            if self._backend is not None:
                ifname = self.tunnel_name(i)
                try:
                    peers = await self._backend.stats(ifname)
                except (OSError, NetError, TimeoutError):
                    peers = []
                entry["tunnel"] = {
                    "interface": ifname,
                    "public_key": self._keys[up.name].public_b64,
                    "listen_port": self.cfg.wireguard.listen_port + i,
                    "overlay_address": up.overlay_address,
                    "peers": len(peers),
                    "peers_with_handshake": sum(1 for p in peers if p["last_handshake"]),
                }
            uplinks.append(entry)
        return {
            "routing": True,
            "wireguard": {
                "enabled": self.cfg.wireguard.enabled,
                "backend": self._backend.name if self._backend else None,
            },
            "uplinks": uplinks,
        }
