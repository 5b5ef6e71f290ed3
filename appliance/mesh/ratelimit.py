"""A token bucket for pacing uploads (asyncio side)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Allows `rate` bytes per second on average with bursts up to `burst` bytes."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._clock = clock
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, amount: int) -> None:
        """Wait until `amount` bytes may be sent (callers queue up in order)."""
        async with self._lock:
            self._refill()
            self._tokens -= amount  # may go negative for amounts above the burst
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)
