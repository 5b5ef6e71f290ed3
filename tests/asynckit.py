"""Running async test bodies: the test fails if the event loop was blocked or tasks leaked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "took" in record.getMessage() and "Executing" in record.getMessage():
            self.messages.append(record.getMessage())


def run(coro: Coroutine[Any, Any, Any], *, max_block_s: float = 0.1) -> Any:
    """asyncio.run in debug mode; fail if a callback blocked the loop longer than
    `max_block_s` or if tasks were left running."""
    slow = _SlowCallbacks()
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(slow)

    async def main() -> Any:
        asyncio.get_running_loop().slow_callback_duration = max_block_s
        result = await coro
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in leftover:
            task.cancel()
        assert not leftover, f"leaked tasks: {leftover}"
        return result

    try:
        result = asyncio.run(main(), debug=True)
    finally:
        asyncio_log.removeHandler(slow)
    assert not slow.messages, f"event loop blocked: {slow.messages}"
    return result


async def until(predicate: Callable[[], bool], timeout: float = 20.0, poll_s: float = 0.05) -> None:
    """Wait on the running loop until `predicate()` holds; fail after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(poll_s)
