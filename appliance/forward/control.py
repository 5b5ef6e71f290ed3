"""Control-socket routes of the forwarding queue (`dicomesh forward ...`): list jobs and
apply an admin action. Job ids are shown with '/' for their \\x1f separators; either form is
accepted back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from aiohttp import web

from appliance.forward.core import InvalidTransition, Job, State
from appliance.forward.forwarder import Forwarder

ACTIONS = ("retry", "hold", "release", "cancel")


def shown_id(job_id: str) -> str:
    return job_id.replace("\x1f", "/")


def job_line(job: Job) -> dict:
    line = job.to_json()
    line["id"] = shown_id(job.id)
    return line


def resolve_id(forwarder: Forwarder, given: str) -> str:
    """The stored id for a shown or stored id; KeyError if none or ambiguous."""
    ids = [j.id for j in forwarder.jobs()]
    if given in ids:
        return given
    matches = [i for i in ids if shown_id(i) == given]
    if len(matches) != 1:
        raise KeyError(given)
    return matches[0]


def forward_routes(forwarder: Forwarder) -> Callable[[web.Application], None]:
    async def jobs(request: web.Request) -> web.Response:
        body = await _body(request)
        state = body.get("state")
        try:
            wanted = State(state) if state else None
        except ValueError:
            raise web.HTTPBadRequest(text=f"unknown state {state!r}\n") from None
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, forwarder.jobs, wanted)
        return _line({"jobs": [job_line(j) for j in found]})

    async def action(request: web.Request) -> web.Response:
        body = await _body(request)
        name, given = body.get("action"), body.get("id")
        if name not in ACTIONS or not isinstance(given, str):
            raise web.HTTPBadRequest(text=f"need an action ({', '.join(ACTIONS)}) and an id\n")
        loop = asyncio.get_running_loop()

        def act() -> Job:
            return getattr(forwarder, name)(resolve_id(forwarder, given))

        try:
            job = await loop.run_in_executor(None, act)
        except KeyError:
            raise web.HTTPNotFound(text=f"no job {given!r}\n") from None
        except InvalidTransition as exc:
            raise web.HTTPConflict(text=f"{exc}\n".replace("\x1f", "/")) from None
        return _line({"job": job_line(job)})

    def register(app: web.Application) -> None:
        app.router.add_post("/forward/jobs", jobs)
        app.router.add_post("/forward/action", action)

    return register


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise web.HTTPBadRequest(text="body is not JSON\n") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object\n")
    return body


def _line(obj: dict) -> web.Response:
    return web.Response(text=json.dumps(obj) + "\n", content_type="application/x-ndjson")
