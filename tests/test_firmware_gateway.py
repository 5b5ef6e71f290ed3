"""The board profile and status LED as the running gateway uses them: `dicomesh run` detects
the board under DICOMESH_HW_ROOT (a sample /sys tree), takes the profile's defaults under
its config file, and drives the LED's sysfs files from booting to ok (or error)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import hwtree
from gateway import DICOMESH, REPO, Gateway
from procs import LOOPBACK


def trigger(led: Path) -> str:
    return (led / "trigger").read_text().strip()


def test_gateway_on_a_pi_takes_board_defaults_and_shows_ok(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    root = hwtree.pi4(tmp_path / "hw", usb_ssd=False)  # store on the SD card
    led = root / "sys/class/leds/ACT"
    gw = gateway_factory(start=False, dicom={"max_associations": 8})
    gw.start(env={"DICOMESH_HW_ROOT": str(root)})
    assert trigger(led) == "heartbeat"  # ready: booting (timer) -> ok
    board = [line for line in gw.log().splitlines() if "board: " in line]
    assert len(board) == 1, gw.log()
    assert "Raspberry Pi 4" in board[0]
    # The profile's defaults, SD-card extras included; the file's own setting still wins.
    assert "store.compression=zstd" in board[0] and "dicom.max_associations=16" in board[0]
    effective = subprocess.run(
        [*DICOMESH, "config", "check", str(gw.config_path)],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert "max_associations = 8" in effective.stdout


def test_gateway_that_cannot_start_shows_error(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    root = hwtree.pi4(tmp_path / "hw")
    led = root / "sys/class/leds/ACT"
    gw = gateway_factory(start=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DICOMESH_HW_ROOT": str(root)}
    env.pop("NOTIFY_SOCKET", None)
    with socket.socket() as holder:
        holder.bind((LOOPBACK, gw.port))
        holder.listen()
        result = subprocess.run(
            [*DICOMESH, "run", "--config", str(gw.config_path)],
            capture_output=True, text=True, timeout=60, env=env, cwd=gw.workdir,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert trigger(led) == "none"  # steady on
    assert (led / "brightness").read_text().strip() == "255"
