"""The `[mesh]` config section: this gateway's identity in the mesh and swarm tuning."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Literal

from appliance.schema import ip_address, non_negative, port_range, positive, setting

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def peer_name(value: str) -> str | None:
    """Gateway names: 1-32 of a-z 0-9 -, starting with a letter or digit (DNS-label-like)."""
    return None if _NAME.match(value) else "must be 1-32 characters a-z, 0-9, '-'"


def _default_name() -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:32]
    return name if _NAME.match(name) else "gateway"


@dataclass(frozen=True)
class MeshConfig:
    """This gateway in the mesh, and how it syncs, serves and downloads."""

    enabled: bool = setting(True, doc="run the mesh server, catalog sync and swarm")
    name: str = setting(
        default_factory=_default_name, check=peer_name, doc="this gateway's unique mesh name"
    )
    role: Literal["clinic", "replica"] = setting("clinic", doc="clinic or replica gateway")
    address: str = setting(
        "127.0.0.1",
        check=ip_address,
        doc="overlay address: the mesh listens on it and connects to peers from it",
    )
    port: int = setting(7480, check=port_range, doc="TCP port of the mesh HTTP server")
    list_remote_studies: bool = setting(
        True, doc="C-FIND also lists studies held only by other gateways"
    )
    sync_interval_s: float = setting(5.0, check=positive, doc="catalog pull period per peer")
    stall_timeout_s: float = setting(
        2.0, check=positive, doc="a path silent this long with requests outstanding is stalled"
    )
    queue_seconds: float = setting(
        2.0, check=positive, doc="per-path request queue, in seconds of its measured rate"
    )
    bad_chunk_limit: int = setting(
        3, check=positive, doc="corrupt chunks from one peer before it is cut off"
    )
    ban_s: float = setting(600.0, check=non_negative, doc="how long a cut-off peer stays cut off")
    upload_kbps: int = setting(
        0, check=non_negative, doc="cap on serving to peers, kbit/s (0: no cap besides the line)"
    )
    wire_compression: bool = setting(
        True,
        doc="ask peers for zstd-compressed chunks when that saves bytes (off: raw line bytes)",
    )
    max_inflight_upload_bytes: int = setting(
        256 * 1024,
        check=positive,
        doc="unsent bytes allowed per outgoing connection (keeps modem buffers short)",
    )
