"""Swarm paths per (peer, uplink), on loopback: each uplink is a loopback source address bound
by the network subsystem's own connector (appliance.net.binding, fwmark 0), and the uplinks'
health is switched by the test the way NetworkManager reports it (UplinkChange). The real
uplinks, tunnels and line cuts are in test_net_swarm_lab.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

import asynckit
import meshkit
import pytest
import storekit as kit

from appliance.mesh.node import MeshNode
from appliance.mesh.peers import PEERS_FILE, Peer, add_peer
from appliance.mesh.swarm.download import pair_paths
from appliance.mesh.uplinks import MeshNetwork
from appliance.net.binding import UplinkBinding, tcp_connector
from appliance.store.chunking import CHUNK_BYTES

# SO_MARK (even 0) needs CAP_NET_ADMIN.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="binding with a fwmark needs root")

SOURCES = {"up1": "127.0.0.81", "up2": "127.0.0.82", "up3": "127.0.0.83"}
HOLDER = "127.0.0.84"


@dataclass(frozen=True)
class Change:
    """An uplink health change as the mesh sees it (NetworkManager's UplinkChange)."""

    uplink: str
    usable: bool


class Uplinks:
    """Loopback uplinks whose health the test sets (NetworkManager's bindings/subscribe)."""

    def __init__(self) -> None:
        self.usable = dict.fromkeys(SOURCES, True)
        self._subscribers: list[Callable[[Change], None]] = []

    def bindings(self, usable_only: bool = True) -> list[UplinkBinding]:
        return [
            UplinkBinding(name, addr, 0)
            for name, addr in SOURCES.items()
            if self.usable[name] or not usable_only
        ]

    def subscribe(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def set(self, name: str, usable: bool) -> None:
        self.usable[name] = usable
        for callback in list(self._subscribers):
            callback(Change(name, usable))


def _network(uplinks: Uplinks) -> MeshNetwork:
    return MeshNetwork(uplinks, lambda binding, limit: tcp_connector(binding, limit=limit))


def _sites(tmp_path, uplinks: Uplinks, upload_kbps: int):
    holder = meshkit.make_site(tmp_path, "holder", HOLDER, upload_kbps=upload_kbps)
    clinic = meshkit.make_site(tmp_path, "clinic", SOURCES["up1"])
    clinic.node = MeshNode(clinic.node.cfg, clinic.state_dir, clinic.store, _network(uplinks))
    meshkit.admit(clinic, holder)
    # The holder knows the clinic by all its uplinks' addresses (one per tunnel in real life).
    add_peer(
        holder.state_dir / PEERS_FILE,
        Peer("clinic", clinic.peer.public_key, list(SOURCES.values()), port=clinic.port),
    )
    return holder, clinic


def _study(store, n: int = 16):
    study, series = kit.uid(500), kit.uid(501)
    items = [kit.build(sop_uid=kit.uid(600 + i), series_uid=series, study_uid=study,
                       payload=kit.noise(CHUNK_BYTES - 600 + 2 * i, seed=90 + i),
                       instance_number=i)
             for i in range(n)]  # fmt: skip
    for item in items:
        store.put_instance(item.inc)
    return study, items


async def _until(predicate, timeout: float = 20.0) -> None:
    await asynckit.until(predicate, timeout, 0.02)


def _paths(state) -> set[str]:
    return set(state.progress.paths) if state.progress is not None else set()


def test_one_path_per_usable_uplink_and_a_down_uplink_leaves_and_comes_back(tmp_path):
    uplinks = Uplinks()
    # 16 chunks of ~512 KiB at 12 Mbit/s: ~6 s, time to take an uplink away and back.
    holder, clinic = _sites(tmp_path, uplinks, upload_kbps=12_000)
    study, items = _study(holder.store)
    seen: dict[str, object] = {}

    async def body():
        await holder.node.start()
        await clinic.node.start()
        try:
            await _until(lambda: study in clinic.node.catalog.remote_studies())
            state = clinic.node.fetch(study)
            every = {f"holder@{name}" for name in SOURCES}
            await _until(lambda: _paths(state) == every and state.uplink_bytes["up2"] > 0)
            uplinks.set("up2", False)
            await _until(lambda: "holder@up2" not in _paths(state), timeout=1.0)
            seen["paths_down"] = _paths(state)
            await asyncio.sleep(0.05)  # a cancelled stream may still count its last read
            at_down = state.uplink_bytes["up2"]
            others = state.uplink_bytes["up1"] + state.uplink_bytes["up3"]
            await _until(lambda: state.uplink_bytes["up1"] + state.uplink_bytes["up3"]
                         > others + 2 * CHUNK_BYTES)  # fmt: skip
            seen["up2_while_down"] = state.uplink_bytes["up2"] - at_down
            uplinks.set("up2", True)
            await _until(lambda: "holder@up2" in _paths(state), timeout=1.0)
            back = state.uplink_bytes["up2"]
            await _until(lambda: state.finished, timeout=30)
            seen["up2_after_back"] = state.uplink_bytes["up2"] - back
            return state
        finally:
            await clinic.node.stop()
            await holder.node.stop()

    try:
        state = asynckit.run(body(), max_block_s=0.2)
        assert state.error is None
        assert seen["paths_down"] == {"holder@up1", "holder@up3"}
        assert seen["up2_while_down"] == 0, seen
        assert seen["up2_after_back"] > 0, (seen, dict(state.uplink_bytes))
        assert set(state.progress.peer_bytes) == {"holder"}  # per-peer accounting stays
        for item in items:
            assert clinic.store.read_instance(item.uid) == item.raw
        assert kit.audit(clinic.store) == []
        # Every uplink's address reached the holder as the admitted clinic.
        assert holder.node.server.counters["forbidden"] == 0
    finally:
        meshkit.close(holder, clinic)


def test_without_usable_uplinks_one_unbound_path_per_peer(tmp_path):
    uplinks = Uplinks()
    for name in SOURCES:
        uplinks.usable[name] = False
    holder, clinic = _sites(tmp_path, uplinks, upload_kbps=0)
    study, items = _study(holder.store, n=4)

    async def body():
        await holder.node.start()
        await clinic.node.start()
        try:
            await _until(lambda: study in clinic.node.catalog.remote_studies())
            state = clinic.node.fetch(study)
            await _until(lambda: state.finished, timeout=30)
            return state
        finally:
            await clinic.node.stop()
            await holder.node.stop()

    try:
        state = asynckit.run(body(), max_block_s=0.2)
        assert state.error is None
        assert set(state.progress.paths) == {"holder/default"}
        assert not state.uplink_bytes
        for item in items:
            assert clinic.store.read_instance(item.uid) == item.raw
    finally:
        meshkit.close(holder, clinic)


def test_paths_pair_every_line_at_both_ends():
    """max(our lines, its tunnels) paths; path k from our uplink k mod L to its address k mod
    R: no line on either side is left without a path, none gets two while another has none."""
    one_tunnel = pair_paths("site", ["a1", "a2", "a3"], 1)
    assert one_tunnel == {"site@a1": ("a1", 0), "site@a2": ("a2", 0), "site@a3": ("a3", 0)}
    # A one-line site fetching from a three-line clinic: the clinic's three uploads serve.
    assert pair_paths("clinic", ["dsl"], 3) == {
        "clinic@dsl>0": ("dsl", 0), "clinic@dsl>1": ("dsl", 1), "clinic@dsl>2": ("dsl", 2),
    }  # fmt: skip
    assert sorted(pair_paths("c", ["a1", "a2", "a3"], 3).values()) == [
        ("a1", 0), ("a2", 1), ("a3", 2),
    ]  # fmt: skip
    for lines, tunnels in [(2, 3), (3, 2), (1, 1), (4, 3)]:
        uplinks = [f"u{i}" for i in range(lines)]
        paths = pair_paths("p", uplinks, tunnels)
        assert len(paths) == max(lines, tunnels)
        assert {u for u, _r in paths.values()} == set(uplinks)
        assert {r for _u, r in paths.values()} == set(range(tunnels))
