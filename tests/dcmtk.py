"""Thin drivers for the DCMTK command-line tools (echoscu, storescu, findscu, getscu, movescu,
storescp), run as subprocesses with timeouts.

Debian's DCMTK leaves Nagle's algorithm on, which stalls each image ~40-60 ms on loopback;
DCMTK reads the ``TCP_NODELAY`` environment variable when it opens an association, so every
driver sets ``TCP_NODELAY=1`` unless called with ``tcp_nodelay=False`` (then "0").

How storescu results are read (DCMTK 3.6.7): ``-v`` prints the status only as text,
"Received Store Response (Refused: OutOfResources)", which cannot be mapped back to one code.
So storescu runs with a log4cplus config (``-lc``) that puts only storescu's own logger at
DEBUG; storescu then dumps each response, and the parser pairs lines, in order, on stderr::

    INFO: Sending file: /tmp/x/CT001_00001.dcm
    INFO: Received Store Response
    DEBUG: DIMSE Status                  : 0x0000: Success
    INFO: Sending file: /tmp/x/CT001_00002.dcm
    INFO: Received Store Response
    DEBUG: DIMSE Status                  : 0xa700: Refused: Out of resources

A file whose "Sending file" line has no status after it (unreadable file, no presentation
context, association aborted) gets status None. By default storescu stops at the first
non-success status; pass ``extra=("-nh",)`` to keep sending.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pydicom
from procs import LOOPBACK, free_port, stop_process, wait_for_port

DEFAULT_TIMEOUT = 60.0
_MODEL_FLAGS = {"study": "-S", "patient": "-P"}

# log4cplus config for storescu: INFO for everything, DEBUG only for storescu's own logger
# (that one dumps the C-STORE-RSP incl. "DIMSE Status"), all of it to stderr, one line each.
_STORESCU_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.logger.dcmtk.apps.storescu = DEBUG
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.logToStdErr = true
log4cplus.appender.console.ImmediateFlush = true
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %p: %m%n
"""
_SENDING_RE = re.compile(r"Sending file: (?P<path>.+?)\s*$")
_RESPONSE_RE = re.compile(r"Received Store Response(?: \((?P<text>.*)\))?\s*$")
_STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x(?P<code>[0-9a-fA-F]{1,4})\b")


