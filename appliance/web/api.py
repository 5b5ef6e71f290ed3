"""The JSON API under /api (documented in API.md); the page uses nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from appliance.dicom.config import DicomNode
from appliance.dicom.push import Pushes
from appliance.mesh import peers as registry_file
from appliance.schema import ConfigError, dump
from appliance.web import diagnostics, metrics, status, studies
from appliance.web.api_qos import QosRoutes
from appliance.web.api_sends import SendRoutes
from appliance.web.api_settings import SettingsRoutes
from appliance.web.api_update import UpdateRoutes
from appliance.web.auth import Account, AuthError
from appliance.web.config import WebConfig
from appliance.web.echo import c_echo
from appliance.web.guard import COOKIE, SESSION_KEY, Guard
from appliance.web.logbuffer import LEVELS, LogBuffer
from appliance.web.parts import GatewayParts
from appliance.web.qos_runs import QosRuns
from appliance.web.replies import body_of, error, reply
from appliance.web.sessions import Session, SessionStore
from appliance.web.uplinks import UplinkRates, read_counters

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


class Api:
    """Handlers; state shared with the server (sessions, throttle, discovery)."""

    def __init__(
        self,
        cfg: WebConfig,
        parts: GatewayParts,
        account: Account,
        sessions: SessionStore,
        guard: Guard,
        logs: LogBuffer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from appliance.web.sessions import LoginThrottle

        self.cfg = cfg
        self.parts = parts
        self.account = account
        self.sessions = sessions
        self.guard = guard
        self.logs = logs
        self.clock = clock
        self.throttle = LoginThrottle(
            cfg.login_free_attempts, cfg.login_backoff_s, cfg.login_max_backoff_s
        )
        # One password check at a time: parallel guesses cannot slip past the throttle, and
        # each check costs 32 MiB, which a small box cannot multiply.
        self._kdf_lock = asyncio.Lock()
        self.closing = asyncio.Event()
        self.restart_needed: set[str] = set()
        self.discovery: Any = None  # appliance.web.discovery.Discovery when running
        # What runs: settings that differ from it need a restart (the network's).
        self.started_cfg = parts.cfg
        self.pushes = Pushes()
        self.qos_runs = QosRuns()
        self.uplink_rates = UplinkRates(clock)

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/session", self.session_info)
        r.add_post("/api/setup", self.setup)
        r.add_post("/api/login", self.login)
        r.add_post("/api/logout", self.logout)
        r.add_post("/api/password", self.password)
        r.add_get("/api/status", self.status)
        r.add_get("/api/events", self.events)
        r.add_get("/api/studies", self.studies)
        r.add_get("/api/transfers", self.transfers)
        r.add_post("/api/transfers", self.fetch)
        r.add_get("/api/peers", self.peers)
        r.add_post("/api/peers", self.admit)
        r.add_delete("/api/peers/{name}", self.revoke)
        r.add_post("/api/dicom/echo", self.echo)
        r.add_get("/api/logs", self.recent_logs)
        r.add_get("/api/diagnostics", self.diagnostics)
        r.add_get("/metrics", self.metrics)
        SendRoutes(self).routes(app)
        SettingsRoutes(self).routes(app)
        QosRoutes(self).routes(app)
        UpdateRoutes(self).routes(app)

    async def stop(self) -> None:
        """End what the page started: QoS runs, sends to DICOM nodes."""
        self.closing.set()
        await self.qos_runs.stop()
        await self._executor(self.pushes.stop)

    async def _executor(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- session ----------------------------------------------------------------------------

    def _start_session(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        session = self.sessions.create(request.remote or "", self.clock())
        response = reply({**body, "csrf": session.csrf})
        response.set_cookie(
            COOKIE, session.token, httponly=True, samesite="Strict", path="/",
            secure=self.cfg.cookie_secure, max_age=int(self.cfg.session_ttl_s),
        )  # fmt: skip
        return response

    async def session_info(self, request: web.Request) -> web.Response:
        session: Session | None = request.get(SESSION_KEY)
        body: dict[str, Any] = {
            "authenticated": session is not None,
            "setup_required": not self.account.configured,
        }
        if session is not None:
            body["csrf"] = session.csrf
        return reply(body)

    def _throttled(self, source: str) -> web.Response | None:
        wait = self.throttle.retry_after(source, self.clock())
        if wait <= 0:
            return None
        retry = str(math.ceil(wait))
        response = error(429, "too many failed attempts; wait", retry_after=math.ceil(wait))
        response.headers["Retry-After"] = retry
        return response

    def _failed(self, source: str, what: str) -> web.Response:
        delay = self.throttle.failed(source, self.clock())
        log.warning("web: failed %s from %s (next try in %.0f s)", what, source, delay)
        return error(401, f"wrong {what}", retry_after=math.ceil(delay))

    async def setup(self, request: web.Request) -> web.Response:
        source = request.remote or ""
        if (refused := self._throttled(source)) is not None:
            return refused
        body = await body_of(request)
        async with self._kdf_lock:
            try:
                await self._executor(self.account.setup, body.get("code"), body.get("password"))
            except AuthError as exc:
                if "wrong code" in str(exc):
                    return self._failed(source, "setup code")
                return error(400, str(exc))
        self.throttle.succeeded(source)
        log.info("web: admin password set from %s; the setup code is void", source)
        return self._start_session(request, {"authenticated": True})

    async def login(self, request: web.Request) -> web.Response:
        source = request.remote or ""
        if (refused := self._throttled(source)) is not None:
            return refused
        body = await body_of(request)
        if not self.account.configured:
            return error(409, "not set up yet: use the setup code")
        async with self._kdf_lock:
            ok = await self._executor(self.account.verify, body.get("password"))
        if not ok:
            return self._failed(source, "password")
        self.throttle.succeeded(source)
        log.info("web: admin logged in from %s", source)
        return self._start_session(request, {"authenticated": True})

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.end(request[SESSION_KEY].token)
        response = reply({"authenticated": False})
        response.del_cookie(COOKIE, path="/")
        return response

    async def password(self, request: web.Request) -> web.Response:
        body = await body_of(request)
        source = request.remote or ""
        async with self._kdf_lock:
            try:
                await self._executor(self.account.change, body.get("current"), body.get("new"))
            except AuthError as exc:
                return error(400, str(exc))
        self.sessions.end_all()
        log.info("web: admin password changed from %s; other sessions ended", source)
        return self._start_session(request, {"authenticated": True})

    # -- dashboard --------------------------------------------------------------------------

    async def _net_status(self) -> dict[str, Any] | None:
        """The network manager's status with interface counters and rates (None: off)."""
        net = self.parts.net
        if net is None:
            return None
        try:
            found: dict[str, Any] = await net.status()
        except Exception as exc:  # the dashboard shows the rest whatever the lines do
            log.debug("uplink status unavailable: %s", exc)
            return None
        self.uplink_rates.add(found, await self._executor(read_counters, net))
        return found

    async def _status_body(self) -> dict[str, Any]:
        body = await status.build_status(self.parts, self.logs)
        body["uplinks"] = await self._net_status()
        body["sends"] = [job.to_json() for job in self.pushes.jobs()]
        body["restart_needed"] = sorted(self.restart_needed)
        return body

    async def status(self, request: web.Request) -> web.Response:
        return reply(await self._status_body())

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `status` every events_interval_s until logout or stop."""
        token = request[SESSION_KEY].token
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
        })  # fmt: skip
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            await response.write(b"retry: 2000\n\n")
            while not self.closing.is_set() and self.sessions.alive(token, self.clock()):
                body = await self._status_body()
                await response.write(f"event: status\ndata: {json.dumps(body)}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closing.wait(), self.cfg.events_interval_s)
        return response

    # -- studies and transfers ----------------------------------------------------------------

    async def studies(self, request: web.Request) -> web.Response:
        try:
            found = await self._executor(studies.search, self.parts, dict(request.query))
        except studies.SearchError as exc:
            return error(400, str(exc))
        return reply({"studies": found})

    async def transfers(self, request: web.Request) -> web.Response:
        return reply({"transfers": status.transfers(self.parts)})

    async def fetch(self, request: web.Request) -> web.Response:
        body = await body_of(request)
        study = body.get("study")
        if not isinstance(study, str) or not 0 < len(study) <= 64:
            return error(400, "study: a Study Instance UID")
        if self.parts.mesh is None:
            return error(409, "the mesh is off on this gateway")
        state = self.parts.mesh.fetch(study)
        log.info("web: fetch of study %s requested", study)
        return reply(status.transfer_json(state), 202)

    # -- peers ------------------------------------------------------------------------------

    async def peers(self, request: web.Request) -> web.Response:
        listed = await self._executor(status.admitted, self.parts)
        names = {p.name for p in listed}
        seen = self.discovery.seen() if self.discovery is not None else []
        return reply({
            "peers": status.peers(self.parts, listed),
            "candidates": [c.to_json() for c in seen if c.name not in names],
        })  # fmt: skip

    def _registry_path(self) -> Any:
        return self.parts.cfg.state_dir / registry_file.PEERS_FILE

    async def admit(self, request: web.Request) -> web.Response:
        body = await body_of(request)
        fields = ("name", "public_key", "addresses", "role", "port", "tunnel_keys",
                  "endpoints", "admin")  # fmt: skip
        unknown = sorted(set(body) - set(fields))
        if unknown:
            return error(400, "invalid peer", errors=[f"peer.{unknown[0]}: unknown key"])
        try:
            peer = registry_file.peer_from_args(**{k: body.get(k) for k in fields})
            await self._executor(registry_file.add_peer, self._registry_path(), peer)
        except ConfigError as exc:
            return error(400, "invalid peer", errors=exc.errors)
        log.info("web: peer %s admitted (%s)", peer.name, ", ".join(peer.addresses))
        return reply({"peer": dump(peer)}, 201)

    async def revoke(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            removed = await self._executor(registry_file.remove_peer, self._registry_path(), name)
        except ConfigError as exc:
            return error(500, "peer registry unreadable", errors=exc.errors)
        if not removed:
            return error(404, f"no peer called {name!r}")
        log.info("web: peer %s revoked", name)
        return reply({"revoked": name})

    # -- C-ECHO -----------------------------------------------------------------------------

    async def echo(self, request: web.Request) -> web.Response:
        body = await body_of(request)
        wanted = str(body.get("ae_title", "")).strip()
        cfg = self.parts.cfg.dicom
        node = next((n for n in cfg.nodes if n.ae_title.strip() == wanted), None)
        if node is None and wanted == cfg.ae_title.strip() and self.parts.dicom is not None:
            # Our own node: the quickest check that a new AE title took effect.
            host = "127.0.0.1" if cfg.listen in ("0.0.0.0", "::") else cfg.listen
            node = DicomNode(ae_title=cfg.ae_title, host=host, port=self.parts.dicom.port)
        if node is None:
            return error(404, f"ae_title: {wanted!r} is not a known node (dicom.nodes)")
        result = await self._executor(c_echo, node, cfg.ae_title)
        log.info("web: C-ECHO to %s: %s", node.ae_title.strip(), "ok" if result["ok"] else "failed")
        return reply({"ae_title": node.ae_title.strip(), **result})

    # -- system -----------------------------------------------------------------------------

    async def recent_logs(self, request: web.Request) -> web.Response:
        q = request.query
        level = q.get("level", "debug")
        if level not in LEVELS:
            return error(400, f"level: one of {', '.join(LEVELS)}")
        try:
            limit = min(int(q.get("limit", "200")), 2000)
            after = int(q.get("after", "0"))
        except ValueError:
            return error(400, "limit/after: integers")
        lines = self.logs.recent(level=level, contains=q.get("q", "")[:100], limit=limit,
                                 after=after)  # fmt: skip
        return reply({"lines": [line.to_json() for line in lines]})

    async def diagnostics(self, request: web.Request) -> web.Response:
        body = await self._status_body()
        data = await self._executor(diagnostics.bundle, self.parts, body, self.logs)
        name = self.parts.mesh.cfg.name if self.parts.mesh else "gateway"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return web.Response(body=data, content_type="application/gzip", headers={
            "Content-Disposition": f'attachment; filename="dicomesh-{name}-{stamp}.tar.gz"',
        })  # fmt: skip

    async def metrics(self, request: web.Request) -> web.Response:
        extra = {"web_refused": self.guard.refused}
        for job in self.pushes.jobs():
            state = "running" if not job.finished else ("failed" if job.error else "done")
            extra[f"sends_{state}"] = extra.get(f"sends_{state}", 0) + 1
        net_status = await self._net_status()
        data = await self._executor(metrics.render, self.parts, extra, net_status)
        return web.Response(body=data, headers={"Content-Type": metrics.CONTENT_TYPE})
