"""Who may reach the page, before and after login: aiohttp middlewares.

Order of checks for every request:
1. Source: a request from an admitted peer's overlay address, or arriving on our overlay
   address, is refused (403) unless that peer is flagged `admin` in the registry. Identity
   comes from the tunnel (WireGuard source address), never from a header. A connection
   from this box itself (source address = the address it arrived on) is local.
2. Session: every route needs a login session except the login page, static assets, the
   session probe, setup and login; API calls without one get 401, pages a redirect to
   /login. /metrics is open without a session to `web.metrics_allow` and admin peers.
3. CSRF: state-changing requests (POST/PUT/DELETE) with a session must carry the session's
   token in X-CSRF-Token; all of them must be JSON (a cross-site form cannot send that) and,
   when the browser says where they come from (Origin), come from the page itself.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from appliance.mesh.peers import Peer, PeerRegistry
from appliance.web.config import WebConfig
from appliance.web.sessions import Session, SessionStore, csrf_ok

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COOKIE = "dicomesh_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_KEY = web.RequestKey("session", Session)
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}

# Reachable without a session (the way in, and what the login page needs to render).
PUBLIC_ROUTES = {
    ("GET", "/login"),
    ("GET", "/api/session"),
    ("POST", "/api/setup"),
    ("POST", "/api/login"),
}
PUBLIC_PREFIXES = ("/static/",)
METRICS_PATH = "/metrics"
UPLOAD_PATHS = frozenset({"/api/system/update"})  # bodies that are files, not JSON
UPLOAD_TYPE = "application/octet-stream"

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Everything is served from the gateway itself: no CDN, no inline script.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"
    ),
}


def is_public(method: str, path: str) -> bool:
    return (method, path) in PUBLIC_ROUTES or path.startswith(PUBLIC_PREFIXES)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _json_error(cls: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    return cls(text=f'{{"error": "{message}"}}', content_type="application/json", headers=headers)


class Guard:
    """The three checks above, as middlewares sharing the session store."""

    def __init__(
        self,
        cfg: WebConfig,
        sessions: SessionStore,
        registry: Callable[[], PeerRegistry | None],
        overlay_address: str | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.sessions = sessions
        self.registry = registry
        overlay = _ip(overlay_address) if overlay_address else None
        # Loopback as the mesh address (tests, single-box setups) is not a remote path.
        self.overlay = overlay if overlay is not None and not overlay.is_loopback else None
        self.metrics_networks = [ipaddress.ip_network(n, strict=False) for n in cfg.metrics_allow]
        self.clock = clock
        self.refused = 0  # overlay requests refused (not an admin peer)

    def middlewares(self) -> list[Any]:
        return [self.headers, self.source, self.session, self.csrf]

    def peer_of(self, request: web.Request) -> Peer | None:
        registry = self.registry()
        return registry.by_address(request.remote or "") if registry is not None else None

    @web.middleware
    async def headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(SECURITY_HEADERS)
            raise
        if not response.prepared:
            for name, value in SECURITY_HEADERS.items():
                # A handler may set its own CSP (the QoS report: no script, inline style).
                response.headers.setdefault(name, value)
            if request.path.startswith("/api/"):
                response.headers.setdefault("Cache-Control", "no-store")
        return response

    @web.middleware
    async def source(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        arrived_on = None
        if request.transport is not None:
            sockname = request.transport.get_extra_info("sockname")
            arrived_on = _ip(sockname[0]) if sockname else None
        if arrived_on is not None and _ip(request.remote or "") == arrived_on:
            # From this box itself (same address at both ends): local, even where a peer's
            # registered address is one of ours (several gateways on one test machine).
            return await handler(request)
        peer = self.peer_of(request)
        from_overlay = peer is not None or (self.overlay is not None and arrived_on == self.overlay)
        if from_overlay and not (peer is not None and peer.admin):
            self.refused += 1
            raise _json_error(web.HTTPForbidden, "remote admin is for admin peers only")
        return await handler(request)

    def current_session(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE), self.clock())

    def metrics_open_to(self, request: web.Request) -> bool:
        ip = _ip(request.remote or "")
        if ip is not None and any(ip in net for net in self.metrics_networks):
            return True
        peer = self.peer_of(request)
        return peer is not None and peer.admin

    @web.middleware
    async def session(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        session = self.current_session(request)
        if session is not None:
            request[SESSION_KEY] = session
            return await handler(request)
        if is_public(request.method, request.path):
            return await handler(request)
        if request.path == METRICS_PATH and self.metrics_open_to(request):
            return await handler(request)
        if request.path.startswith("/api/") or request.path == METRICS_PATH:
            raise _json_error(web.HTTPUnauthorized, "login required")
        raise web.HTTPFound("/login")

    @web.middleware
    async def csrf(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in SAFE_METHODS:
            return await handler(request)
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            raise _json_error(web.HTTPForbidden, "cross-origin request refused")
        # Neither type can be sent cross-site without a CORS preflight (a plain form can't).
        allowed = UPLOAD_TYPE if request.path in UPLOAD_PATHS else "application/json"
        if request.content_type != allowed:
            raise _json_error(web.HTTPUnsupportedMediaType, f"send {allowed}")
        session = request.get(SESSION_KEY)
        if session is not None and not csrf_ok(session, request.headers.get(CSRF_HEADER)):
            raise _json_error(web.HTTPForbidden, "missing or wrong CSRF token")
        return await handler(request)