class DcmtkError(RuntimeError):
    """A DCMTK tool failed; ``result`` holds its CompletedProcess."""

    def __init__(self, message: str, result: subprocess.CompletedProcess) -> None:
        super().__init__(f"{message}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
        self.result = result


def dcmtk_env(tcp_nodelay: bool = True) -> dict[str, str]:
    """Environment for a DCMTK-based process (also Orthanc): os.environ + TCP_NODELAY=1|0."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1" if tcp_nodelay else "0"
    return env


def _run(
    args: Sequence[str],
    *,
    timeout: float,
    tcp_nodelay: bool,
    cwd: Path | None = None,
    wrapper: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    # subprocess.run kills the child itself if the timeout expires.
    return subprocess.run(
        [*wrapper, *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=dcmtk_env(tcp_nodelay),
        cwd=cwd,
        check=False,
    )


def _model_flag(model: str) -> str:
    try:
        return _MODEL_FLAGS[model]
    except KeyError:
        raise ValueError(f"model must be one of {sorted(_MODEL_FLAGS)}, not {model!r}") from None


def _key_args(keys: Iterable[str]) -> list[str]:
    args: list[str] = []
    for key in keys:
        args += ["-k", key]
    return args


def echoscu(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    *,
    timeout: float = DEFAULT_TIMEOUT,
    tcp_nodelay: bool = True,
) -> subprocess.CompletedProcess:
    """C-ECHO ``called_ae`` at host:port; returncode 0 means the echo succeeded."""
    return _run(
        ["echoscu", "-aet", calling_ae, "-aec", called_ae, host, str(port)],
        timeout=timeout,
        tcp_nodelay=tcp_nodelay,
    )


@dataclass(frozen=True)
class StoreRun:
    """Outcome of one storescu run: per-file DIMSE status in send order (None: no response)."""

    returncode: int
    results: list[tuple[Path, int | None]]
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        """storescu exited 0 and every file it sent got status 0x0000 (Success)."""
        return self.returncode == 0 and all(status == 0 for _, status in self.results)


def parse_storescu_log(text: str) -> list[tuple[Path, int | None]]:
    """Pair each "Sending file" line with the DIMSE status of the response that follows it."""
    results: list[tuple[Path, int | None]] = []
    awaiting = False  # a "Received Store Response" was seen and its status is still due
    for line in text.splitlines():
        if m := _SENDING_RE.search(line):
            results.append((Path(m["path"]), None))
            awaiting = False
        elif (m := _RESPONSE_RE.search(line)) and results:
            awaiting = True
            if m["text"] == "Success":  # -v format without the debug dump
                results[-1] = (results[-1][0], 0x0000)
        elif awaiting and (m := _STATUS_RE.search(line)):
            results[-1] = (results[-1][0], int(m["code"], 16))
            awaiting = False
    return results


def storescu(
    host: str,
    port: int,
    called_ae: str,
    paths_or_dir: Path | str | Iterable[Path | str],
    calling_ae: str = "STORESCU",
    extra: Sequence[str] = (),
    timeout: float = 600.0,
    *,
    tcp_nodelay: bool = True,
    wrapper: Sequence[str] = (),
) -> StoreRun:
    """C-STORE files (and the files directly inside directories, ``+sd``) on one association.

    ``wrapper`` is a command prefix, e.g. ``["ip", "netns", "exec", ns]`` to send from inside
    a network namespace (to a gateway on that namespace's own loopback).
    """
    if isinstance(paths_or_dir, str | Path):
        paths_or_dir = [paths_or_dir]
    inputs = [Path(p).absolute() for p in paths_or_dir]
    if not inputs:
        raise ValueError("nothing to send")
    scan = ["+sd"] if any(p.is_dir() for p in inputs) else []
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        log_config = Path(tmp) / "log.cfg"
        log_config.write_text(_STORESCU_LOG_CONFIG)
        args = [
            "storescu",
            "-lc",
            str(log_config),
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            *scan,
            *extra,
            host,
            str(port),
            *map(str, inputs),
        ]
        start = time.monotonic()
        proc = _run(args, timeout=timeout, tcp_nodelay=tcp_nodelay, wrapper=wrapper)
        seconds = time.monotonic() - start
    return StoreRun(
        proc.returncode, parse_storescu_log(proc.stderr), proc.stdout, proc.stderr, seconds
    )


def findscu(
    host: str,
    port: int,
    called_ae: str,
    keys: Sequence[str],
    model: str = "study",
    calling_ae: str = "FINDSCU",
    workdir: Path | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    tcp_nodelay: bool = True,
    wrapper: Sequence[str] = (),
) -> list[pydicom.Dataset]:
    """C-FIND with ``-k`` keys; return the response identifiers in order; DcmtkError on failure.

    findscu ``-X`` writes rsp0001.dcm... into its cwd: ``workdir`` (must be empty), or a
    temporary directory that is removed afterwards. ``wrapper``: a command prefix, as for
    storescu.
    """
    with tempfile.TemporaryDirectory(prefix="findscu-") as tmp:
        cwd = Path(workdir) if workdir is not None else Path(tmp)
        cwd.mkdir(parents=True, exist_ok=True)
        args = [
            "findscu",
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            _model_flag(model),
            "-X",
            *_key_args(keys),
            host,
            str(port),
        ]
        proc = _run(args, timeout=timeout, tcp_nodelay=tcp_nodelay, cwd=cwd, wrapper=wrapper)
        if proc.returncode != 0:
            raise DcmtkError(f"findscu exited with {proc.returncode}", proc)
        return [pydicom.dcmread(p) for p in sorted(cwd.glob("rsp*.dcm"))]


def getscu(
    host: str,
    port: int,
    called_ae: str,
    keys: Sequence[str],
    outdir: Path,
    model: str = "study",
    calling_ae: str = "GETSCU",
    extra: Sequence[str] = (),
    *,
    timeout: float = 600.0,
    tcp_nodelay: bool = True,
    wrapper: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """C-GET the matches of ``keys`` into ``outdir`` (created if missing); ``wrapper``: a
    command prefix, as for storescu."""
    Path(outdir).mkdir(parents=True, exist_ok=True)
    args = [
        "getscu",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        _model_flag(model),
        "-od",
        str(outdir),
        *extra,
        *_key_args(keys),
        host,
        str(port),
    ]
    return _run(args, timeout=timeout, tcp_nodelay=tcp_nodelay, wrapper=wrapper)


def movescu(
    host: str,
    port: int,
    called_ae: str,
    keys: Sequence[str],
    dest_ae: str,
    model: str = "study",
    calling_ae: str = "MOVESCU",
    extra: Sequence[str] = (),
    *,
    timeout: float = 600.0,
    tcp_nodelay: bool = True,
) -> subprocess.CompletedProcess:
    """C-MOVE the matches of ``keys`` to ``dest_ae`` (which the SCP must know, e.g. a StoreSCP)."""
    args = [
        "movescu",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-aem",
        dest_ae,
        _model_flag(model),
        *extra,
        *_key_args(keys),
        host,
        str(port),
    ]
    return _run(args, timeout=timeout, tcp_nodelay=tcp_nodelay)


class StoreSCP:
    """DCMTK ``storescp`` on a free port, storing into ``outdir``; a context manager.

    Accepts every transfer syntax it supports (``+xa``) unless ``accept_all=False``.
    storescp listens on all interfaces (it has no bind option); tests only talk to it over
    loopback (``.host``). Its log goes to an anonymous temporary file, see ``log()``.
    """

    def __init__(
        self,
        outdir: Path,
        ae_title: str = "STORESCP",
        *,
        port: int | None = None,
        accept_all: bool = True,
        extra: Sequence[str] = (),
        tcp_nodelay: bool = True,
        startup_timeout: float = 10.0,
    ) -> None:
        self.dir = Path(outdir)
        self.ae_title = ae_title
        self.host = LOOPBACK
        self.port = port or free_port()
        self._accept_all = accept_all
        self._extra = tuple(extra)
        self._tcp_nodelay = tcp_nodelay
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> StoreSCP:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            "storescp",
            "-aet",
            self.ae_title,
            "-od",
            str(self.dir),
            *(["+xa"] if self._accept_all else []),
            *self._extra,
            str(self.port),
        ]
        self._log = tempfile.TemporaryFile(prefix="storescp-")
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(self._tcp_nodelay),
        )
        try:
            # A bare TCP connect is harmless: storescp logs the dropped association and
            # goes back to listening.
            wait_for_port(self.host, self.port, self._startup_timeout, proc=self._proc)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop storescp (terminate, wait, kill) and drop its log; idempotent."""
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def files(self) -> list[Path]:
        """Files received so far, sorted by name (storescp names them "<modality>.<SOP UID>")."""
        return sorted(p for p in self.dir.iterdir() if p.is_file())

    def log(self) -> str:
        """storescp's combined stdout/stderr so far (empty once closed)."""
        if self._log is None:
            return ""
        # pread: the file offset is shared with storescp's stdout, so never seek it.
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
