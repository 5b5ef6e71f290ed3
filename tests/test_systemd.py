"""The systemd units in systemd/: `systemd-analyze verify`, the offline security exposure, and
the gateway started exactly as dicomesh.service starts it, speaking sd_notify to a fake
NOTIFY_SOCKET.

PID 1 in the test environment is not systemd, so the units are not started for real. The
notify protocol details (MAINPID, STATUS text, WATCHDOG_PID rules, SIGINT) are covered in
tests/test_lifecycle.py; here the point is the unit's own command line and state layout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w
from gateway import NotifyListener
from procs import LOOPBACK, free_port, stop_process

from appliance.firmware import firstboot, update_cli

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SLOT = "/opt/dicomesh/current"
STATE = "/var/lib/dicomesh"
# Bound on `systemd-analyze security` for every unit (0 = fully locked down, 10 = exposed).
# With systemd 252: dicomesh.service 1.8, what is left being what a network gateway needs
# (CAP_NET_ADMIN, the host network, /dev/net/tun, AF_NETLINK/AF_INET); the first-boot and
# update units 1.9.
MAX_EXPOSURE = 2.5
NOBODY = 65534
CAP_NET_ADMIN = 12  # linux/capability.h

needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")


def unit_files() -> list[Path]:
    return sorted(p for p in UNITS.iterdir() if p.suffix in {".service", ".path"})


def exec_start(unit: Path) -> list[str]:
    """The ExecStart= argv of `unit` (continuation lines joined)."""
    text = unit.read_text().replace("\\\n", " ")
    match = re.search(r"^ExecStart=(.+)$", text, re.MULTILINE)
    assert match, f"{unit.name} has no ExecStart="
    return shlex.split(match.group(1))


@pytest.fixture
def slot_units(tmp_path: Path) -> Path:
    """Copies of the units with the slot path moved under tmp_path.

    `verify` checks that each ExecStart binary exists and is executable; on this machine the
    gateway lives in .venv, not in /opt/dicomesh/current, so the copies point to a temp slot
    whose bin/ links to the venv's entry points (the units are otherwise unchanged).
    """
    slot = tmp_path / "opt" / "dicomesh" / "current"
    (slot / "bin").mkdir(parents=True)
    for name in ("dicomesh", "dicomesh-firstboot", "dicomesh-update"):
        (slot / "bin" / name).symlink_to(Path(sys.executable).parent / "dicomesh")
    (slot / "bin" / "python").symlink_to(sys.executable)
    out = tmp_path / "units"
    out.mkdir()
    for unit in unit_files():
        (out / unit.name).write_text(unit.read_text().replace(SLOT, str(slot)))
    return out


@needs_analyze
def test_units_verify(slot_units: Path) -> None:
    units = sorted(str(p) for p in slot_units.iterdir())
    assert len(units) >= 4
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *units],
        capture_output=True, text=True, timeout=60, cwd=slot_units,
    )  # fmt: skip
    # verify exits 0 on warnings too ("Unknown key ... ignoring"): treat any output as failure.
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a missing binary is reported."""
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/nonexistent/dicomesh run\n")
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(bad)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0 and "not executable" in proc.stderr, proc.stderr


def exposure(unit: Path) -> float:
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=unit.parent,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("name", [p.name for p in unit_files() if p.suffix == ".service"])
def test_security_exposure(slot_units: Path, name: str) -> None:
    score = exposure(slot_units / name)
    print(f"{name}: exposure {score}")
    assert score <= MAX_EXPOSURE


def test_gateway_unit_hardening_is_what_the_gateway_needs() -> None:
    """The items the gateway depends on, kept in sync with appliance/ (see the unit comments)."""
    text = (UNITS / "dicomesh.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z]\w+=", line)
    )
    assert settings["Type"] == "notify"
    assert settings["CapabilityBoundingSet"].split() == ["CAP_NET_ADMIN"]
    assert set(settings["RestrictAddressFamilies"].split()) == {
        "AF_NETLINK", "AF_UNIX", "AF_INET", "AF_INET6",
    }  # fmt: skip
    assert "/dev/net/tun rw" in settings["DeviceAllow"]
    assert "wireguard" in settings["RuntimeDirectory"].split()  # wg_userspace.UAPI_DIR
    assert settings["ProtectSystem"] == "strict"
    assert settings["RestrictNamespaces"] == "yes"


# ---------------------------------------------------------------- the units' command lines


@pytest.mark.parametrize(
    "unit, parser",
    [
        ("dicomesh-firstboot.service", firstboot.parser),
        ("dicomesh-update.service", update_cli.parser),
        ("dicomesh-update-recover.service", update_cli.parser),
    ],
)
def test_execstart_arguments_parse(
    unit: str, parser: Callable[[], argparse.ArgumentParser]
) -> None:
    """The firmware units' ExecStart lines are accepted by the entry points they call."""
    argv = exec_start(UNITS / unit)
    assert argv[0].startswith(f"{SLOT}/bin/")
    assert argv[0].rsplit("/", 1)[1] == parser().prog
    parser().parse_args(argv[1:])  # SystemExit (usage error) fails the test


