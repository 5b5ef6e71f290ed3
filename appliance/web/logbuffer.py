"""Recent log lines for the page: a bounded ring buffer fed by a logging handler.

The lines are what the gateway logs anyway, which carry no patient attribute (see logs.py);
the buffer adds nothing to them."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}  # fmt: skip


@dataclass(frozen=True)
class LogLine:
    seq: int
    time: float
    level: str
    logger: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LogBuffer(logging.Handler):
    """Keeps the last `capacity` records; thread-safe (handlers log from many threads)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(level=logging.DEBUG)
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._seq = 0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        except Exception:  # a bad %-format must not break the caller
            message = str(record.msg)
        with self._guard:
            self._seq += 1
            self._lines.append(
                LogLine(self._seq, record.created, record.levelname.lower(), record.name, message)
            )

    def install(self) -> None:
        logging.getLogger().addHandler(self)

    def uninstall(self) -> None:
        logging.getLogger().removeHandler(self)

    def recent(
        self, *, level: str = "debug", contains: str = "", limit: int = 200, after: int = 0
    ) -> list[LogLine]:
        """The newest matching lines, oldest first."""
        floor = LEVELS.get(level, logging.DEBUG)
        needle = contains.lower()
        with self._guard:
            lines = list(self._lines)
        picked = [
            line for line in lines
            if line.seq > after
            and LEVELS.get(line.level, logging.ERROR) >= floor
            and (not needle or needle in line.message.lower() or needle in line.logger)
        ]  # fmt: skip
        return picked[-limit:] if limit > 0 else []
