"""A small HTTP client for the admin page tests: cookies, the CSRF header, JSON, and no
automatic redirects (tests look at the 302 itself). Talks to real gateways on loopback."""

from __future__ import annotations

import http.cookiejar
import json
import socket
import urllib.error
import urllib.request
from typing import Any

PASSWORD = "correct horse battery"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _SourceHTTPConnection(urllib.request.HTTPHandler):
    """Connect from a chosen loopback source address (127.0.0.x stands for a peer)."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def http_open(self, req: urllib.request.Request) -> Any:
        import http.client

        source = self.source

        class Conn(http.client.HTTPConnection):
            def __init__(self, *a: Any, **kw: Any) -> None:
                kw["source_address"] = (source, 0)
                super().__init__(*a, **kw)

        return self.do_open(Conn, req)


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:200]!r})"


class WebClient:
    """One browser-like client of a gateway's page."""

    def __init__(self, base: str, source: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        handlers: list[Any] = [urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()]
        if source is not None:
            handlers.append(_SourceHTTPConnection(source))
        self.opener = urllib.request.build_opener(*handlers)
        self.csrf: str | None = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        csrf: bool = True,
        content_type: str | None = "application/json",
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Reply:
        if isinstance(body, bytes):  # sent as is (an upload)
            data: bytes | None = body
        else:
            data = None if body is None else json.dumps(body).encode()
        if method not in ("GET", "HEAD") and data is None:
            data = b"{}"
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None and content_type:
            req.add_header("Content-Type", content_type)
        if csrf and self.csrf and method not in ("GET", "HEAD"):
            req.add_header("X-CSRF-Token", self.csrf)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                return Reply(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.headers, exc.read())

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)

    def setup(self, code: str, password: str = PASSWORD) -> Reply:
        reply = self.post("/api/setup", {"code": code, "password": password})
        if reply.status == 200:
            self.csrf = reply.json()["csrf"]
        return reply

    def login(self, password: str = PASSWORD) -> Reply:
        reply = self.post("/api/login", {"password": password})
        if reply.status == 200:
            self.csrf = reply.json()["csrf"]
        return reply

    def cookie(self) -> http.cookiejar.Cookie | None:
        return next(iter(self.jar), None)


def first_sse_event(base: str, cookie: str, timeout: float = 10.0) -> tuple[str, dict]:
    """Read /api/events with a raw socket until the first complete event; (name, data)."""
    host, port = base.split("//", 1)[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(
            f"GET /api/events HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookie}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        buf = b""
        while b"event: status" not in buf or not buf.split(b"event: status", 1)[1].count(b"\n\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n", 1)[0], head
    assert b"text/event-stream" in head
    event = rest.split(b"event: status", 1)[1]
    # Chunked transfer encoding: the data line is intact inside one chunk.
    data_line = next(line for line in event.split(b"\n") if line.startswith(b"data: "))
    return "status", json.loads(data_line[len(b"data: ") :])
