"""The diagnostics bundle: what support needs, nothing that identifies a patient.

A tar.gz of the effective config (secrets masked), the status JSON (no study attributes,
only counts, peers and transfer UIDs), recent log lines (which carry no patient attribute)
and the peer registry (public keys and addresses only)."""

from __future__ import annotations

import io
import json
import tarfile
import time
from typing import Any

from appliance.config import render_toml
from appliance.mesh.peers import PEERS_FILE
from appliance.web.logbuffer import LogBuffer
from appliance.web.parts import GatewayParts


def _add(tar: tarfile.TarFile, name: str, data: bytes, when: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(when)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def bundle(parts: GatewayParts, status: dict[str, Any], logs: LogBuffer) -> bytes:
    """Blocking (compression, file reads): call from an executor."""
    now = time.time()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        _add(tar, "dicomesh/config.toml", render_toml(parts.cfg, mask_secrets=True).encode(), now)
        _add(tar, "dicomesh/status.json", json.dumps(status, indent=2).encode(), now)
        lines = "".join(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(line.time))}Z "
            f"{line.level.upper()} {line.logger}: {line.message}\n"
            for line in logs.recent(limit=100_000)
        )
        _add(tar, "dicomesh/recent.log", lines.encode(), now)
        peers = parts.cfg.state_dir / PEERS_FILE
        if peers.exists():
            _add(tar, f"dicomesh/{PEERS_FILE}", peers.read_bytes(), now)
    return out.getvalue()
