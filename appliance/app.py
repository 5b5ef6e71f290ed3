"""Lifecycle: build every subsystem from the config, start them in order, stop them in
reverse. The only module that knows all subsystems.

Loop/thread map: the asyncio loop (uvloop) runs the lifecycle and the systemd watchdog; the
DICOM node runs in pynetdicom's threads; the store writes on its own writer thread. Blocking
start/stop steps run in the default executor so the loop never blocks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import uvloop

from appliance import __version__
from appliance.config import Config
from appliance.control import ControlServer
from appliance.dicom.scp import DicomNodeServer
from appliance.mesh.node import MeshNode
from appliance.mesh.remote import RemoteReader
from appliance.mesh.swarm.download import DownloadState
from appliance.sdnotify import Notifier
from appliance.store import Store, StoreError

log = logging.getLogger(__name__)

_CAP_NET_ADMIN = 12  # linux/capability.h


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

    def __init__(self, mesh: MeshNode, list_remote: bool) -> None:
        self._mesh = mesh
        self.list_remote = list_remote

    def remote_reader(self) -> RemoteReader:
        return RemoteReader(self._mesh.catalog)

    def fetch(self, study_uid: str) -> DownloadState:
        return self._mesh.fetch_threadsafe(study_uid)


class Gateway:
    """The running gateway: store, mesh and DICOM node (network and web join later)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.store: Store | None = None
        self.mesh: MeshNode | None = None
        self.control: ControlServer | None = None
        self.dicom: DicomNodeServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        state = Path(self.cfg.state_dir)
        state.mkdir(mode=0o750, parents=True, exist_ok=True)
        if not has_net_admin():
            log.info(
                "no CAP_NET_ADMIN (not root): WireGuard and uplink policy routing stay off; "
                "the DICOM node and the store run"
            )
        self.store = await loop.run_in_executor(None, Store, self.cfg.store, state / "store")
        self.control = ControlServer(state)
        access = None
        if self.cfg.mesh.enabled:
            self.mesh = MeshNode(self.cfg.mesh, state, self.store)
            await self.mesh.start()
            self.control.add_routes(self.mesh.control_routes)
            access = _DicomMeshAccess(self.mesh, self.cfg.mesh.list_remote_studies)
        await self.control.start()
        self.dicom = DicomNodeServer(self.cfg.dicom, self.store, access)
        await loop.run_in_executor(None, self.dicom.start)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self.dicom is not None:
            await loop.run_in_executor(None, self.dicom.stop)
            self.dicom = None
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.mesh is not None:
            await self.mesh.stop()
            self.mesh = None
        if self.store is not None:
            await loop.run_in_executor(None, self.store.close)
            self.store = None

    async def healthy(self, timeout: float) -> bool:
        """The store writer commits within `timeout` (a stuck disk or thread fails this)."""
        if self.store is None:
            return False
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.store.ping, timeout)


async def serve(cfg: Config, notifier: Notifier | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    notifier = notifier or Notifier.from_env()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(cfg)
    try:
        await gateway.start()
    except (OSError, StoreError) as exc:
        log.error("cannot start: %s", exc)
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
    notifier.ready(f"DICOM {cfg.dicom.ae_title.strip()} on {where}")
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


def run(cfg: Config) -> int:
    return uvloop.run(serve(cfg))
