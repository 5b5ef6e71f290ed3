"""zeroconf (mDNS/DNS-SD, RFC 6762/6763) on the LAN: advertise this gateway, find others.

Advertised:
- `_dicom._tcp`: the DICOM node (PS3.15 Annex H.2 service name "dicom"); instance name =
  AE title. TXT (`dicom_txt`): the Annex H.2 keys `AET` (the AE title; a reader defaults it
  to the instance name, which mDNS may have renamed "AE (2)") and `PrimaryDeviceType`
  (ARCHIVE: CID 30 "DICOM Devices", as in the LDAP dicomPrimaryDeviceType); the keys OsiriX
  and Horos read, `AETitle`, `serverDescription` and `CGET=YES` (we are a C-GET SCP, so a
  viewer can retrieve without a C-MOVE destination entry); and `txtvers=1` (RFC 6763 6.7).
- `_http._tcp`: the admin page (TXT `path=/`, RFC 6763 / dns-sd.org convention).
- `_dicomesh._tcp`: this gateway as a mesh candidate: name, role, overlay address, mesh
  port, WireGuard public key(s). Only public facts: admission stays an administrator's act.

Browsed: `_dicomesh._tcp`, kept as candidates to admit (bounded, own name excluded).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from appliance import __version__

log = logging.getLogger(__name__)

DICOM_TYPE = "_dicom._tcp.local."
HTTP_TYPE = "_http._tcp.local."
MESH_TYPE = "_dicomesh._tcp.local."
MAX_CANDIDATES = 256  # others on the LAN control what we store: bounded
RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class Advert:
    """What this gateway says about itself."""

    ae_title: str
    dicom_port: int
    web_port: int
    mesh_name: str
    mesh_role: str
    mesh_address: str
    mesh_port: int
    public_keys: tuple[str, ...] = ()


@dataclass
class Candidate:
    """A dicomesh gateway seen on the LAN."""

    name: str
    role: str
    overlay_address: str
    mesh_port: int
    public_keys: list[str]
    lan_addresses: list[str]
    version: str
    seen_at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _txt(info: AsyncServiceInfo, key: str) -> str:
    value = info.properties.get(key.encode())
    return value.decode(errors="replace") if isinstance(value, bytes) else ""


def dicom_txt(advert: Advert) -> dict[str, str]:
    """The `_dicom._tcp` TXT record (see the module docstring for each key's source)."""
    ae = advert.ae_title.strip()
    return {
        "txtvers": "1",
        "AET": ae,
        "PrimaryDeviceType": "ARCHIVE",
        "AETitle": ae,
        "serverDescription": f"dicomesh {advert.mesh_name}",
        "CGET": "YES",
    }


def service_infos(advert: Advert, addresses: list[str]) -> list[AsyncServiceInfo]:
    """The three records we register (addresses: where we are reachable on the LAN)."""
    packed = [socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a)
              for a in addresses]  # fmt: skip
    host = f"dicomesh-{advert.mesh_name}.local."
    ae = advert.ae_title.strip()
    return [
        AsyncServiceInfo(
            DICOM_TYPE, f"{ae}.{DICOM_TYPE}", port=advert.dicom_port, server=host,
            addresses=packed,
            properties=dicom_txt(advert),
        ),
        AsyncServiceInfo(
            HTTP_TYPE, f"dicomesh {advert.mesh_name}.{HTTP_TYPE}", port=advert.web_port,
            server=host, addresses=packed, properties={"path": "/"},
        ),
        AsyncServiceInfo(
            MESH_TYPE, f"{advert.mesh_name}.{MESH_TYPE}", port=advert.mesh_port, server=host,
            addresses=packed,
            properties={"txtvers": "1", "name": advert.mesh_name, "role": advert.mesh_role,
                        "address": advert.mesh_address, "port": str(advert.mesh_port),
                        "keys": ",".join(advert.public_keys), "version": __version__},
        ),
    ]  # fmt: skip


class Discovery:
    """Registers our services and keeps the gateways seen on the LAN."""

    def __init__(self, advert: Advert, addresses: list[str]) -> None:
        self.advert = advert
        self.addresses = addresses
        self.candidates: OrderedDict[str, Candidate] = OrderedDict()
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._infos: list[AsyncServiceInfo] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=self.addresses, ip_version=IPVersion.All)
        self._infos = service_infos(self.advert, self.addresses)
        for info in self._infos:
            # Two boxes may share an AE title or name: mDNS renames ours ("... (2)").
            await self._zc.async_register_service(info, allow_name_change=True)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, MESH_TYPE, handlers=[self._on_change]
        )
        log.info("zeroconf: advertising %s (DICOM, page, mesh) on %s",
                 self.advert.ae_title.strip(), ", ".join(self.addresses))  # fmt: skip

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            await self._zc.async_unregister_all_services()
            await self._zc.async_close()
            self._zc = None

    async def update_ae(self, ae_title: str) -> None:
        """The AE title changed: re-announce the DICOM service under its new name."""
        if self._zc is None or ae_title.strip() == self.advert.ae_title.strip():
            return
        old = self._infos[0]
        self.advert = dataclasses.replace(self.advert, ae_title=ae_title)
        new = service_infos(self.advert, self.addresses)[0]
        await self._zc.async_unregister_service(old)
        await self._zc.async_register_service(new, allow_name_change=True)
        self._infos[0] = new

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self.candidates.pop(name, None)
            return
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            return
        gateway = _txt(info, "name")
        if not gateway or gateway == self.advert.mesh_name:
            return
        try:
            mesh_port = int(_txt(info, "port") or info.port or 0)
        except ValueError:
            mesh_port = 0
        candidate = Candidate(
            name=gateway[:64],
            role=_txt(info, "role")[:16],
            overlay_address=_txt(info, "address")[:64],
            mesh_port=mesh_port,
            public_keys=[k for k in _txt(info, "keys").split(",") if k][:8],
            lan_addresses=info.parsed_scoped_addresses()[:8],
            version=_txt(info, "version")[:32],
            seen_at=time.time(),
        )
        self.candidates.pop(name, None)
        self.candidates[name] = candidate
        while len(self.candidates) > MAX_CANDIDATES:
            self.candidates.popitem(last=False)
        log.debug("zeroconf: gateway %s seen", candidate.name)

    def seen(self) -> list[Candidate]:
        return list(self.candidates.values())
