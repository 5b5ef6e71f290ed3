"""Process and port helpers for tests and bench: free ports, readiness waits, clean stops.

These modules live in tests/ without an ``__init__.py``: pytest puts tests/ on sys.path, so
they import each other by basename (``from procs import free_port``); bench/ scripts add
tests/ to sys.path to use them.
"""

from __future__ import annotations

import socket
import subprocess
import time

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on ``host`` a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    *,
    proc: subprocess.Popen | None = None,
    interval: float = 0.05,
) -> None:
    """Block until ``host:port`` accepts a TCP connection; raise TimeoutError after ``timeout`` s.

    If ``proc`` is given and exits first, raise RuntimeError at once instead of waiting.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {port} opened")
        try:
            with socket.create_connection((host, port), timeout=max(interval, 0.5)):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not accepting connections after {timeout} s")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """Stop a process this test started: SIGTERM, wait ``timeout`` s, then SIGKILL; return rc."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode
