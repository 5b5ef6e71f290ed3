"""The command-line side of the control socket (see `appliance.control`).

Blocking and stdlib-only on purpose: a `dicomesh` command is a short-lived process whose
start-up time the user waits for (aiohttp alone costs ~0.1 s to import)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SOCKET_NAME = "control.sock"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("gateway")
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def stream_lines(state_dir: Path, route: str, body: dict[str, Any]) -> Iterator[dict]:
    """POST to the running gateway's control socket and yield its JSON-lines answer.
    Raises OSError when no gateway listens, RuntimeError when it refuses."""
    conn = _UnixConnection(state_dir / SOCKET_NAME)
    try:
        conn.request(
            "POST", route, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace").strip()
            raise RuntimeError(f"gateway answered {resp.status}: {text}")
        while line := resp.readline():
            if line.strip():
                yield json.loads(line)
    except http.client.HTTPException as exc:
        raise RuntimeError(f"control socket: {exc.__class__.__name__} {exc}") from None
    finally:
        conn.close()
