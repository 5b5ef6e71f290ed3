"""Per-flow statistics from per-packet outcomes, in the JSON shape `qos simulate` prints.

Definitions (the real measurement can use the same functions, so both sides agree):
- loss_ratio = dropped / sent, every packet sent having been either received or dropped.
- throughput_kbps = bits of the packets received by the end of the run / duration.
- delay_ms: one-way delay (RFC 7679), from the packet leaving the sender to its arrival;
  p50/p95 interpolate linearly between order statistics (numpy's default).
- jitter_ms: the RFC 3550 section 6.4.1 interarrival jitter estimate after the last packet,
  J += (|D(i-1, i)| - J) / 16 over the packets in arrival order.
- ipt_ms: gaps between consecutive arrivals (inter-packet times at the receiver).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

# One definition of each statistic for simulated and measured flows, so both sides agree.
from appliance.qos.stats_flow import rfc3550_jitter, summary


def summary_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p95 and max of values in seconds, as milliseconds (None when empty)."""
    return summary(1000 * v for v in values_s)


class FlowRecord:
    """What happened to one flow's packets: filled packet by packet, summarised at the end."""

    __slots__ = ("arrivals", "bits_in_time", "delays", "dropped", "horizon", "samples", "sent")

    def __init__(self, horizon: float, samples: bool) -> None:
        self.horizon = horizon  # end of the run: later arrivals count, but not for throughput
        self.sent = 0
        self.dropped = 0
        self.bits_in_time = 0
        self.delays: list[float] = []  # in arrival order
        self.arrivals: list[float] = []
        self.samples: list[tuple[float, float | None]] | None = [] if samples else None

    def on_arrival(self, sent_at: float, size: int, arrival: float) -> None:
        self.delays.append(arrival - sent_at)
        self.arrivals.append(arrival)
        if arrival <= self.horizon:
            self.bits_in_time += 8 * size
        if self.samples is not None:
            self.samples.append((sent_at, arrival - sent_at))

    def on_drop(self, sent_at: float) -> None:
        self.dropped += 1
        if self.samples is not None:
            self.samples.append((sent_at, None))

    def summary(self, duration: float) -> dict[str, Any]:
        """The flow's statistics (JSON keys of `qos simulate`)."""
        received = len(self.delays)
        arrivals = self.arrivals
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        out: dict[str, Any] = {
            "sent": self.sent,
            "received": received,
            "dropped": self.dropped,
            "loss_ratio": self.dropped / self.sent if self.sent else 0.0,
            "throughput_kbps": self.bits_in_time / duration / 1000,
            "delay_ms": summary_ms(self.delays),
            "jitter_ms": rfc3550_jitter(1000 * d for d in self.delays),
            "ipt_ms": summary_ms(gaps),
        }
        if self.samples is not None:
            self.samples.sort(key=lambda s: s[0])
            out["samples"] = [
                [sent_at, None if delay is None else 1000 * delay]
                for sent_at, delay in self.samples
            ]
        return out
