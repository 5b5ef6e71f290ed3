"""Link presets: typical lines of a regional health network, one direction each.

A scenario link names one with `preset = "adsl-up"`; keys set next to it override the preset's.
Capacities are the nominal line rates of MISSION.md; delays are typical one-way propagation
plus access latency (ADSL interleaving, radio scheduling); queues are typical modem/router
buffers in packets (drop-tail).
"""

from __future__ import annotations

from typing import Any

LINK_PRESETS: dict[str, dict[str, Any]] = {
    # Switched Fast Ethernet; 1000 packets is Linux's default txqueuelen.
    "lan": {"capacity_kbps": 100_000.0, "delay_ms": 0.1, "queue_packets": 1000},
    # ADSL 3000/800 kbit/s (MISSION.md): a deep modem buffer, interleaving delay.
    "adsl-down": {"capacity_kbps": 3000.0, "delay_ms": 20.0, "queue_packets": 100},
    "adsl-up": {"capacity_kbps": 800.0, "delay_ms": 20.0, "queue_packets": 50},
    # UMTS/3G release 99 bearer, 384/64 kbit/s.
    "umts-down": {"capacity_kbps": 384.0, "delay_ms": 90.0, "queue_packets": 50},
    "umts-up": {"capacity_kbps": 64.0, "delay_ms": 90.0, "queue_packets": 30},
    # LTE/4G, a realistic share of a cell rather than the peak rate.
    "4g-down": {"capacity_kbps": 20_000.0, "delay_ms": 25.0, "queue_packets": 300},
    "4g-up": {"capacity_kbps": 5000.0, "delay_ms": 25.0, "queue_packets": 150},
    # Frame-Relay-like symmetric leased lines (committed rate), ns-2's default 50-packet queue.
    "frame-relay-128": {"capacity_kbps": 128.0, "delay_ms": 10.0, "queue_packets": 50},
    "frame-relay-256": {"capacity_kbps": 256.0, "delay_ms": 10.0, "queue_packets": 50},
    "frame-relay-512": {"capacity_kbps": 512.0, "delay_ms": 10.0, "queue_packets": 50},
}

# Aliases people type: the generic names map to the direction a gateway usually cares about
# (its uplink serves the mesh).
PRESET_ALIASES: dict[str, str] = {
    "adsl": "adsl-up",
    "umts": "umts-up",
    "3g": "umts-up",
    "3g-up": "umts-up",
    "3g-down": "umts-down",
    "4g": "4g-up",
    "lte": "4g-up",
}


def preset_names() -> list[str]:
    """Every accepted preset name, aliases included."""
    return sorted([*LINK_PRESETS, *PRESET_ALIASES])


def link_preset(name: str) -> dict[str, Any] | None:
    """The preset's link keys (a copy), or None when `name` is not a preset."""
    values = LINK_PRESETS.get(PRESET_ALIASES.get(name, name))
    return None if values is None else dict(values)
