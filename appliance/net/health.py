"""Uplink health as a table-driven state machine: probe results in, state changes out.

A probe result is first classified into an event using the streak counters and the loss
window (hysteresis lives there), then `TRANSITIONS[(state, event)]` gives the next state.
Pure: no clock, no I/O; the monitor (monitor.py) feeds it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from appliance.net.config import HealthConfig


class Health(Enum):
    """How usable an uplink is."""

    UNKNOWN = "unknown"  # just started, nothing conclusive yet: usable (no reason not to)
    UP = "up"
    DEGRADED = "degraded"  # answers, but slowly or with loss: usable, the swarm measures it
    DOWN = "down"  # down_after probes in a row failed: not usable until up_after succeed

    @property
    def usable(self) -> bool:
        return self is not Health.DOWN


class ProbeEvent(Enum):
    """A probe result, classified."""

    MISS = "miss"  # failed, fewer than down_after in a row, loss window still fine
    LOSSY = "lossy"  # failed, fewer than down_after in a row, loss window over the threshold
    FAIL_STREAK = "fail_streak"  # the down_after-th (or later) failure in a row
    POOR = "poor"  # answered, but over the RTT or loss threshold
    POOR_STREAK = "poor_streak"  # ... and the up_after-th (or later) answer in a row
    GOOD = "good"  # answered well, fewer than up_after good answers in a row
    GOOD_STREAK = "good_streak"  # the up_after-th (or later) good answer in a row


_U, _P, _D, _X = Health.UNKNOWN, Health.UP, Health.DEGRADED, Health.DOWN
E = ProbeEvent

# (state, event) -> next state; every cell is listed (and tested). A down line needs a full
# streak of answers to come back (degraded if they are poor); a degraded one needs a full good
# streak to be up, so it does not flap on one good answer.
TRANSITIONS: dict[tuple[Health, ProbeEvent], Health] = {
    (_U, E.MISS): _U,
    (_U, E.LOSSY): _D,
    (_U, E.FAIL_STREAK): _X,
    (_U, E.POOR_STREAK): _D,
    (_U, E.POOR): _D,
    (_U, E.GOOD): _P,
    (_U, E.GOOD_STREAK): _P,
    (_P, E.MISS): _P,
    (_P, E.LOSSY): _D,
    (_P, E.FAIL_STREAK): _X,
    (_P, E.POOR_STREAK): _D,
    (_P, E.POOR): _D,
    (_P, E.GOOD): _P,
    (_P, E.GOOD_STREAK): _P,
    (_D, E.MISS): _D,
    (_D, E.LOSSY): _D,
    (_D, E.FAIL_STREAK): _X,
    (_D, E.POOR_STREAK): _D,
    (_D, E.POOR): _D,
    (_D, E.GOOD): _D,
    (_D, E.GOOD_STREAK): _P,
    (_X, E.MISS): _X,
    (_X, E.LOSSY): _X,
    (_X, E.FAIL_STREAK): _X,
    (_X, E.POOR_STREAK): _D,
    (_X, E.POOR): _X,
    (_X, E.GOOD): _X,
    (_X, E.GOOD_STREAK): _P,
}


@dataclass(frozen=True)
class ProbeResult:
    """One probe: answered (with its round trip) or not."""

    ok: bool
    rtt_s: float | None = None


@dataclass
class HealthFSM:
    """The health of one uplink."""

    cfg: HealthConfig
    state: Health = Health.UNKNOWN
    fail_streak: int = 0
    good_streak: int = 0
    answered_streak: int = 0  # answered at all (good or poor): brings a down line back degraded
    last_rtt_s: float | None = None
    _window: deque[bool] = field(default_factory=deque)

    @property
    def loss(self) -> float:
        """Share of lost probes in the window."""
        return self._window.count(False) / len(self._window) if self._window else 0.0

    def classify(self, result: ProbeResult) -> ProbeEvent:
        """Update the counters with `result` and name the event it makes."""
        self._window.append(result.ok)
        while len(self._window) > self.cfg.window:
            self._window.popleft()
        if not result.ok:
            self.fail_streak += 1
            self.good_streak = self.answered_streak = 0
            if self.fail_streak >= self.cfg.down_after:
                return E.FAIL_STREAK
            return E.LOSSY if self._lossy() else E.MISS
        self.fail_streak = 0
        self.answered_streak += 1
        self.last_rtt_s = result.rtt_s
        slow = result.rtt_s is not None and result.rtt_s * 1000 > self.cfg.degraded_rtt_ms
        if slow or self._lossy():
            self.good_streak = 0
            return E.POOR_STREAK if self.answered_streak >= self.cfg.up_after else E.POOR
        self.good_streak += 1
        return E.GOOD_STREAK if self.good_streak >= self.cfg.up_after else E.GOOD

    def feed(self, result: ProbeResult) -> tuple[Health, Health]:
        """Apply one probe result; return (old state, new state)."""
        old = self.state
        event = self.classify(result)
        new = self.state = TRANSITIONS[(old, event)]
        return old, new

    def _lossy(self) -> bool:
        return len(self._window) >= self.cfg.window and self.loss > self.cfg.degraded_loss
