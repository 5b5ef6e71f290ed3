"""WireGuard tunnels, the pure part: what each uplink's device should hold, and the update
that brings a device there. Backends (wg_kernel.py, wg_userspace.py) only apply updates.

Tunnel plan: uplink i has interface `<prefix><i>` with its own key, UDP port
`listen_port + i` and fwmark `mark_of(i)` (so its UDP leaves through uplink i's table). A
registry peer with keys K0..Kn-1 (`public_key` then `tunnel_keys`) has one tunnel per key:
tunnel j is reached at `endpoints[j]` and owns overlay address `addresses[j]` (allowed-ips
exactly that /32: cryptokey routing makes a source address prove its key). A peer with one
key owns all its addresses on it; several endpoints then spread our uplinks over them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

from appliance.mesh.peers import Peer

DEFAULT_WG_PORT = 51820


@dataclass(frozen=True)
class WgPeer:
    """One remote tunnel as a WireGuard peer entry."""

    public_key: bytes  # 32 raw bytes
    allowed_ips: tuple[str, ...]  # "a.b.c.d/32", sorted
    endpoint: str | None = None  # "host:port"
    keepalive_s: int = 0


@dataclass(frozen=True)
class WgDevice:
    """A device's configuration (desired, or as read back)."""

    ifname: str
    private_key: bytes = field(repr=False)
    listen_port: int
    fwmark: int
    peers: tuple[WgPeer, ...] = ()  # sorted by public key


@dataclass(frozen=True)
class WgUpdate:
    """What to change on a device; None/empty fields are left as they are."""

    ifname: str
    private_key: bytes | None = field(default=None, repr=False)
    listen_port: int | None = None
    fwmark: int | None = None
    remove: tuple[bytes, ...] = ()  # public keys
    upsert: tuple[WgPeer, ...] = ()  # set endpoint (if any), keepalive, replace allowed-ips

    @property
    def empty(self) -> bool:
        return (
            self.private_key is None
            and self.listen_port is None
            and self.fwmark is None
            and not self.remove
            and not self.upsert
        )


def _endpoint(text: str) -> str:
    return text if ":" in text else f"{text}:{DEFAULT_WG_PORT}"


def tunnel_peers(peers: list[Peer], uplink_index: int, keepalive_s: int) -> tuple[WgPeer, ...]:
    """The WireGuard peers of our uplink `uplink_index`'s device, from the registry."""
    import base64

    out: list[WgPeer] = []
    for peer in peers:
        keys = [peer.public_key, *peer.tunnel_keys]
        endpoints = [_endpoint(e) for e in peer.endpoints]
        addresses = [str(ipaddress.ip_address(a)) for a in peer.addresses]
        if len(keys) == 1:
            tunnels = [
                (
                    keys[0],
                    addresses,
                    endpoints[uplink_index % len(endpoints)] if endpoints else None,
                )
            ]
        else:
            tunnels = [
                (key, [addresses[j]], endpoints[j] if j < len(endpoints) else None)
                for j, key in enumerate(keys)
            ]
        for key, owned, endpoint in tunnels:
            allowed = tuple(sorted(f"{a}/32" for a in owned if ":" not in a))
            out.append(WgPeer(base64.b64decode(key), allowed, endpoint, keepalive_s))
    return tuple(sorted(out, key=lambda p: p.public_key))


def update_for(desired: WgDevice, observed: WgDevice, previous: WgDevice | None) -> WgUpdate:
    """The update turning `observed` into `desired`.

    Endpoints are compared with what we asked for last time (`previous`), not with what the
    device reports: WireGuard follows a peer that roams (NAT rebinding), and re-setting the
    configured endpoint on every reconcile would undo that.
    """
    have = {p.public_key: p for p in observed.peers}
    asked = {p.public_key: p for p in previous.peers} if previous else {}
    upsert = []
    for peer in desired.peers:
        current = have.get(peer.public_key)
        changed_endpoint = peer.endpoint != (
            asked[peer.public_key].endpoint if peer.public_key in asked else None
        )
        if (
            current is None
            or current.allowed_ips != peer.allowed_ips
            or current.keepalive_s != peer.keepalive_s
            or (peer.endpoint is not None and (current.endpoint is None or changed_endpoint))
        ):
            upsert.append(peer)
    wanted = {p.public_key for p in desired.peers}
    return WgUpdate(
        desired.ifname,
        private_key=desired.private_key if desired.private_key != observed.private_key else None,
        listen_port=desired.listen_port if desired.listen_port != observed.listen_port else None,
        fwmark=desired.fwmark if desired.fwmark != observed.fwmark else None,
        remove=tuple(sorted(k for k in have if k not in wanted)),
        upsert=tuple(upsert),
    )


class WgBackend(Protocol):
    """Creates, configures and removes WireGuard devices (kernel module or wireguard-go)."""

    name: str

    async def ensure_device(self, ifname: str) -> None:
        """The device exists (created if needed; its link may still be down)."""

    async def read(self, ifname: str) -> WgDevice:
        """The device's current configuration."""

    async def apply(self, update: WgUpdate) -> None:
        """Apply `update` to its device."""

    async def stats(self, ifname: str) -> list[dict[str, object]]:
        """Per peer: public key (base64), endpoint, last handshake (unix s), rx/tx bytes."""

    async def remove_device(self, ifname: str) -> None:
        """The device is gone (only devices this gateway runs are ever passed here)."""
