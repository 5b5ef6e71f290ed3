"""The asyncio side of uplink health: probe each uplink on a fixed period, feed its state
machine, report changes. A cut line is declared down after `down_after` periods at most."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from appliance.net.binding import UplinkBinding
from appliance.net.config import HealthConfig
from appliance.net.health import Health, HealthFSM, ProbeResult
from appliance.net.probe import probe_any

log = logging.getLogger(__name__)

# What to probe right now: the binding and targets can change (an address or DHCP lease
# arrives); None while the uplink cannot be probed at all (which counts as a failure).
ProbePlan = Callable[[], tuple[UplinkBinding, list[str]] | None]
Prober = Callable[[list[str], UplinkBinding, float], Awaitable[ProbeResult]]
OnChange = Callable[[str, Health, Health], None]


@dataclass
class UplinkMonitor:
    """Probes one uplink every `cfg.interval_s` until stopped."""

    name: str
    cfg: HealthConfig
    plan: ProbePlan
    on_change: OnChange
    prober: Prober = probe_any

    def __post_init__(self) -> None:
        self.fsm = HealthFSM(self.cfg)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def state(self) -> Health:
        return self.fsm.state

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"net-health-{self.name}")

    async def stop(self) -> None:
        # The flag as well as the cancel: Python 3.11's asyncio.wait_for swallows a
        # cancellation that arrives as the future it waits for completes (gh-86296, fixed in
        # 3.12), e.g. a probe's reply in the same loop turn; the loop then ends at its next
        # round instead of probing forever while stop() waits.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def probe_once(self) -> Health:
        """One probe, fed to the state machine; the new state (changes are reported)."""
        plan = self.plan()
        if plan is None:
            result = ProbeResult(False)
        else:
            binding, targets = plan
            result = await self.prober(targets, binding, self.cfg.timeout_s)
        old, new = self.fsm.feed(result)
        if old is not new:
            rtt = f"{self.fsm.last_rtt_s * 1000:.0f} ms" if self.fsm.last_rtt_s else "-"
            level = logging.INFO if new in (Health.UP, Health.UNKNOWN) else logging.WARNING
            log.log(
                level,
                "uplink %s: %s -> %s (loss %.0f %%, last rtt %s)",
                self.name,
                old.value,
                new.value,
                self.fsm.loss * 100,
                rtt,
            )
            self.on_change(self.name, old, new)
        return new

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._stopping:
            try:
                await self.probe_once()
            except Exception:  # a bug in one probe must not end the monitoring for good
                log.exception("uplink %s: probe failed unexpectedly", self.name)
            # Fixed period (not period + probe time): detection time is bounded by
            # down_after x interval_s however slowly probes fail.
            next_at = max(next_at + self.cfg.interval_s, loop.time())
            await asyncio.sleep(next_at - loop.time())
