"""The status LED: what the box shows someone standing next to it.

    booting   fast blink (timer 125/125 ms)   from power-on until the DICOM node is ready
    ok        heartbeat                        ready, every uplink up
    degraded  slow blink (timer 1000/1000 ms)  ready, but an uplink is down or degraded
    error     steady on                        could not start, or a fatal error

Two tables: (state, event) -> state, and state -> LED pattern written to sysfs
(Documentation/leds/leds-class.rst: `trigger`, then `brightness` or `delay_on`/`delay_off`,
which the kernel creates when the timer trigger is set). Writes are blocking sysfs writes
(microseconds); a failing LED is logged once and never stops the gateway.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class State(enum.Enum):
    BOOTING = "booting"
    OK = "ok"
    DEGRADED = "degraded"
    ERROR = "error"


class Event(enum.Enum):
    READY = "ready"  # the gateway is serving (READY=1)
    UPLINK_DEGRADED = "uplink_degraded"  # some uplink is down or degraded
    UPLINKS_OK = "uplinks_ok"  # every uplink is up again
    FATAL = "fatal"  # could not start / stopping on an error
    RESTART = "restart"  # starting again (after an update or a restart)


S, E = State, Event
# (state, event) -> next state; a pair not listed leaves the state as it is.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.BOOTING, E.READY): S.OK,
    (S.BOOTING, E.UPLINK_DEGRADED): S.BOOTING,  # still booting: the lines come later
    (S.BOOTING, E.FATAL): S.ERROR,
    (S.OK, E.UPLINK_DEGRADED): S.DEGRADED,
    (S.OK, E.FATAL): S.ERROR,
    (S.OK, E.RESTART): S.BOOTING,
    (S.DEGRADED, E.UPLINKS_OK): S.OK,
    (S.DEGRADED, E.FATAL): S.ERROR,
    (S.DEGRADED, E.RESTART): S.BOOTING,
    (S.ERROR, E.RESTART): S.BOOTING,
}


@dataclass(frozen=True)
class Pattern:
    trigger: str
    brightness: int | None = None  # None: the max (max_brightness)
    delay_on_ms: int | None = None
    delay_off_ms: int | None = None


PATTERNS: dict[State, Pattern] = {
    S.BOOTING: Pattern("timer", delay_on_ms=125, delay_off_ms=125),
    S.OK: Pattern("heartbeat"),
    S.DEGRADED: Pattern("timer", delay_on_ms=1000, delay_off_ms=1000),
    S.ERROR: Pattern("none"),  # steady on: "none" trigger, then full brightness
}
# Without the timer/heartbeat triggers (ledtrig-timer, ledtrig-heartbeat: modules not loaded
# on every kernel) the LED falls back to steady on: it then only shows power.
_FALLBACK = Pattern("none")


def available_triggers(led: Path) -> list[str]:
    """The triggers the kernel offers for `led` (the current one is shown as [name])."""
    try:
        text = (led / "trigger").read_text()
    except OSError:
        return []
    return [t.strip("[]") for t in text.split()]


def apply(led: Path, pattern: Pattern, triggers: list[str]) -> None:
    """Write `pattern` to the LED directory `led` offering `triggers`; raises OSError."""
    if triggers and pattern.trigger not in triggers:
        pattern = _FALLBACK
    (led / "trigger").write_text(pattern.trigger)
    if pattern.delay_on_ms is not None:
        (led / "delay_on").write_text(str(pattern.delay_on_ms))
        (led / "delay_off").write_text(str(pattern.delay_off_ms or 0))
    elif pattern.trigger == "none":
        brightness = pattern.brightness
        if brightness is None:
            try:
                brightness = int((led / "max_brightness").read_text())
            except (OSError, ValueError):
                brightness = 1
        (led / "brightness").write_text(str(brightness))


class StatusLed:
    """The table-driven LED; `led` None (no LED on this board) makes every call a no-op."""

    def __init__(self, led: Path | None) -> None:
        self.led = led
        # Read once: the list only changes when a trigger module is loaded.
        self.triggers = available_triggers(led) if led is not None else []
        self.state = State.BOOTING
        self._warned = False
        self._show()

    def on(self, event: Event) -> State:
        """Feed an event; the LED changes when the state does. Returns the new state."""
        new = TRANSITIONS.get((self.state, event), self.state)
        if new is not self.state:
            self.state = new
            self._show()
        return self.state

    def _show(self) -> None:
        if self.led is None:
            return
        try:
            apply(self.led, PATTERNS[self.state], self.triggers)
        except OSError as exc:
            # Read-only sysfs (missing ReadWritePaths), a vanished LED: log once, go on.
            if not self._warned:
                log.warning("status LED %s: %s", self.led, exc)
                self._warned = True
            else:
                log.debug("status LED %s: %s", self.led, exc)


def main(argv: list[str] | None = None) -> int:
    """`python -m appliance.firmware.led STATE [--root R]`: show STATE on this board's LED
    (used by dicomesh-led-error.service when the gateway failed and cannot show it itself)."""
    import argparse

    from appliance.firmware import FirmwareError, board

    parser = argparse.ArgumentParser(prog="dicomesh-led")
    parser.add_argument("state", choices=[s.value for s in State])
    parser.add_argument("--root", type=Path, default=Path("/"))
    args = parser.parse_args(argv)
    try:
        hw = board.detect(args.root)
    except FirmwareError as exc:
        print(f"dicomesh-led: {exc}")
        return 1
    if hw.led is None:
        return 0  # no LED on this board: nothing to show, not an error
    try:
        apply(hw.led, PATTERNS[State(args.state)], available_triggers(hw.led))
    except OSError as exc:
        print(f"dicomesh-led: {hw.led}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
