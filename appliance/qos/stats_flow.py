"""Per-flow statistics of a measurement, in the result schema shared with `qos simulate`.

    flows.<name>.{sent, received, dropped, loss_ratio, throughput_kbps,
                  delay_ms.{mean, p50, p95, max}, jitter_ms}
    links.<name>.{capacity_kbps, utilisation, remaining_kbps}

Pure functions over numbers: the same code serves measured and hand-made data.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

Sample = tuple[float, float | None]  # send time s from the start, one-way delay ms (None: lost)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by linear interpolation between closest ranks (the
    common "type 7" definition, as numpy's default); `sorted_values` must be sorted."""
    if not sorted_values:
        raise ValueError("percentile of nothing")
    rank = (len(sorted_values) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def summary(values: Iterable[float]) -> dict[str, float | None]:
    """{mean, p50, p95, max} of `values`; all None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    return {
        "mean": math.fsum(ordered) / len(ordered),
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "max": ordered[-1],
    }


def rfc3550_jitter(transits: Iterable[float]) -> float | None:
    """Interarrival jitter of RFC 3550 section 6.4.1 over transit times (one-way delays) in
    arrival order: J += (|D| - J) / 16, D the change in transit between consecutive packets.
    None with fewer than two packets. A constant clock offset cancels out in D, so the value
    needs no synchronised clocks."""
    jitter = 0.0
    previous: float | None = None
    count = 0
    for transit in transits:
        if previous is not None:
            jitter += (abs(transit - previous) - jitter) / 16
        previous = transit
        count += 1
    return jitter if count >= 2 else None


def flow_stats(
    *,
    sent: int,
    received: int,
    packet_bytes: int,
    duration_s: float,
    samples: Sequence[Sample],
) -> dict[str, Any]:
    """A flow's entry of the result, defined as the simulator does (simstats.py).

    `received` counts forward arrivals; it may exceed the samples with a delay (an echo lost
    on the way back). Throughput: bits of the packets that arrived by the end of the run
    (send time + delay <= duration; those without a delay are counted) over the duration.
    Jitter and inter-packet times (ipt_ms) run over the samples in arrival order."""
    arrivals = sorted((t * 1000 + d, d) for t, d in samples if d is not None)
    in_time = sum(1 for at, _ in arrivals if at <= duration_s * 1000)
    in_time += received - len(arrivals)
    dropped = sent - received
    return {
        "sent": sent,
        "received": received,
        "dropped": dropped,
        "loss_ratio": dropped / sent if sent else 0.0,
        "throughput_kbps": in_time * packet_bytes * 8 / duration_s / 1000,
        "delay_ms": summary(d for _, d in arrivals),
        "jitter_ms": rfc3550_jitter(d for _, d in arrivals),
        "ipt_ms": summary(b[0] - a[0] for a, b in itertools.pairwise(arrivals)),
    }


def link_stats(capacity_kbps: float | None, delivered_kbps: float) -> dict[str, float | None]:
    """A link's entry: utilisation and what is left of its capacity given the delivered
    load; without a known capacity (a measured path) only None can be said."""
    if capacity_kbps is None:
        return {"capacity_kbps": None, "utilisation": None, "remaining_kbps": None}
    return {
        "capacity_kbps": capacity_kbps,
        "utilisation": delivered_kbps / capacity_kbps if capacity_kbps else None,
        "remaining_kbps": capacity_kbps - delivered_kbps,
    }
