"""Control-socket routes of eviction (`dicomesh evict`): the plan with its reasons (dry run,
changes nothing), or one run now."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from appliance.evict.evictor import Evictor, Report


def evict_routes(evictor: Evictor) -> Callable[[web.Application], None]:
    async def plan(_request: web.Request) -> web.Response:
        found = await evictor.async_plan(exact=True)
        return _line(Report(found, dry_run=True))

    async def run(_request: web.Request) -> web.Response:
        return _line(await evictor.async_run_once(dry_run=False))

    def register(app: web.Application) -> None:
        app.router.add_post("/evict/plan", plan)
        app.router.add_post("/evict/run", run)

    return register


def _line(report: Report) -> web.Response:
    body = {**report.to_json(), "text": report.text()}
    return web.Response(text=json.dumps(body) + "\n", content_type="application/x-ndjson")
