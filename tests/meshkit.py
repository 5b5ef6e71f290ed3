"""In-process mesh gateways for tests: real stores, real MeshNodes on 127.0.0.x addresses,
peers admitted through real peers.toml files."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from procs import free_port

from appliance.mesh.config import MeshConfig
from appliance.mesh.node import MeshNode
from appliance.mesh.peers import PEERS_FILE, Peer, add_peer
from appliance.store import Store
from appliance.store.config import StoreConfig


@dataclass
class Site:
    name: str
    address: str
    port: int
    store: Store
    node: MeshNode
    state_dir: Path

    @property
    def peer(self) -> Peer:
        key = base64.b64encode(self.name.encode().ljust(32, b"k")[:32]).decode()
        return Peer(self.name, key, [self.address], "clinic", self.port)


def make_site(tmp: Path, name: str, address: str, port: int = 0, **mesh: object) -> Site:
    state = tmp / name
    state.mkdir(parents=True, exist_ok=True)
    store = Store(StoreConfig(min_free_bytes=0), state / "store")
    port = port or free_port(address)
    cfg = MeshConfig(name=name, address=address, port=port,
                     **{"sync_interval_s": 0.2, "stall_timeout_s": 1.0, **mesh})  # type: ignore[arg-type]  # fmt: skip
    return Site(name, address, port, store, MeshNode(cfg, state, store), state)


def admit(site: Site, *others: Site) -> None:
    for other in others:
        add_peer(site.state_dir / PEERS_FILE, other.peer)


def close(*sites: Site) -> None:
    for site in sites:
        site.store.close()


def random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()
