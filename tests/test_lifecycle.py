"""Gateway lifecycle as systemd and operators see it: signals, sd_notify, shutdown grace,
watchdog, config errors, locked state, busy port, running unprivileged, development defaults.

Every gateway here is a real `dicomesh run` subprocess on loopback (tests/gateway.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from dcmtk import echoscu, storescu
from gateway import DICOMESH, REPO, Gateway
from procs import LOOPBACK, free_port
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from studygen import SeriesInfo

from appliance.config import Config, load_config
from appliance.schema import load

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
DROP_TO_NOBODY = [
    "setpriv",
    f"--reuid={NOBODY}",
    f"--regid={NOBODY}",
    "--clear-groups",
    "--inh-caps=-all",
]
NO_NET_ADMIN = "no CAP_NET_ADMIN"


def signal_and_wait(gw: Gateway, sig: int, timeout: float = 10.0) -> tuple[int, float]:
    """Send `sig` to the gateway; its exit code and the seconds it took to exit."""
    assert gw.proc is not None
    started = time.monotonic()
    gw.proc.send_signal(sig)
    rc = gw.proc.wait(timeout=timeout)
    return rc, time.monotonic() - started


def run_to_exit(
    args: list[str], cwd: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """`dicomesh <args>` that is expected to exit by itself (config tools, failed starts)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run(
        [*DICOMESH, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        check=False,
    )


def scu_association(gw: Gateway, calling: str = "HOLDER") -> tuple[AE, Association]:
    """A pynetdicom association to the gateway (Verification + CT storage)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(gw.host, gw.port, ae_title=gw.ae_title)
    assert assoc.is_established
    return ae, assoc


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `condition` until true or `timeout` s passed; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return condition()
        time.sleep(interval)
    return True


def listening(port: int) -> bool:
    """Whether a TCP socket listens on `port` (read from the kernel: connecting to find out
    would itself open a connection the gateway has to wait for)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def find_instance(gw: Gateway, series: SeriesInfo, sop_uid: str) -> list[pydicom.Dataset]:
    return gw.find_images(series.study_uid, series.series_uid, sop_uid)


# ---------------------------------------------------------------- 1. signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_idle_gateway(gateway_factory, sig: int) -> None:
    gw = gateway_factory()
    assert gw.proc is not None and gw.notify is not None
    pid = gw.proc.pid
    rc, seconds = signal_and_wait(gw, sig)
    assert rc == 0, gw.log()
    assert seconds < 5, f"took {seconds:.1f} s to stop"
    gw.notify.wait_for("STOPPING", timeout=2)
    keys = [next(iter(msg)) for msg in gw.notify.messages if "WATCHDOG" not in msg]
    assert keys.index("READY") < keys.index("STOPPING"), gw.notify.messages
    ready = gw.notify.wait_for("READY", timeout=0)
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(pid)
    assert f"{gw.ae_title} on {LOOPBACK}:{gw.port}" in ready["STATUS"]
    assert gw.notify.wait_for("STOPPING", timeout=0)["STOPPING"] == "1"
    log = gw.log()
    assert re.search(r"\bready\b", log), log
    assert re.search(r"\bstopped\b", log), log
    assert "Traceback" not in log, log


# ---------------------------------------------------------------- 2. shutdown grace


def test_idle_association_aborted_after_grace(gateway_factory) -> None:
    grace = 1.0
    gw = gateway_factory(dicom={"shutdown_grace_s": grace})
    ae, assoc = scu_association(gw)
    try:
        rc, seconds = signal_and_wait(gw, signal.SIGTERM)
        assert rc == 0, gw.log()
        # The association got the whole grace period, and not much more.
        assert grace - 0.1 <= seconds < grace + 2.5, f"exited after {seconds:.2f} s"
        assert wait_until(lambda: assoc.is_aborted, timeout=5), "SCU did not see an abort"
        log = gw.log()
        assert re.search(r"abort\w* 1 association", log), log
        assert "Traceback" not in log, log
    finally:
        ae.shutdown()


def test_store_in_flight_during_grace_is_durable(gateway_factory, small_series) -> None:
    grace = 5.0
    gw = gateway_factory(dicom={"shutdown_grace_s": grace})
    assert gw.notify is not None
    ds = pydicom.dcmread(small_series.paths[0])
    ae, assoc = scu_association(gw)
    assert listening(gw.port)
    try:
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        gw.notify.wait_for("STOPPING", timeout=5)
        # Stopped accepting: the gateway is in its grace period now.
        assert wait_until(lambda: not listening(gw.port), timeout=5)
        started = time.monotonic()
        rsp = assoc.send_c_store(ds)
        assert rsp.Status == 0x0000, rsp
        assoc.release()
        assert assoc.is_released
        rc = gw.proc.wait(timeout=10)
        # Nothing left open: the gateway does not sit out the rest of the grace period.
        assert time.monotonic() - started < grace, "waited for the whole grace period"
        assert rc == 0, gw.log()
    finally:
        ae.shutdown()
    assert "abort" not in gw.log().lower(), gw.log()
    gw.stop()

    # The acknowledged instance survived the shutdown: a new gateway on the same state finds it.
    again = Gateway(gw.workdir, state_dir=str(gw.state_dir))
    try:
        again.start()
        found = find_instance(again, small_series, str(ds.SOPInstanceUID))
        assert [str(r.SOPInstanceUID) for r in found] == [str(ds.SOPInstanceUID)]
    finally:
        again.stop()


# ---------------------------------------------------------------- 3. watchdog


@pytest.mark.parametrize(
    "own_pid",
    [False, True],
    ids=["WATCHDOG_PID unset", "WATCHDOG_PID = main pid"],
)
def test_watchdog_pings_while_healthy(gateway_factory, own_pid: bool) -> None:
    gw = gateway_factory(start=False)
    env: dict[str, str | None] = {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": None}
    # As systemd does: WATCHDOG_PID names the main process (the shell execs the gateway).
    wrapper = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh"] if own_pid else []
    gw.start(env=env, wrapper=wrapper)
    assert gw.notify is not None and gw.proc is not None
    assert gw.notify.wait_for("READY", 0)["MAINPID"] == str(gw.proc.pid)
    pings = gw.notify.wait_count("WATCHDOG", 3, timeout=1.5)
    assert len(pings) >= 3, gw.notify.messages
    assert all(msg["WATCHDOG"] == "1" for msg in pings)


def test_watchdog_meant_for_another_process_is_ignored(gateway_factory) -> None:
    gw = gateway_factory(start=False)
    # systemd sets WATCHDOG_PID to the main pid; here it names the test runner.
    gw.start(env={"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())})
    assert gw.notify is not None and gw.proc is not None
    gw.notify.listen(1.2)  # three whole watchdog periods
    assert not [msg for msg in gw.notify.messages if "WATCHDOG" in msg], gw.notify.messages
    assert gw.proc.poll() is None


# ---------------------------------------------------------------- 4. config errors, overrides


def test_run_reports_every_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        textwrap.dedent(
            """\
            state_dir = "relative/state"
            [dicom]
            port = 70000
            max_associations = 0
            [store]
            compression = "zsdt"
            """
        )
    )
    result = run_to_exit(["run", "--config", str(bad)], tmp_path)
    assert result.returncode == 2, result
    err = result.stderr
    for expected in (
        "state_dir: must be an absolute path",
        "dicom.port: must be 1-65535",
        "dicom.max_associations: must be > 0",
        "store.compression: expected one of 'off', 'zstd'",
    ):
        assert expected in err, err
    assert "Traceback" not in err, err
    assert not (tmp_path / "relative").exists()


def test_config_check_prints_loadable_effective_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        textwrap.dedent(
            f"""\
            state_dir = "{tmp_path / "state"}"
            [log]
            level = "debug"
            [dicom]
            ae_title = "GOODAE"
            port = 11199
            listen = "127.0.0.1"
            allowed_calling = ["WS1", "CT01"]
            shutdown_grace_s = 2.5
            [[dicom.nodes]]
            ae_title = "WS1"
            host = "127.0.0.1"
            port = 11113
            [store]
            max_bytes = "2 GiB"
            compression = "zstd"
            """
        )
    )
    result = run_to_exit(["config", "check", str(good)], tmp_path)
    assert result.returncode == 0, result
    printed = tomllib.loads(result.stdout)
    assert printed["state_dir"] == str(tmp_path / "state")
    assert printed["log"]["level"] == "debug"
    assert printed["dicom"]["ae_title"] == "GOODAE"
    assert printed["dicom"]["port"] == 11199
    assert printed["dicom"]["allowed_calling"] == ["WS1", "CT01"]
    assert printed["dicom"]["shutdown_grace_s"] == 2.5
    assert printed["dicom"]["nodes"] == [{"ae_title": "WS1", "host": "127.0.0.1", "port": 11113}]
    assert printed["store"]["max_bytes"] == 2 * 1024**3
    assert printed["store"]["compression"] == "zstd"
    # The printed config is the effective one: defaults included, same Config when loaded.
    assert load(Config, printed) == load_config(good)
    assert printed["dicom"]["max_associations"] == 32


def test_config_check_suggests_the_key_meant(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text('[dicom]\nae_tilte = "X"\n')
    result = run_to_exit(["config", "check", str(typo)], tmp_path)
    assert result.returncode == 2, result
    assert "dicom.ae_tilte: unknown key (did you mean 'ae_title'?)" in result.stderr, result
    assert result.stdout == ""


def test_command_line_overrides_win_over_the_file(gateway_factory) -> None:
    gw = gateway_factory(start=False, ae_title="FILEAE")
    file_port = gw.port
    cli_port = free_port()
    gw.start(
        args=[
            "run",
            "--config",
            str(gw.config_path),
            "--dicom-port",
            str(cli_port),
            "--ae-title",
            "CLIAE",
        ]
    )
    assert gw.notify is not None
    assert f"CLIAE on {LOOPBACK}:{cli_port}" in gw.notify.wait_for("READY", 0)["STATUS"]
    assert echoscu(LOOPBACK, cli_port, "CLIAE", timeout=15).returncode == 0
    # strict_called_ae: the file's AE title is no longer ours.
    assert echoscu(LOOPBACK, cli_port, "FILEAE", timeout=15).returncode != 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, file_port), timeout=2).close()


# ---------------------------------------------------------------- 5. locked state, 6. busy port


def test_second_gateway_on_same_state_dir_refused(gateway_factory, small_series) -> None:
    first = gateway_factory()
    second = gateway_factory(start=False, state_dir=str(first.state_dir))
    result = run_to_exit(["run", "--config", str(second.config_path)], second.workdir)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "in use by another process" in out, out
    assert "cannot start" in out, out
    assert "Traceback" not in out, out
    # The first one is unaffected.
    assert first.proc is not None and first.proc.poll() is None
    assert echoscu(first.host, first.port, first.ae_title, timeout=15).returncode == 0
    run = storescu(first.host, first.port, first.ae_title, small_series.paths[:2], timeout=30)
    assert run.ok, run.stderr


def test_busy_port_fails_cleanly(gateway_factory) -> None:
    gw = gateway_factory(start=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((LOOPBACK, gw.port))
        holder.listen()
        result = run_to_exit(["run", "--config", str(gw.config_path)], gw.workdir)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    lines = [line for line in out.splitlines() if "cannot start" in line]
    assert len(lines) == 1, out
    assert "in use" in lines[0], out
    assert "Traceback" not in out, out


# ---------------------------------------------------------------- 7. unprivileged


def _nobody_can_run_the_gateway(cwd: Path) -> str | None:
    """Why user nobody cannot run the gateway from this checkout, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to switch to user nobody"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) not installed"
    probe = subprocess.run(
        [*DROP_TO_NOBODY, *DICOMESH[:1], "-c", "import appliance.app, lmdb, pynetdicom, uvloop"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    if probe.returncode != 0:
        return (
            f"user nobody cannot run {DICOMESH[0]} with the repo at {REPO} "
            f"(interpreter, venv or repo not readable by nobody): {probe.stderr.strip()[-200:]}"
        )
    return None


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory owned by nobody, outside the root-only pytest tmp tree."""
    path = Path(tempfile.mkdtemp(prefix="dm-nobody-"))
    try:
        path.chmod(0o755)
        os.chown(path, NOBODY, NOBODY)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_runs_unprivileged_as_nobody(nobody_dir: Path, small_series) -> None:
    if reason := _nobody_can_run_the_gateway(nobody_dir):
        pytest.skip(reason)
    state = nobody_dir / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    gw = Gateway(nobody_dir)  # config (listen on loopback) written by root, readable by all
    port = free_port()
    try:
        gw.start(
            args=[
                "run",
                "--config",
                str(gw.config_path),
                "--state-dir",
                str(state),
                "--dicom-port",
                str(port),
            ],
            wrapper=DROP_TO_NOBODY,
            notify_for_all=True,
        )
        gw.port = port
        assert gw.proc is not None
        assert echoscu(gw.host, port, gw.ae_title, timeout=15).returncode == 0
        run = storescu(gw.host, port, gw.ae_title, small_series.paths[:1], timeout=30)
        assert run.ok, run.stderr
        assert (state / "store" / "data.mdb").stat().st_uid == NOBODY
        assert gw.stop() == 0
    finally:
        gw.stop()
    log = gw.log()
    assert len([line for line in log.splitlines() if NO_NET_ADMIN in line]) == 1, log


def test_root_has_net_admin_and_says_nothing(gateway) -> None:
    if os.geteuid() != 0:
        pytest.skip("not running as root")
    assert gateway.stop() == 0
    assert NO_NET_ADMIN not in gateway.log()
    assert "ready" in gateway.log()


# ---------------------------------------------------------------- 8. development defaults


def test_without_config_state_goes_to_var_in_cwd(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare: the default listen address is 0.0.0.0")
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    gw = Gateway(workdir)
    port = free_port()
    try:
        # No --config: the built-in default listens on every interface. A private network
        # namespace keeps that port off the machine's real interfaces.
        gw.start(
            args=["run", "--dicom-port", str(port)],
            wrapper=["unshare", "--net", "--"],
        )
        assert gw.notify is not None
        assert f":{port}" in gw.notify.wait_for("READY", 0)["STATUS"]
        assert (workdir / "var").is_dir()
        assert (workdir / "var" / "store" / "gateway.lock").is_file()
        assert f"state in {workdir / 'var'}" in gw.log()
        assert gw.stop() == 0
    finally:
        gw.stop()
    assert sorted(p.name for p in workdir.iterdir()) == sorted(
        ["var", gw.config_path.name, gw.log_path.name]
    )
