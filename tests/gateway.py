"""A real `dicomesh run` process for tests and benchmarks, ready when it says READY=1 over a
NOTIFY_SOCKET we listen on (the same protocol systemd uses)."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
from procs import LOOPBACK, free_port, stop_process

REPO = Path(__file__).resolve().parent.parent
DICOMESH = [sys.executable, "-m", "appliance"]


class NotifyListener:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float, proc: subprocess.Popen | None = None) -> dict:
        """The first message carrying `key` (e.g. READY), waiting at most `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.messages:
                if key in msg:
                    return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {key}= notification within {timeout} s")
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode} before {key}")
            self.receive(min(remaining, 0.2))

    def wait_count(self, key: str, count: int, timeout: float) -> list[dict]:
        """Messages carrying `key`, once there are `count` of them or `timeout` s passed."""
        deadline = time.monotonic() + timeout
        while True:
            found = [msg for msg in self.messages if key in msg]
            remaining = deadline - time.monotonic()
            if len(found) >= count or remaining <= 0:
                return found
            self.receive(min(remaining, 0.2))

    def listen(self, seconds: float) -> None:
        """Record every message that arrives in the next `seconds` (for "none came" checks)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.receive(remaining)

    def receive(self, timeout: float) -> bool:
        """Record at most one message, waiting up to `timeout` s; whether one came."""
        self.sock.settimeout(max(timeout, 1e-3))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return False
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        return True

    def close(self) -> None:
        self.sock.close()


class Gateway:
    """Start/stop/kill a gateway subprocess with a config built from keyword sections."""

    def __init__(self, workdir: Path, *, ae_title: str = "DICOMESH", **sections: Any) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.host = LOOPBACK
        self.port = free_port()
        self.state_dir = workdir / "state"
        self.log_path = workdir / "gateway.log"
        dicom = {"ae_title": ae_title, "port": self.port, "listen": LOOPBACK}
        dicom.update(sections.pop("dicom", {}))
        config: dict[str, Any] = {"state_dir": str(self.state_dir), "dicom": dicom}
        config["log"] = {"level": "info", **sections.pop("log", {})}
        # Each gateway gets its own mesh port and name, so several can run side by side.
        mesh = {"port": free_port(), "name": f"gw-{self.port}", "address": LOOPBACK}
        mesh.update(sections.pop("mesh", {}))
        config["mesh"] = mesh
        self.mesh_address, self.mesh_port, self.mesh_name = (
            mesh["address"],
            mesh["port"],
            mesh["name"],
        )
        # The admin page on its own port, no zeroconf (tests that want it say so).
        webcfg = {"port": free_port(), "listen": [LOOPBACK], "zeroconf": False}
        webcfg.update(sections.pop("web", {}))
        config["web"] = webcfg
        self.web_port = webcfg["port"]
        config.update(sections)
        self.config_path = workdir / "dicomesh.toml"
        self.config_path.write_text(tomli_w.dumps(config))
        self.proc: subprocess.Popen | None = None
        self.netns: str | None = None  # network namespace it runs in (None: the caller's)
        self.notify: NotifyListener | None = None
        self._log = None

    def start(
        self,
        timeout: float = 30.0,
        env: dict[str, str | None] | None = None,
        *,
        args: Sequence[str] | None = None,
        wrapper: Sequence[str] = (),
        notify_for_all: bool = False,
        netns: str | None = None,
    ) -> Gateway:
        """Run the gateway and wait for READY=1.

        `env` entries override os.environ (None removes a variable); `args` replace the
        default `run --config <config_path>` command-line arguments; `wrapper` is a command
        prefix (e.g. setpriv, unshare); `notify_for_all` lets any user send to the notify
        socket (for a gateway run under another uid); `netns` runs it inside that network
        namespace (`ip netns exec`, before `wrapper`), where `.host` is that namespace's own
        loopback: the DCMTK helpers below then run there too (`.tool_prefix`).
        """
        self.netns = netns
        # A short socket path: AF_UNIX paths are limited to 108 bytes.
        self._notify_dir = Path(tempfile.mkdtemp(prefix="dm-notify-"))
        self.notify = NotifyListener(self._notify_dir)
        if notify_for_all:
            self._notify_dir.chmod(0o755)
            self.notify.path.chmod(0o666)
        full_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path)}
        for name, value in (env or {}).items():
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        full_env["PYTHONPATH"] = str(REPO)
        if args is None:
            args = ["run", "--config", str(self.config_path)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in _cleanup)
        self.proc = subprocess.Popen(
            [*self.tool_prefix, *wrapper, *DICOMESH, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=self.workdir,
        )
        try:
            self.notify.wait_for("READY", timeout, self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def admit(self, other: Gateway, role: str = "clinic") -> None:
        """Admit `other` as a mesh peer (as `dicomesh peer add` would)."""
        subprocess.run(
            [*DICOMESH, "peer", "--config", str(self.config_path), "add", other.mesh_name,
             "--key", base64.b64encode(os.urandom(32)).decode(),
             "--address", other.mesh_address, "--port", str(other.mesh_port), "--role", role],
            check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip

    @property
    def tool_prefix(self) -> list[str]:
        """Command prefix for a tool that must reach `.host:.port` (enters `netns` if set)."""
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def find_images(self, study_uid: str, series_uid: str, sop_uid: str = "") -> list[Any]:
        """C-FIND (findscu, Study Root) of a series' instances, or one of them."""
        from dcmtk import findscu  # local: dcmtk imports nothing of ours, keep it optional

        keys = [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study_uid}",
            f"SeriesInstanceUID={series_uid}",
            f"SOPInstanceUID={sop_uid}",
        ]
        return findscu(
            self.host, self.port, self.ae_title, keys, model="study", timeout=30,
            wrapper=self.tool_prefix,
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); the exit code."""
        rc = None
        if self.proc is not None:
            rc = stop_process(self.proc, timeout)
            self.proc = None
        self._cleanup()
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify.path.unlink(missing_ok=True)
            self._notify_dir.rmdir()
            self.notify = None
        if self._log is not None:
            self._log.close()
            self._log = None
