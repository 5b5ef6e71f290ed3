"""systemd's notify protocol (sd_notify(3)) over $NOTIFY_SOCKET, without a dependency."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY/STOPPING/WATCHDOG/STATUS datagrams; a no-op outside systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        # systemd sets WATCHDOG_USEC for the main process; we must ping at least that often.
        self.watchdog_interval = watchdog_usec / 1e6 if watchdog_usec else None

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> Notifier:
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        watchdog = (
            int(usec) if usec and usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        )
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    def send(self, **fields: str | int) -> bool:
        """Send `KEY=value` lines; False when not under systemd or the socket is gone."""
        if not self.address:
            return False
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        # A leading "@" names a socket in the abstract namespace (sd_notify(3)).
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, addr)
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status, mainpid=os.getpid())

    def stopping(self) -> bool:
        return self.send(stopping=1, status="stopping")

    def watchdog(self) -> bool:
        return self.send(watchdog=1)