@pytest.fixture
def notify() -> Iterator[NotifyListener]:
    # A short path (AF_UNIX paths are limited to 108 bytes), reachable by any user: the
    # credentials test runs the gateway as nobody.
    directory = Path(tempfile.mkdtemp(prefix="dm-sd-"))
    directory.chmod(0o755)
    listener = NotifyListener(directory)
    listener.path.chmod(0o666)
    yield listener
    listener.close()
    shutil.rmtree(directory)


@contextlib.contextmanager
def unit_gateway(
    workdir: Path, notify: NotifyListener, wrapper: list[str] | None = None
) -> Iterator[tuple[subprocess.Popen, dict, Path]]:
    """dicomesh.service's ExecStart with the state path moved under `workdir`, the config file
    where the first-boot unit puts it (state_dir/dicomesh.toml, free ports for the test) and
    WATCHDOG_USEC as systemd sets it from WatchdogSec (0.4 s to keep the test short).
    Yields (process, config, log path) once READY=1 came; stopped on exit."""
    argv = exec_start(UNITS / "dicomesh.service")
    assert argv[0] == f"{SLOT}/bin/dicomesh"
    state = workdir / "state"
    state.mkdir()
    argv = [str(Path(sys.executable).parent / "dicomesh")] + [
        a.replace(STATE, str(state)) for a in argv[1:]
    ]
    assert str(state) in argv
    config = {
        "dicom": {"port": free_port(), "listen": LOOPBACK},
        "mesh": {"port": free_port(), "address": LOOPBACK, "name": "sd-test"},
        "web": {"port": free_port(), "listen": [LOOPBACK], "zeroconf": False},
    }
    (state / "dicomesh.toml").write_text(tomli_w.dumps(config))
    if wrapper:
        for path in (workdir, state, state / "dicomesh.toml"):
            os.chown(path, NOBODY, NOBODY)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "400000",
        "PYTHONPATH": str(REPO),
    }
    log = workdir / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*(wrapper or []), *argv], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir
        )
        try:
            notify.wait_for("READY", 30, proc)
            yield proc, config, log
        finally:
            stop_process(proc, 10)


def test_execstart_runs_gateway_with_notify_and_watchdog(
    tmp_path: Path, notify: NotifyListener
) -> None:
    """READY=1, then WATCHDOG=1 at half of WatchdogSec, then STOPPING=1 and exit 0 on SIGTERM
    (what systemd sends on stop), with the unit's own command line and state layout."""
    with unit_gateway(tmp_path, notify) as (proc, config, log):
        ready = notify.wait_for("READY", 0)
        assert ready["MAINPID"] == str(proc.pid)
        assert f"on {LOOPBACK}:{config['dicom']['port']}" in ready["STATUS"]
        pings = notify.wait_count("WATCHDOG", 2, timeout=2.0)
        assert len(pings) >= 2, notify.messages
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        notify.wait_for("STOPPING", timeout=2)
    order = [key for msg in notify.messages for key in msg if key in ("READY", "STOPPING")]
    first_ping = next(i for i, msg in enumerate(notify.messages) if "WATCHDOG" in msg)
    ready_at = next(i for i, msg in enumerate(notify.messages) if "READY" in msg)
    assert order == ["READY", "STOPPING"], notify.messages
    assert ready_at < first_ping, notify.messages
    # The gateway used the state directory from the unit and the config found there.
    assert "Traceback" not in log.read_text()
    assert str(tmp_path / "state") in log.read_text()


def unit_credentials() -> list[str]:
    """setpriv(1) arguments giving a process what dicomesh.service gives the gateway: a
    non-root user, exactly the unit's capabilities (bounding + ambient), no_new_privs."""
    text = (UNITS / "dicomesh.service").read_text()

    def caps(key: str) -> str:
        match = re.search(rf"^{key}=(.*)$", text, re.MULTILINE)
        assert match, key
        return ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in match[1].split())])

    return [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        f"--bounding-set={caps('CapabilityBoundingSet')}",
        f"--inh-caps={caps('AmbientCapabilities')}",
        f"--ambient-caps={caps('AmbientCapabilities')}",
        "--no-new-privs",
    ]  # fmt: skip


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A work directory outside the root-only pytest tmp tree (chowned by unit_gateway)."""
    path = Path(tempfile.mkdtemp(prefix="dm-sd-nobody-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to user nobody")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
def test_gateway_runs_with_the_units_credentials(nobody_dir: Path, notify: NotifyListener) -> None:
    """Not root, CAP_NET_ADMIN only, no_new_privs (User=, CapabilityBoundingSet=,
    AmbientCapabilities=, NoNewPrivileges= of the unit, applied by setpriv instead of systemd):
    the gateway starts, sees CAP_NET_ADMIN (no "stays off" line) and stops cleanly."""
    with unit_gateway(nobody_dir, notify, unit_credentials()) as (proc, _config, log):
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        )
        assert status["Uid"].split()[0] == str(NOBODY)
        net_admin = f"{1 << CAP_NET_ADMIN:016x}"
        assert [status[k].strip() for k in ("CapEff", "CapBnd", "CapAmb")] == [net_admin] * 3
        assert status["NoNewPrivs"].strip() == "1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert "CAP_NET_ADMIN" not in text, text
    assert "Traceback" not in text, text
