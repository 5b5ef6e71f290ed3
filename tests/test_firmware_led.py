"""The status LED (appliance/firmware/led.py): one test per transition-table cell, and the
sysfs writes of each pattern on a sample LED directory (tests/hwtree.py)."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import hwtree
import pytest

from appliance.firmware import led
from appliance.firmware.led import Event, State

ALL_CELLS = list(itertools.product(State, Event))


@pytest.mark.parametrize(
    "state, event", ALL_CELLS, ids=[f"{s.value}-{e.value}" for s, e in ALL_CELLS]
)
def test_transition_cell(tmp_path: Path, state: State, event: Event) -> None:
    status = led.StatusLed(hwtree.led(tmp_path, "ACT"))
    status.state = state
    expected = led.TRANSITIONS.get((state, event), state)
    assert status.on(event) is expected


def test_table_reaches_every_state() -> None:
    assert {s for s in led.TRANSITIONS.values()} == set(State)
    assert set(led.PATTERNS) == set(State)


def read(path: Path) -> dict[str, str]:
    return {
        name: (path / name).read_text().strip()
        for name in ("trigger", "brightness", "delay_on", "delay_off")
        if (path / name).exists()
    }


def test_patterns_written_to_sysfs(tmp_path: Path) -> None:
    path = hwtree.led(tmp_path, "ACT")
    status = led.StatusLed(path)
    assert read(path) == {
        "trigger": "timer", "brightness": "0", "delay_on": "125", "delay_off": "125",
    }  # fmt: skip
    status.on(Event.READY)
    assert read(path)["trigger"] == "heartbeat"
    status.on(Event.UPLINK_DEGRADED)
    assert read(path)["trigger"] == "timer" and read(path)["delay_on"] == "1000"
    status.on(Event.FATAL)
    assert read(path)["trigger"] == "none" and read(path)["brightness"] == "255"


def test_missing_trigger_falls_back_to_steady(tmp_path: Path) -> None:
    path = hwtree.led(tmp_path, "ACT", triggers="[none] mmc0")
    led.StatusLed(path)
    assert read(path) == {"trigger": "none", "brightness": "255"}


def test_no_led_is_a_no_op() -> None:
    status = led.StatusLed(None)
    assert status.on(Event.READY) is State.OK


def test_unwritable_led_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "sys/class/leds/gone"  # vanished LED: every write fails
    with caplog.at_level(logging.DEBUG, logger="appliance.firmware.led"):
        status = led.StatusLed(missing)
        status.on(Event.READY)
        status.on(Event.UPLINK_DEGRADED)
    assert status.state is State.DEGRADED
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1


def test_led_command_shows_error_on_a_pi(tmp_path: Path) -> None:
    """What dicomesh-led-error.service runs when the gateway failed."""
    import subprocess
    import sys

    hwtree.pi4(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.firmware.led", "error", "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    act = tmp_path / "sys/class/leds/ACT"
    assert read(act) == {"trigger": "none", "brightness": "255"}
    assert (tmp_path / "sys/class/leds/PWR/trigger").read_text().strip().startswith("none [mmc0]")
