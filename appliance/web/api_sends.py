"""API: send a study to a known DICOM node (`/api/sends`), and watch or cancel the send."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from appliance.dicom.push import PushError
from appliance.web.replies import body_of, error, reply

if TYPE_CHECKING:
    from appliance.web.api import Api

log = logging.getLogger(__name__)


class SendRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/sends", self.list)
        app.router.add_post("/api/sends", self.start)
        app.router.add_delete("/api/sends/{id}", self.cancel)

    async def list(self, request: web.Request) -> web.Response:
        return reply({"sends": [job.to_json() for job in self.api.pushes.jobs()]})

    async def start(self, request: web.Request) -> web.Response:
        body = await body_of(request)
        study, wanted = body.get("study"), body.get("destination")
        errors = []
        if not isinstance(study, str) or not 0 < len(study) <= 64:
            errors.append("study: a Study Instance UID")
        if not isinstance(wanted, str) or not wanted.strip():
            errors.append("destination: the AE title of a known node (dicom.nodes)")
        if errors:
            return error(400, "invalid send", errors=errors)
        assert isinstance(study, str) and isinstance(wanted, str)
        parts = self.api.parts
        nodes = parts.cfg.dicom.nodes
        node = next((n for n in nodes if n.ae_title.strip() == wanted.strip()), None)
        if node is None:
            known = ", ".join(n.ae_title.strip() for n in nodes) or "none configured"
            return error(400, "invalid send", errors=[
                f"destination: {wanted.strip()!r} is not a known node (dicom.nodes: {known})"
            ])  # fmt: skip
        if parts.dicom is None:
            return error(409, "the DICOM node is not running on this gateway")
        try:
            job = self.api.pushes.start(parts.dicom, study, node)
        except PushError as exc:
            return error(409, str(exc))
        return reply(job.to_json(), 202)

    async def cancel(self, request: web.Request) -> web.Response:
        job = self.api.pushes.get(request.match_info["id"])
        if job is None:
            return error(404, f"no send {request.match_info['id']!r}")
        if not job.finished:
            job.cancel_requested = True
            log.info("send %s: cancel requested", job.id)
        return reply(job.to_json())
