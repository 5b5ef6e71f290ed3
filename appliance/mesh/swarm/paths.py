"""One download path (peer, local uplink): its health state machine and its rate meter."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.mesh.swarm.core import _Request


class PathState(Enum):
    """Whether the scheduler gives a path work, and how much."""

    PROBING = "probing"  # new or back from backoff: one single-chunk request until bytes flow
    ACTIVE = "active"  # delivering: its queue is sized from its measured rate
    BACKOFF = "backoff"  # failed or stalled: no work until retry_at


class PathEvent(Enum):
    """What happened on a path, as far as its health is concerned."""

    DATA = "data"  # payload bytes arrived
    STALL = "stall"  # silent for stall_timeout_s with requests outstanding
    ERROR = "error"  # a request failed (connection refused, reset, timeout)
    RETRY = "retry"  # the backoff expired


_P, _A, _B = PathState.PROBING, PathState.ACTIVE, PathState.BACKOFF

# (state, event) -> next state. A missing cell means the event does not apply in that state
# and is ignored (e.g. late bytes of a request that backoff already cancelled). Entering
# BACKOFF cancels the path's requests and re-queues their chunks (Scheduler._enter_backoff).
TRANSITIONS: dict[tuple[PathState, PathEvent], PathState] = {
    (_P, PathEvent.DATA): _A,
    (_A, PathEvent.DATA): _A,
    (_P, PathEvent.STALL): _B,
    (_A, PathEvent.STALL): _B,
    (_P, PathEvent.ERROR): _B,
    (_A, PathEvent.ERROR): _B,
    (_B, PathEvent.RETRY): _P,
}

# Weight of a new rate sample. With samples every ~0.5 s of busy time, 0.5 forgets an old
# rate within ~1.5 s: fast enough to follow a line that slows down, slow enough that one odd
# window (a TCP loss, a scheduling hiccup at the server) does not halve a queue.
RATE_ALPHA = 0.5


class RateMeter:
    """Delivered bytes per second *while the path has work*: an EWMA over short windows.

    Time with nothing outstanding is not counted, so an idle path keeps its capacity estimate.
    The clock starts when work is sent to an idle path, so the first round trip counts as busy
    time: that underestimates a little at first, but a path whose chunks arrive in one report
    each, one request at a time, is still measured (and then gets a deeper queue, after which
    round trips overlap transfers and stop counting). Silence while busy is counted, so a slow
    line measures slow; a window is only committed when bytes arrive, so a line that goes
    silent keeps its last rate (the stall detector, not the meter, handles silence).
    """

    __slots__ = ("_anchor", "_bytes", "_time", "_window", "measured", "rate")

    def __init__(self, initial_rate: float, window_s: float) -> None:
        self.rate = initial_rate
        self.measured = False
        self._window = window_s
        self._anchor: float | None = None
        self._bytes = 0
        self._time = 0.0

    def start(self, now: float) -> None:
        """Work was sent to the idle path: the clock runs from now."""
        self._anchor = now

    def add(self, nbytes: int, now: float) -> None:
        """Account `nbytes` that arrived at `now` while the path had work."""
        if self._anchor is None:  # not started: bytes of unknown duration
            self._anchor = now
            return
        self._bytes += nbytes
        self._time += now - self._anchor
        self._anchor = now
        if self._time >= self._window:
            sample = self._bytes / self._time
            self.rate = self.rate + RATE_ALPHA * (sample - self.rate) if self.measured else sample
            self.measured = True
            self._bytes = 0
            self._time = 0.0
        elif not self.measured and self._time >= self._window / 4:
            # A fast new path must not wait a full window on the initial guess: its queue
            # would run dry before the first refill arrives over a long round trip.
            self.rate = max(self.rate, self._bytes / self._time)

    def pause(self) -> None:
        """The path ran out of work: stop the clock until bytes flow again."""
        self._anchor = None

    def reset(self) -> None:
        """The path failed: drop the unfinished window, keep the last committed rate."""
        self._anchor = None
        self._bytes = 0
        self._time = 0.0


class PathRecord:
    """A path's scheduling state: its requests in issue order, queue bytes, health, meter."""

    __slots__ = (
        "delivered",
        "failures",
        "last_activity",
        "line",
        "meter",
        "name",
        "peer",
        "progress",
        "queued",
        "requests",
        "retry_at",
        "state",
    )

    def __init__(
        self, name: str, peer: str, meter: RateMeter, now: float, line: str | None = None
    ) -> None:
        self.name = name
        self.peer = peer
        self.line = line  # our uplink it uses (paths on one line share its rate); None: unknown
        self.state = PathState.PROBING
        self.meter = meter
        self.requests: dict[int, _Request] = {}  # issue order
        self.queued = 0  # bytes of chunks requested and not yet delivered
        self.progress = 0  # bytes already received of those chunks (partial heads)
        self.last_activity = now
        self.failures = 0  # consecutive failures: the backoff exponent
        self.retry_at = 0.0
        self.delivered = 0  # useful bytes: chunks this path completed first

    @property
    def remaining(self) -> int:
        """Bytes still to arrive on this path for its outstanding requests."""
        return self.queued - self.progress
