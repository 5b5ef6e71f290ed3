"""The gateway's state as the dashboard shows it: version, uptime, store, peers, transfers,
recent errors. Built on the loop; store reads go to an executor."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from appliance import __version__
from appliance.mesh.peers import PEERS_FILE, Peer, read_peers
from appliance.schema import ConfigError
from appliance.web.logbuffer import LogBuffer
from appliance.web.parts import GatewayParts

log = logging.getLogger(__name__)

RECENT_ERRORS = 20


def transfer_json(state: Any) -> dict[str, Any]:
    """One swarm download (appliance.mesh.swarm.download.DownloadState) for the page."""
    p = state.progress
    rate = sum(path.rate for path in p.paths.values() if path.requests) if p else 0.0
    return {
        "study": state.study_uid,
        "instances_done": len(state.instances_done),
        "instances_total": state.instances_total,
        "bytes_done": p.bytes_done if p else 0,
        "bytes_total": p.bytes_total if p else 0,
        "rate_bps": 0.0 if state.finished else rate * 8,
        "eta_s": None if state.finished or p is None else p.eta_s,
        "peers": dict(p.peer_bytes) if p else {},
        "finished": state.finished,
        "error": state.error,
    }


def transfers(parts: GatewayParts) -> list[dict[str, Any]]:
    mesh = parts.mesh
    return [transfer_json(s) for s in mesh.downloads()] if mesh is not None else []


def admitted(parts: GatewayParts) -> list[Peer]:
    """The registry file's peers (the truth, also before the mesh reloads it)."""
    try:
        return read_peers(parts.cfg.state_dir / PEERS_FILE)
    except ConfigError as exc:
        log.warning("peer registry unreadable: %s", exc)
        return parts.mesh.registry.peers() if parts.mesh is not None else []


def peers(parts: GatewayParts, listed: list[Peer]) -> list[dict[str, Any]]:
    """Admitted peers with what the mesh node knows of them."""
    mesh = parts.mesh
    received = mesh.bytes_received() if mesh else {}
    sent = mesh.server.bytes_to_peer if mesh else {}
    out = []
    for peer in listed:
        state = mesh.peer_state.get(peer.name) if mesh else None
        out.append({
            "name": peer.name,
            "role": peer.role,
            "addresses": list(peer.addresses),
            "port": peer.port,
            "public_key": peer.public_key,
            "admin": peer.admin,
            "online": bool(state and state.online),
            "last_seen": state.last_seen or None if state else None,
            "last_error": state.last_error if state else None,
            "bytes_in": received.get(peer.name, 0),
            "bytes_out": sent.get(peer.name, 0),
        })  # fmt: skip
    return out


def store_json(parts: GatewayParts) -> dict[str, Any] | None:
    """Blocking (LMDB read): call from an executor."""
    if parts.store is None:
        return None
    s = parts.store.stats()
    return {
        "used_bytes": s.used_bytes,
        "quota_bytes": s.max_bytes or None,
        "disk_free_bytes": s.disk_free_bytes,
        "studies": s.studies,
        "series": s.series,
        "instances": s.instances,
        "chunks": s.chunks,
        "full_reason": s.full_reason,
    }


def dicom_json(parts: GatewayParts) -> dict[str, Any] | None:
    node = parts.dicom
    if node is None:
        return None
    c = node.stats.snapshot()
    return {
        "ae_title": node.cfg.ae_title.strip(),
        "listen": node.cfg.listen,
        "port": node.port,
        "active_associations": len(node.active_associations()),
        "counters": c.__dict__,
    }


async def build_status(parts: GatewayParts, logs: LogBuffer) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    store = await loop.run_in_executor(None, store_json, parts)
    listed = await loop.run_in_executor(None, admitted, parts)
    mesh = parts.mesh
    return {
        "version": __version__,
        "uptime_s": round(time.time() - parts.started_at, 1),
        "time": time.time(),
        "mesh": None
        if mesh is None
        else {
            "name": mesh.cfg.name,
            "role": mesh.cfg.role,
            "address": mesh.cfg.address,
        },
        "dicom": dicom_json(parts),
        "store": store,
        "peers": peers(parts, listed),
        "transfers": transfers(parts),
        "uplinks": None,  # filled in by the API (with interface counters and rates)
        "errors": [line.to_json() for line in logs.recent(level="warning", limit=RECENT_ERRORS)],
    }
