"""The local control socket (state_dir/control.sock, mode 0600): how `dicomesh` commands
reach the running gateway (whose store they cannot open themselves). Local only: anyone who
can open the socket file can act as the administrator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from appliance.control_client import SOCKET_NAME


class ControlServer:
    """aiohttp on a unix socket; subsystems register their routes with `add_routes`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SOCKET_NAME
        self.app = web.Application()
        self._runner: web.AppRunner | None = None

    def add_routes(self, register: Callable[[web.Application], None]) -> None:
        register(self.app)

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # a socket left by a killed gateway
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        old = os.umask(0o177)  # created 0600: only the gateway's user
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.path.unlink(missing_ok=True)


class Progress(Protocol):
    """Something running that says when it changed and whether it is over."""

    changed: asyncio.Event
    finished: bool


async def stream_progress(
    request: web.Request, state: Progress, line: Callable[[], dict[str, Any]]
) -> web.StreamResponse:
    """Answer with one JSON line (`line()`) now and after each change, the last one once
    `state` is finished (control_client.stream_lines reads them); at least every 0.5 s."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    while True:
        state.changed.clear()
        await response.write((json.dumps(line()) + "\n").encode())
        if state.finished:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.changed.wait(), 0.5)
    await response.write_eof()
    return response
