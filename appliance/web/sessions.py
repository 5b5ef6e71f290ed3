"""Login sessions and login throttling: pure objects, the current time passed in.

Sessions live in memory only (a restart logs everybody out, which an appliance may do).
The cookie carries a random token; the server keeps what it means. Each session has its
own CSRF token, which the page sends back in a header on every state-changing request.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

MAX_SESSIONS = 64  # one admin; a bound keeps a login loop from growing memory
MAX_TRACKED_SOURCES = 4096  # throttle entries, keyed by addresses clients control


@dataclass
class Session:
    token: str
    csrf: str
    source: str
    created: float
    last_used: float


class SessionStore:
    """Server-side sessions with an absolute lifetime and an idle timeout."""

    def __init__(self, ttl_s: float, idle_s: float) -> None:
        self.ttl_s = ttl_s
        self.idle_s = idle_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, source: str, now: float) -> Session:
        self._expire(now)
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)  # the oldest login goes first
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), source, now, now)
        self._sessions[session.token] = session
        return session

    def get(self, token: str | None, now: float) -> Session | None:
        """The live session for a cookie value (touching it), or None."""
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        if self._expired(session, now):
            del self._sessions[token]
            return None
        session.last_used = now
        return session

    def alive(self, token: str, now: float) -> bool:
        """Whether the session still exists, without counting this as use (live streams
        must not keep an idle session open)."""
        session = self._sessions.get(token)
        return session is not None and not self._expired(session, now)

    def end(self, token: str) -> None:
        self._sessions.pop(token, None)

    def end_all(self) -> None:
        """After a password change every other login must prove itself again."""
        self._sessions.clear()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.created >= self.ttl_s or now - s.last_used >= self.idle_s

    def _expire(self, now: float) -> None:
        for token in [t for t, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[token]


def csrf_ok(session: Session, presented: str | None) -> bool:
    """The request carries this session's CSRF token (constant-time comparison)."""
    return presented is not None and hmac.compare_digest(presented.encode(), session.csrf.encode())


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0


class LoginThrottle:
    """Per source address: `free` failed attempts, then a lockout of `base` seconds that
    doubles with each further failure up to `cap`. A success clears the address."""

    def __init__(self, free: int, base_s: float, cap_s: float) -> None:
        self.free = free
        self.base_s = base_s
        self.cap_s = cap_s
        self._by_source: OrderedDict[str, _Failures] = OrderedDict()

    def retry_after(self, source: str, now: float) -> float:
        """Seconds until `source` may try again (0: now)."""
        entry = self._by_source.get(source)
        return max(0.0, entry.locked_until - now) if entry else 0.0

    def failed(self, source: str, now: float) -> float:
        """Record a failure; the lockout it earns in seconds (0: none yet)."""
        entry = self._by_source.pop(source, None) or _Failures()
        self._by_source[source] = entry  # most recent last
        while len(self._by_source) > MAX_TRACKED_SOURCES:
            self._by_source.popitem(last=False)
        entry.count += 1
        over = entry.count - self.free
        if over <= 0:
            return 0.0
        delay = min(self.base_s * 2 ** min(over - 1, 32), self.cap_s)
        entry.locked_until = now + delay
        return delay

    def succeeded(self, source: str) -> None:
        self._by_source.pop(source, None)
