"""Process and port helpers for tests and bench: free ports, readiness waits, clean stops.

These modules live in tests/ without an ``__init__.py``: pytest puts tests/ on sys.path, so
they import each other by basename (``from procs import free_port``); bench/ scripts add
tests/ to sys.path to use them.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Ports handed out by this process: never handed out twice, even after their holder closed.
_given: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on ``host`` a moment ago and that the kernel will not
    pick for an outgoing connection.

    Why not ``bind(0)``: that port comes from the ephemeral range, and between closing the
    probe socket and the server binding it any outgoing connection (a client test, Orthanc's
    own HTTP keep-alives) may take it, so a server under test failed with "already in use".
    Ports are drawn at random below the ephemeral range instead.
    """
    low, _high = _ephemeral_range()
    top = max(low - 1, 11000)
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(10000, top)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _given.add(port)
        return port
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
