"""WireGuard in the kernel: links of kind "wireguard" configured through pyroute2's generic
netlink `WireGuard` (real Pi/x86 Debian kernels).

Not exercised by the lab on machines without the module (see LAB.md): there the family
probe fails and `auto` picks wireguard-go. The sync pyroute2 calls run in the executor.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from appliance.net.errors import NetError
from appliance.net.wireguard import WgDevice, WgPeer, WgUpdate

log = logging.getLogger(__name__)
T = TypeVar("T")


def kernel_available() -> bool:
    """Whether the kernel has the WireGuard generic netlink family (asking for it also
    loads the module where one is installed)."""
    try:
        WireGuard().close()
    except (NetlinkError, OSError):
        return False
    return True


def _raw_key(value: Any) -> bytes:
    """A key attribute as pyroute2 decodes it (base64 text/bytes or a dict) -> 32 bytes."""
    if isinstance(value, dict):
        value = value.get("key") or value.get("value")
    if isinstance(value, str):
        value = value.encode()
    return value if len(value) == 32 else base64.b64decode(value)


class KernelBackend:
    """Kernel WireGuard devices in this process's namespace."""

    name = "kernel"

    def __init__(self) -> None:
        self._ours: set[str] = set()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def ensure_device(self, ifname: str) -> None:
        def create() -> None:
            with IPRoute() as ipr:
                try:
                    ipr.link("add", ifname=ifname, kind="wireguard")
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise NetError(f"cannot create {ifname}: {exc}") from None

        await self._run(create)
        self._ours.add(ifname)

    async def read(self, ifname: str) -> WgDevice:
        def info() -> list[Any]:
            with WireGuard() as wg:
                return list(wg.info(ifname))

        private, port, mark, peers = b"\0" * 32, 0, 0, []
        for msg in await self._run(info):  # large peer lists come in several messages
            if (key := msg.get("WGDEVICE_A_PRIVATE_KEY")) is not None:
                private = _raw_key(key)
            port = msg.get("WGDEVICE_A_LISTEN_PORT") or port
            mark = msg.get("WGDEVICE_A_FWMARK") or mark
            for p in msg.get("WGDEVICE_A_PEERS") or []:
                endpoint = p.get("WGPEER_A_ENDPOINT")
                allowed = tuple(sorted(a["addr"] for a in p.get("WGPEER_A_ALLOWEDIPS") or []))
                peers.append(
                    WgPeer(
                        _raw_key(p.get("WGPEER_A_PUBLIC_KEY")),
                        allowed,
                        f"{endpoint['addr']}:{endpoint['port']}" if endpoint else None,
                        p.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
                    )
                )
        return WgDevice(
            ifname, private, port, mark, tuple(sorted(peers, key=lambda p: p.public_key))
        )

    async def apply(self, update: WgUpdate) -> None:
        if update.empty:
            return

        def configure() -> None:
            with WireGuard() as wg:
                wg.set(
                    update.ifname,
                    listen_port=update.listen_port,
                    fwmark=update.fwmark,
                    private_key=(
                        base64.b64encode(update.private_key).decode()
                        if update.private_key is not None
                        else None
                    ),
                )
                for key in update.remove:
                    wg.set(
                        update.ifname,
                        peer={"public_key": base64.b64encode(key).decode(), "remove": True},
                    )
                for peer in update.upsert:
                    spec: dict[str, Any] = {
                        "public_key": base64.b64encode(peer.public_key).decode(),
                        "persistent_keepalive": peer.keepalive_s,
                        "replace_allowed_ips": True,
                        "allowed_ips": list(peer.allowed_ips),
                    }
                    if peer.endpoint:
                        host, _, port = peer.endpoint.rpartition(":")
                        spec.update(endpoint_addr=host, endpoint_port=int(port))
                    wg.set(update.ifname, peer=spec)

        await self._run(configure)

    async def stats(self, ifname: str) -> list[dict[str, object]]:
        def info() -> list[Any]:
            with WireGuard() as wg:
                return list(wg.info(ifname))

        out: list[dict[str, object]] = []
        for msg in await self._run(info):
            for p in msg.get("WGDEVICE_A_PEERS") or []:
                shake = p.get("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                endpoint = p.get("WGPEER_A_ENDPOINT")
                out.append(
                    {
                        "public_key": base64.b64encode(
                            _raw_key(p.get("WGPEER_A_PUBLIC_KEY"))
                        ).decode(),
                        "endpoint": f"{endpoint['addr']}:{endpoint['port']}" if endpoint else None,
                        "last_handshake": shake.get("tv_sec", 0) if isinstance(shake, dict) else 0,
                        "rx_bytes": p.get("WGPEER_A_RX_BYTES") or 0,
                        "tx_bytes": p.get("WGPEER_A_TX_BYTES") or 0,
                    }
                )
        return out

    async def remove_device(self, ifname: str) -> None:
        if ifname not in self._ours:
            return

        def delete() -> None:
            with IPRoute() as ipr:
                try:
                    ipr.link("del", ifname=ifname)
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise

        await self._run(delete)
        self._ours.discard(ifname)

    async def close(self) -> None:
        for ifname in list(self._ours):
            await self.remove_device(ifname)
