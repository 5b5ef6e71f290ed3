"""The report's plots as PNG bytes (matplotlib, Agg backend: no display, no GUI toolkit).

Per-packet samples are `[send_time_s, delay_ms or null when lost]`; a result without them
(e.g. `qos simulate` without samples) is left out of the delay plot, not faked."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: the gateway and CI have no display

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

MAX_POINTS = 5000  # per flow and side; more are thinned evenly (a PNG shows no more)
COLORS = ("tab:blue", "tab:orange")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def samples_of(result: dict[str, Any], flow: str) -> list[tuple[float, float | None]] | None:
    """A flow's samples, or None when the result has none (or they are malformed)."""
    raw = (result.get("flows", {}).get(flow) or {}).get("samples")
    if not isinstance(raw, list) or not raw:
        return None
    try:
        return [(float(t), None if d is None else float(d)) for t, d in raw]
    except (TypeError, ValueError):
        return None


def _thin(points: list[tuple[float, float | None]]) -> list[tuple[float, float | None]]:
    step = max(1, len(points) // MAX_POINTS)
    return points[::step]


def delay_plot(flow: str, sides: list[tuple[str, list | None]]) -> bytes | None:
    """Delay over send time for one flow, both sides; lost packets as ticks on the x axis."""
    if all(samples is None for _, samples in sides):
        return None
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for i, ((title, samples), color) in enumerate(zip(sides, COLORS, strict=False)):
        if samples is None:
            continue
        points = _thin(samples)
        got = [(t, d) for t, d in points if d is not None]
        lost = [t for t, d in points if d is None]
        ax.plot([t for t, _ in got], [d for _, d in got], ".", ms=2, color=color, label=title)
        if lost:
            # One row of ticks per side along the bottom (axes units), so they do not overlap.
            row = [0.03 + 0.05 * i] * len(lost)
            ax.plot(lost, row, "|", ms=6, color=color, label=f"{title}: lost",
                    transform=ax.get_xaxis_transform())  # fmt: skip
    ax.set_title(f"{flow}: one-way delay over time")
    ax.set_xlabel("send time (s)")
    ax.set_ylabel("delay (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return _png(fig)


def bars_plot(
    title: str, unit: str, flows: list[str], sides: list[tuple[str, list[float | None]]]
) -> bytes:
    """Grouped bars: one group per flow, one bar per side (missing values left blank)."""
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(flows) + 2), 3.2))
    width = 0.8 / max(1, len(sides))
    for i, ((name, values), color) in enumerate(zip(sides, COLORS, strict=False)):
        xs = [j + (i - (len(sides) - 1) / 2) * width for j in range(len(flows))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=name, color=color)
        for bar, value in zip(bars, values, strict=True):
            if value is not None:
                ax.annotate(
                    f"{value:.3g}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize="x-small",
                )
    ax.set_xticks(range(len(flows)), flows)
    ax.set_title(title)
    ax.set_ylabel(unit)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)
