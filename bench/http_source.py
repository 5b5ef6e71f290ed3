#!/usr/bin/env python3
"""One HTTP source for bench/swarm.py: serves one file with Range support (aiohttp FileResponse).

``python -m http.server`` ignores Range, so multi-source clients could not split on it.
Prints ``READY`` once listening; runs until SIGTERM/SIGINT.

Usage: http_source.py FILE ADDR PORT   (serves FILE at /<basename>)
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from aiohttp import web


async def serve(path: Path, addr: str, port: int) -> None:
    """Serve ``path`` at ``/<name>`` on ``addr:port`` until a stop signal."""

    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path)  # Range, If-Range, HEAD; sendfile on Linux

    app = web.Application()
    app.router.add_get(f"/{path.name}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, addr, port, backlog=64).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    file, host, port = sys.argv[1:4]
    asyncio.run(serve(Path(file).resolve(), host, int(port)))
