"""Lifecycle: build every subsystem from the config, start them in order, stop them in
reverse. The only module that knows all subsystems.

Loop/thread map: the asyncio loop (uvloop) runs the lifecycle and the systemd watchdog; the
DICOM node runs in pynetdicom's threads; the store writes on its own writer thread. Blocking
start/stop steps run in the default executor so the loop never blocks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import time
from pathlib import Path

import aiohttp
import uvloop

from appliance import __version__
from appliance.central.broker import CentralBroker
from appliance.central.relay import CentralRelay
from appliance.central.scu import CentralSCU
from appliance.config import Config
from appliance.control import ControlServer
from appliance.dicom.scp import DicomNodeServer
from appliance.evict.control import evict_routes
from appliance.evict.evictor import Evictor
from appliance.firmware.board import Hardware
from appliance.firmware.led import Event as LedEvent
from appliance.firmware.led import StatusLed
from appliance.firmware.share import UpdatePuller, serve_routes
from appliance.forward.control import forward_routes
from appliance.forward.forwarder import Forwarder
from appliance.forward.push import MeshLink, PushReceiver, central_node, mesh_destinations
from appliance.forward.sender import DicomDestination, dicom_destinations
from appliance.mesh.node import MeshNode
from appliance.mesh.peers import PEERS_FILE, PeerRegistry
from appliance.mesh.remote import RemoteReader
from appliance.mesh.swarm.download import DownloadState
from appliance.mesh.uplinks import MeshNetwork
from appliance.net.binding import UplinkBinding, tcp_connector
from appliance.net.errors import NetError
from appliance.net.health import Health
from appliance.net.manager import NetworkManager
from appliance.qos.probe import ProbeResponder
from appliance.sdnotify import Notifier
from appliance.store import Store, StoreError
from appliance.web.server import WebServer

log = logging.getLogger(__name__)

_CAP_NET_ADMIN = 12  # linux/capability.h
# Without --config, settings changed on the admin page go here and are loaded at start.
CONFIG_IN_STATE_DIR = "dicomesh.toml"


def has_net_admin() -> bool:
    """Whether this process may change routes, rules and interfaces (CAP_NET_ADMIN)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


class _DicomMeshAccess:
    """The mesh as the DICOM node sees it (appliance.dicom.sources.MeshAccess)."""

    def __init__(
        self, mesh: MeshNode, list_remote: bool, central: CentralRelay | None = None
    ) -> None:
        self._mesh = mesh
        self.list_remote = list_remote
        self.central = central  # appliance.dicom.sources.CentralAccess

    def remote_reader(self) -> RemoteReader:
        return RemoteReader(self._mesh.catalog)

    def fetch(self, study_uid: str) -> DownloadState:
        return self._mesh.fetch_threadsafe(study_uid)


