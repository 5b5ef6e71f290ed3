"""Per-uplink byte counters and rates for the dashboard and /metrics: the network
manager's status (state, RTT, loss) plus the interface counters of each uplink, read from
/proc/net/dev (per network namespace: ours, where the uplinks are unless the manager runs
them in another one, then the counters are left out)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROC_NET_DEV = Path("/proc/net/dev")


def interface_counters(text: str) -> dict[str, tuple[int, int]]:
    """Interface -> (received bytes, transmitted bytes) from /proc/net/dev's text."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines()[2:]:  # two header lines
        name, _, fields = line.partition(":")
        values = fields.split()
        if len(values) >= 9:
            out[name.strip()] = (int(values[0]), int(values[8]))
    return out


class UplinkRates:
    """Adds bytes and current rates to each uplink of a NetworkManager.status() answer."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last: dict[str, tuple[float, int, int]] = {}  # uplink -> (t, rx, tx)

    def add(self, net_status: dict[str, Any] | None, counters_text: str | None) -> None:
        """In place: `rx_bytes`, `tx_bytes`, `down_bps`, `up_bps` (None when unknown)."""
        if not net_status:
            return
        counters = interface_counters(counters_text) if counters_text else {}
        now = self.clock()
        seen = set()
        for up in net_status.get("uplinks", []):
            name = up.get("name")
            got = counters.get(up.get("interface", ""))
            up["rx_bytes"], up["tx_bytes"] = got if got else (None, None)
            up["down_bps"] = up["up_bps"] = None
            if got is None:
                continue
            seen.add(name)
            last = self._last.get(name)
            if last is not None and now > last[0] and got[0] >= last[1] and got[1] >= last[2]:
                dt = now - last[0]
                up["down_bps"] = round((got[0] - last[1]) * 8 / dt, 1)
                up["up_bps"] = round((got[1] - last[2]) * 8 / dt, 1)
            if last is None or now - last[0] >= 0.5:  # rates over >= 0.5 s, not jitter
                self._last[name] = (now, got[0], got[1])
        for name in set(self._last) - seen:  # uplinks gone from the config
            del self._last[name]


def read_counters(net: Any) -> str | None:
    """/proc/net/dev when the manager's uplinks are in our namespace. Blocking (a read)."""
    if net is None or getattr(net, "netns", None) is not None:
        return None
    try:
        return PROC_NET_DEV.read_text()
    except OSError:
        return None
