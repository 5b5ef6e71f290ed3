"""The peer registry: which gateways are admitted, by name, key, overlay addresses and role.

Kept in `state_dir/peers.toml` (human-readable, auditable, edited by `dicomesh peer ...`
with a lock and an atomic replace); the running gateway reloads it when it changes, so an
admission or revocation takes effect within seconds without a restart. A request's *source
address* maps to a peer: nothing the request says about itself is trusted (over WireGuard,
cryptokey routing makes the source address an identity).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from appliance.fileutil import atomic_write, locked
from appliance.mesh.config import peer_name
from appliance.schema import (
    ConfigError,
    dump,
    hostname_or_ip,
    ip_address,
    load,
    port_range,
    setting,
)

log = logging.getLogger(__name__)

PEERS_FILE = "peers.toml"


def wireguard_key(value: str) -> str | None:
    """A WireGuard public key: 32 bytes, standard base64 (44 characters)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    return None if len(raw) == 32 else "must be a WireGuard public key (32 bytes, base64)"


def underlay_endpoint(value: str) -> str | None:
    """A tunnel endpoint: "host:port" (IPv4 or hostname; IPv6 as "[addr]:port")."""
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host and port.isdigit() and 1 <= int(port) <= 65535 and hostname_or_ip(host) is None:
        return None
    return 'must be "host:port" (the WireGuard UDP endpoint of one of its uplinks)'


@dataclass(frozen=True)
class Peer:
    """An admitted gateway."""

    name: str = setting(check=peer_name, doc="unique gateway name")
    public_key: str = setting(check=wireguard_key, doc="its WireGuard public key")
    addresses: list[str] = setting(check=ip_address, doc="its overlay address(es)")
    role: Literal["clinic", "replica"] = setting("clinic", doc="clinic or replica")
    port: int = setting(7480, check=port_range, doc="its mesh HTTP port")
    # One WireGuard tunnel per uplink of the peer: tunnel j has key ([public_key] +
    # tunnel_keys)[j], overlay address addresses[j] and endpoint endpoints[j].
    tunnel_keys: list[str] = setting(
        default_factory=list, check=wireguard_key, doc="keys of its further uplink tunnels"
    )
    endpoints: list[str] = setting(
        default_factory=list,
        check=underlay_endpoint,
        doc="its WireGuard endpoints, host:port, one per uplink",
    )
    # Remote administration: only admin peers may open this gateway's admin page over the
    # overlay (the page still asks for the password).
    admin: bool = setting(False, doc="may reach the admin page over the overlay")

    @property
    def public_keys(self) -> list[str]:
        """All its tunnel keys, first uplink's first."""
        return [self.public_key, *self.tunnel_keys]

    @property
    def url(self) -> str:
        host = self.addresses[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


@dataclass(frozen=True)
class PeersFile:
    """The registry file's contents."""

    peers: list[Peer] = setting(default_factory=list, doc="admitted gateways")

    def validate(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        seen: dict[str, set[str]] = {"name": set(), "public_key": set(), "address": set()}
        for i, peer in enumerate(self.peers):
            if not peer.addresses:
                errors.append((f"peers[{i}].addresses", "at least one address is required"))
            tunnels = len(peer.public_keys)
            if tunnels > 1 and len(peer.addresses) != tunnels:
                errors.append(
                    (f"peers[{i}].addresses", f"one address per tunnel key ({tunnels} keys)")
                )
            if tunnels > 1 and len(peer.endpoints) > tunnels:
                errors.append((f"peers[{i}].endpoints", f"at most one per key ({tunnels} keys)"))
            for kind, values in (
                ("name", [peer.name]),
                ("public_key", peer.public_keys),
                ("address", [str(ipaddress.ip_address(a)) for a in peer.addresses]),
            ):
                for value in values:
                    if value in seen[kind]:
                        key = "addresses" if kind == "address" else kind
                        errors.append((f"peers[{i}].{key}", f"{kind} {value!r} already admitted"))
                    seen[kind].add(value)
        return errors


def read_peers(path: Path) -> list[Peer]:
    """The admitted peers in `path` (none if it does not exist); raises ConfigError."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror or exc}"]) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from exc
    return list(load(PeersFile, data).peers)


def _write_peers(path: Path, peers: list[Peer]) -> None:
    load(PeersFile, dump(PeersFile(peers)))  # validate what we write as we validate reads
    header = b"# Admitted mesh peers; edit with `dicomesh peer add|remove`.\n"
    atomic_write(path, header + tomli_w.dumps(dump(PeersFile(peers))).encode())


def add_peer(path: Path, peer: Peer) -> None:
    """Admit `peer` (ConfigError if it clashes with an admitted one)."""
    with locked(path.with_suffix(".lock")):
        peers = read_peers(path)
        _write_peers(path, [*peers, peer])


def remove_peer(path: Path, name: str) -> bool:
    """Revoke the peer called `name`; False if there was none."""
    with locked(path.with_suffix(".lock")):
        peers = read_peers(path)
        kept = [p for p in peers if p.name != name]
        if len(kept) == len(peers):
            return False
        _write_peers(path, kept)
        return True


@dataclass
class PeerRegistry:
    """The admitted peers as the running gateway sees them, reloaded when the file changes."""

    path: Path
    _peers: dict[str, Peer] = field(default_factory=dict)
    _by_address: dict[str, Peer] = field(default_factory=dict)
    _stamp: tuple[int, int] | None = None

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; a broken file keeps the last good registry."""
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and (self._peers or stamp is None):
            return False
        try:
            peers = read_peers(self.path)
        except ConfigError as exc:
            log.error("peer registry %s not reloaded:\n%s", self.path, exc)
            self._stamp = stamp
            return False
        self._stamp = stamp
        self.set_peers(peers)
        log.info("peer registry: %d peer(s) admitted", len(peers))
        return True

    def set_peers(self, peers: list[Peer]) -> None:
        self._peers = {p.name: p for p in peers}
        self._by_address = {str(ipaddress.ip_address(a)): p for p in peers for a in p.addresses}

    def by_address(self, address: str) -> Peer | None:
        """The peer whose overlay address `address` is (IPv4-mapped IPv6 normalised)."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return self._by_address.get(str(ip))

    def get(self, name: str) -> Peer | None:
        return self._peers.get(name)

    def peers(self) -> list[Peer]:
        return list(self._peers.values())


def peer_from_args(**values: Any) -> Peer:
    """A validated Peer from CLI values; raises ConfigError with every problem."""
    data = {k: v for k, v in values.items() if v is not None}
    return load(Peer, data, "peer")