class Gateway:
    """The running gateway: store, mesh, DICOM node, network, QoS probe and admin page."""

    def __init__(
        self, cfg: Config, config_path: Path | None = None, hardware: Hardware | None = None
    ) -> None:
        self.cfg = cfg
        self.hardware = hardware  # the board (its LAN NIC is "lan" in web.listen)
        # Where the admin page writes settings: the --config file, else the state dir's.
        self.config_path = config_path or Path(cfg.state_dir) / CONFIG_IN_STATE_DIR
        self.started_at = time.time()
        self.web: WebServer | None = None
        self.store: Store | None = None
        self.mesh: MeshNode | None = None
        self.control: ControlServer | None = None
        self.dicom: DicomNodeServer | None = None
        self.probe: ProbeResponder | None = None
        self.net: NetworkManager | None = None
        self.forwarder: Forwarder | None = None
        self.evictor: Evictor | None = None
        self.central: CentralRelay | None = None
        self.broker: CentralBroker | None = None
        self.push: PushReceiver | None = None  # peers pushing studies here
        self.updates: UpdatePuller | None = None  # pulls update bundles from peers

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        state = Path(self.cfg.state_dir)
        state.mkdir(mode=0o750, parents=True, exist_ok=True)
        if self.cfg.web.enabled:
            lan = self.hardware.lan if self.hardware is not None else None
            # Early: its log buffer sees start-up.
            self.web = WebServer(self.cfg.web, self, lan_nic=lan.name if lan else None)
        if not has_net_admin():
            log.info(
                "no CAP_NET_ADMIN (not root): WireGuard and uplink policy routing stay off; "
                "the DICOM node and the store run"
            )
        elif self.cfg.net.uplinks:
            self.net = await _start_network(self.cfg, state)
        self.store = await loop.run_in_executor(None, Store, self.cfg.store, state / "store")
        # Before the DICOM node: its jobs are written in each stored instance's commit.
        self.forwarder = Forwarder(self.store, self.cfg.forward, dicom_destinations(self.cfg.dicom))
        self.forwarder.attach()
        self.control = ControlServer(state)
        self.control.add_routes(forward_routes(self.forwarder))
        if self.net is not None:
            self.control.add_routes(self.net.control_routes)
        access = None
        if self.cfg.mesh.enabled:
            network = mesh_network(self.cfg, self.net) if self.net is not None else None
            self.mesh = MeshNode(self.cfg.mesh, state, self.store, network)
            self.central, self.broker = _build_central(self.cfg, self.mesh, self.store)
            self.push = _build_push(self.cfg, self.mesh, self.store, self.forwarder)
            self.mesh.add_routes(serve_routes(state))  # its installed bundle, to peers
            await self.mesh.start()
            self.control.add_routes(self.mesh.control_routes)
            self.updates = UpdatePuller(state, self.cfg.web.update_key, self.mesh, __version__)
            self.control.add_routes(self.updates.control_routes)
            access = _DicomMeshAccess(self.mesh, self.cfg.mesh.list_remote_studies, self.central)
        if self.cfg.qos.enabled:
            self.probe = await _start_probe(self.cfg, state, self.mesh)
        # After the mesh: an eviction is announced in its catalog.
        self.evictor = Evictor(
            self.cfg.evict,
            self.store,
            self.mesh.catalog if self.mesh is not None else None,
            # What a replica's central PACS sent it is held there.
            central_aes=[self.cfg.central.ae_title] if self.broker is not None else (),
        )
        await self.evictor.start()
        self.control.add_routes(evict_routes(self.evictor))
        await self.control.start()
        # After the mesh: jobs to peers and the central PACS go over it.
        await loop.run_in_executor(None, self.forwarder.start)
        self.dicom = DicomNodeServer(self.cfg.dicom, self.store, access)
        await loop.run_in_executor(None, self.dicom.start)
        if self.web is not None:
            await self.web.start()

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self.web is not None:
            await self.web.stop()
            self.web = None
        if self.dicom is not None:
            await loop.run_in_executor(None, self.dicom.stop)
            self.dicom = None
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.updates is not None:
            await self.updates.stop()
            self.updates = None
        if self.evictor is not None:
            await self.evictor.stop()
            self.evictor = None
        if self.forwarder is not None:
            await loop.run_in_executor(None, self.forwarder.stop)
            self.forwarder = None
        if self.push is not None:
            await self.push.stop()
            self.push = None
        if self.probe is not None:
            await self.probe.stop()
            self.probe = None
        if self.central is not None:
            await self.central.stop()
            self.central = None
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None
        if self.mesh is not None:
            await self.mesh.stop()
            self.mesh = None
        if self.net is not None:
            await self.net.stop()
            self.net = None
        if self.store is not None:
            await loop.run_in_executor(None, self.store.close)
            self.store = None

    async def healthy(self, timeout: float) -> bool:
        """The store writer commits within `timeout` (a stuck disk or thread fails this)."""
        if self.store is None:
            return False
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.store.ping, timeout)


async def _start_probe(cfg: Config, state: Path, mesh: MeshNode | None) -> ProbeResponder | None:
    """The QoS probe responder for the peers the mesh admits (it reloads the registry; without
    the mesh the responder does). Optional: a busy port leaves it off with an error line."""
    if mesh is not None:
        probe = ProbeResponder(cfg.qos, [cfg.mesh.address, *cfg.qos.lan_addresses], mesh.registry)
    else:
        registry = PeerRegistry(state / PEERS_FILE)
        probe = ProbeResponder(
            cfg.qos, [cfg.mesh.address, *cfg.qos.lan_addresses], registry,
            refresh=registry.reload_if_changed,
        )  # fmt: skip
    try:
        await probe.start()
    except OSError as exc:
        log.error("qos probe responder off: port %d: %s", cfg.qos.probe_port, exc)
        return None
    return probe


def _build_push(cfg: Config, mesh: MeshNode, store: Store, forwarder: Forwarder) -> PushReceiver:
    """Forwarding over the mesh: the route where peers push studies here (and, on gateways
    talking to the central PACS, into it), and the "peer:NAME"/"central" destinations."""
    direct = cfg.central.talks_directly(cfg.mesh.role)
    node = central_node(cfg.central) if direct else None
    receiver = PushReceiver(cfg.forward, mesh, store, cfg.dicom, node)
    mesh.add_routes(receiver.routes)
    central = DicomDestination(node, cfg.dicom) if node is not None else None
    forwarder.set_mesh_destinations(
        mesh_destinations(MeshLink(mesh), cfg.forward, cfg.central, central, forwarder.stopping)
    )
    return receiver


def _build_central(
    cfg: Config, mesh: MeshNode, store: Store
) -> tuple[CentralRelay | None, CentralBroker | None]:
    """With [central] on: the relay every gateway uses, and on gateways whose role talks to
    the central PACS, the broker (its mesh routes are added before the mesh starts)."""
    if not cfg.central.enabled:
        return None, None
    broker = None
    if cfg.central.talks_directly(cfg.mesh.role):
        scu = CentralSCU(
            cfg.central,
            cfg.dicom.ae_title,
            cfg.central.move_destination or cfg.dicom.ae_title,
        )
        broker = CentralBroker(scu, store, mesh.catalog, cfg.central.origin(cfg.mesh.name))
        mesh.add_routes(broker.routes)
    relay = CentralRelay(cfg.central, mesh, store, broker)
    mesh.central_fetch = relay.fetch
    if broker is not None:
        # Its share in, a replica swarms the rest from the other replicas over their LAN.
        broker.on_share_done = relay.fetch
        # Instances in (the first one first), a replica announces its holding at once: the
        # clinic swarms what is announced, and the publisher's debounce would add a second.
        broker.on_arrived = lambda study: mesh.publish({study})
    return relay, broker


