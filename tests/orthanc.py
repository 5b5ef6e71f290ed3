"""Orthanc (Debian, 1.10) as a real PACS for tests and bench: own config, temp storage, free
loopback ports, stopped on exit.

Orthanc's DICOM side is DCMTK, so ``TCP_NODELAY=1`` in its environment turns Nagle off for
its DICOM associations (``tcp_nodelay=False`` to measure with Nagle on). Orthanc listens on
all interfaces (1.10 has no bind option); RemoteAccessAllowed=false keeps its REST API to
localhost, and tests only talk to it over loopback.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from dcmtk import dcmtk_env
from procs import LOOPBACK, free_port, stop_process, wait_for_port

ORTHANC_BINARY = "/usr/sbin/Orthanc"

# No proxy for loopback REST calls, whatever http_proxy says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Orthanc:
    """Orthanc on free loopback ports with storage in ``workdir`` (default: a temp dir).

    ``modalities`` maps a symbolic name to ``(ae_title, host, port)``: the C-MOVE
    destinations Orthanc knows. ``config_overrides`` is merged last into the JSON config
    (Orthanc 1.10 key names, see /etc/orthanc/orthanc.json).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        tcp_nodelay: bool = True,
        startup_timeout: float = 30.0,
        binary: str = ORTHANC_BINARY,
    ) -> None:
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self.ae_title = ae_title
        self.host = LOOPBACK
        self.dicom_port = free_port()
        self.http_port = free_port()
        self._modalities = dict(modalities or {})
        self._overrides = dict(config_overrides or {})
        self._tcp_nodelay = tcp_nodelay
        self._startup_timeout = startup_timeout
        self._binary = binary
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None
        self._logfile = None
        self.workdir: Path | None = None

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """Orthanc's combined stdout/stderr."""
        assert self.workdir is not None, "Orthanc not started"
        return self.workdir / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The JSON configuration this instance runs with."""
        assert self.workdir is not None, "Orthanc not started"
        storage = str(self.workdir / "db")
        cfg: dict[str, Any] = {
            "Name": f"test-{self.ae_title}",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            # Orthanc's default, stated explicitly: fsync each stored file before answering.
            "SyncStorageArea": True,
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            # Test SCUs (findscu, getscu, movescu, our gateway) are not registered modalities.
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {name: list(entry) for name, entry in self._modalities.items()},
            "SaveJobs": False,
        }
        cfg.update(self._overrides)
        return cfg

    def __enter__(self) -> Orthanc:
        if self._workdir_arg is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="orthanc-")
            self.workdir = Path(self._tmp.name)
        else:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            # A port can still be taken between free_port() and Orthanc's bind (another
            # process's server): then start again on new ports, a bounded number of times.
            for attempt in range(3):
                try:
                    self._start()
                    break
                except RuntimeError:
                    if attempt == 2 or "already in use" not in self._log_tail():
                        raise
                    self._stop_process()
                    self.dicom_port, self.http_port = free_port(), free_port()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        assert self.workdir is not None
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self._logfile = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [self._binary, "--no-jobs", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(self._tcp_nodelay),
        )
        self._wait_ready()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop Orthanc (terminate, wait, kill) and remove its temp dir if it made one."""
        self._stop_process()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _stop_process(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=15.0)
            self._proc = None
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._proc.returncode}:\n{self._log_tail()}"
                )
            try:
                self.rest("/system", timeout=1.0)
                break
            except (OSError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Orthanc REST not up after {self._startup_timeout} s:\n{self._log_tail()}"
                )
            time.sleep(0.1)
        remaining = max(1.0, deadline - time.monotonic())
        wait_for_port(self.host, self.dicom_port, remaining, proc=self._proc)

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def rest(self, path: str, *, timeout: float = 10.0) -> Any:
        """GET ``path`` from the REST API and decode the JSON answer."""
        with _OPENER.open(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: Any, *, timeout: float = 60.0) -> Any:
        """POST ``body`` (JSON-encoded unless bytes) to the REST API; decode the JSON answer."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with _OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def instances_count(self) -> int:
        """Number of instances Orthanc has stored."""
        return int(self.rest("/statistics")["CountInstances"])
