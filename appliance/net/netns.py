"""Network namespaces: sockets and processes of the gateway, or of one lab site in tests.

The firmware runs in its own namespace (`netns=None`); tests drive several sites from one
pytest process by naming the namespace each site's sockets and processes belong in.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Callable

from pyroute2.netns import create_socket

NETNS_RUN_DIR = "/var/run/netns"  # where `ip netns add` pins named namespaces
_CLONE_NEWNET = 0x40000000  # linux/sched.h
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def socket_in(netns: str | None, family: int, type: int, proto: int = 0) -> socket.socket:
    """A new socket in `netns` (None: this process's namespace). May block: use an executor."""
    if netns is None:
        return socket.socket(family, type, proto)
    return create_socket(netns, family, type, proto)


def child_setup(netns: str | None) -> Callable[[], None]:
    """A `preexec_fn` that moves the child into `netns` and makes it die with its parent
    (a crashed gateway must not leave tunnel daemons it can no longer account for)."""

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if netns is not None:
            fd = os.open(os.path.join(NETNS_RUN_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)

    return setup