def mesh_network(cfg: Config, net: NetworkManager) -> MeshNetwork:
    """The network as the mesh uses it: swarm paths per (peer, usable uplink), each path's
    connections bound to its uplink; with WireGuard, the mesh server on the tunnels' overlay
    addresses and loopback only, refusing sources outside the overlay."""
    wg = cfg.net.wireguard
    listen: tuple[str, ...] = ()
    overlay = None
    if wg.enabled:
        overlay = wg.overlay_network
        addresses = [up.overlay_address for up in cfg.net.uplinks if up.overlay_address]
        if cfg.mesh.address not in addresses:
            if ipaddress.ip_address(cfg.mesh.address) in ipaddress.ip_network(overlay):
                addresses.append(cfg.mesh.address)
            else:
                log.warning(
                    "mesh.address %s is outside the overlay %s: the mesh does not listen on "
                    "it with WireGuard on", cfg.mesh.address, overlay,
                )  # fmt: skip
        listen = (*addresses, "127.0.0.1")

    def connector(binding: UplinkBinding, limit: int) -> aiohttp.BaseConnector:
        return tcp_connector(binding, limit=limit)

    return MeshNetwork(net, connector, listen, overlay)


async def _start_network(cfg: Config, state: Path) -> NetworkManager | None:
    """Uplink routing, health and tunnels. A failure leaves them off with an error line: the
    DICOM node must keep accepting studies whatever the lines do."""
    net = NetworkManager(cfg.net, state)
    try:
        await net.start()
    except (NetError, OSError) as exc:
        log.error("network setup failed, uplink routing and tunnels stay off: %s", exc)
        return None
    return net


async def serve(
    cfg: Config,
    notifier: Notifier | None = None,
    config_path: Path | None = None,
    hardware: Hardware | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    notifier = notifier or Notifier.from_env()
    led = StatusLed(hardware.led if hardware is not None else None)  # booting
    if hardware is not None:
        log.info(
            "board: %s (%s); its defaults under the config: %s",
            hardware.profile.name if hardware.profile else "no profile",
            hardware.identified_by,
            ", ".join(_dotted(hardware.config_defaults())) or "none",
        )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(cfg, config_path, hardware)
    try:
        await gateway.start()
    except (OSError, StoreError) as exc:
        log.error("cannot start: %s", exc)
        led.on(LedEvent.FATAL)
        await gateway.stop()
        return 1
    assert gateway.dicom is not None
    where = f"{cfg.dicom.listen}:{gateway.dicom.port}"
    log.info(
        "dicomesh %s ready: DICOM node %s on %s, state in %s",
        __version__,
        cfg.dicom.ae_title.strip(),
        where,
        Path(cfg.state_dir).resolve(),
    )
    led.on(LedEvent.READY)  # before READY=1: whoever waits for it sees the LED already on
    notifier.ready(f"DICOM {cfg.dicom.ae_title.strip()} on {where}")
    if gateway.net is not None:
        gateway.net.subscribe(lambda _change: _show_uplinks(led, gateway.net))
        _show_uplinks(led, gateway.net)
    watchdog = None
    if notifier.watchdog_interval:
        watchdog = asyncio.create_task(_watchdog(gateway, notifier, notifier.watchdog_interval))
    await stop.wait()
    log.info("stopping")
    notifier.stopping()
    if watchdog is not None:
        watchdog.cancel()
    await gateway.stop()
    log.info("stopped")
    return 0


def _dotted(table: dict, prefix: str = "") -> list[str]:
    """Nested tables as sorted "a.b=value" items (for one log line)."""
    out: list[str] = []
    for key, value in sorted(table.items()):
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def _show_uplinks(led: StatusLed, net: NetworkManager | None) -> None:
    """Slow blink while any uplink is down or degraded; heartbeat when all are up again."""
    if net is None:
        return
    healths = [net.health(up.name) for up in net.cfg.uplinks]
    bad = any(h in (Health.DOWN, Health.DEGRADED) for h in healths)
    led.on(LedEvent.UPLINK_DEGRADED if bad else LedEvent.UPLINKS_OK)


async def _watchdog(gateway: Gateway, notifier: Notifier, interval: float) -> None:
    """Ping systemd at half the interval, only while the loop and the store writer respond:
    a stuck loop or writer stops the pings and systemd restarts the service."""
    while True:
        await asyncio.sleep(interval / 2)
        if await gateway.healthy(timeout=interval / 4):
            notifier.watchdog()
        else:
            log.error(
                "store writer did not commit within %.1f s; withholding watchdog", interval / 4
            )


def run(cfg: Config, config_path: Path | None = None, hardware: Hardware | None = None) -> int:
    return uvloop.run(serve(cfg, config_path=config_path, hardware=hardware))
