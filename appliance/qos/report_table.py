"""Two results side by side (`qos compare`, and the tables of `qos report`): load the JSON
files of `qos measure` / `qos simulate`, pair their flows and links by name, and give every
metric with its difference. Anything missing on one side is shown as missing, not guessed."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLOW_METRICS: list[tuple[str, str]] = [
    ("sent", "sent"),
    ("received", "received"),
    ("dropped", "dropped"),
    ("loss_ratio", "loss %"),
    ("throughput_kbps", "throughput kbit/s"),
    ("delay_ms.mean", "delay mean ms"),
    ("delay_ms.p50", "delay p50 ms"),
    ("delay_ms.p95", "delay p95 ms"),
    ("delay_ms.max", "delay max ms"),
    ("jitter_ms", "jitter ms"),
    ("ipt_ms.mean", "inter-packet mean ms"),
    ("rtt_ms.mean", "RTT mean ms"),
]
LINK_METRICS: list[tuple[str, str]] = [
    ("capacity_kbps", "capacity kbit/s"),
    ("utilisation", "utilisation %"),
    ("remaining_kbps", "remaining kbit/s"),
]
_PERCENT = {"loss_ratio", "utilisation"}


class ReportError(ValueError):
    """A result file that cannot be read or is not a result."""


def load_result(path: str | Path) -> dict[str, Any]:
    """A result dict from a JSON file; it must have a `flows` table (`links` optional)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ReportError(f"{path}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("flows"), dict):
        raise ReportError(f"{path}: not a QoS result (no 'flows' table)")
    if not isinstance(data.setdefault("links", {}), dict):
        raise ReportError(f"{path}: 'links' must be a table")
    return data


@dataclass(frozen=True)
class Row:
    """One metric of one flow or link, on both sides."""

    section: str  # "flow" or "link"
    name: str
    metric: str
    label: str
    left: float | None
    right: float | None

    @property
    def diff(self) -> float | None:
        if self.left is None or self.right is None:
            return None
        return self.left - self.right

    @property
    def relative(self) -> float | None:
        """(left - right) / right; None when undefined (right 0 or missing)."""
        diff = self.diff
        if diff is None or self.right == 0:
            return None
        assert self.right is not None
        return diff / abs(self.right)


def _get(table: Any, dotted: str) -> float | None:
    for part in dotted.split("."):
        if not isinstance(table, dict):
            return None
        table = table.get(part)
    if isinstance(table, bool) or not isinstance(table, int | float):
        return None
    return None if math.isnan(table) else float(table)


def _names(left: dict, right: dict) -> list[str]:
    return list(dict.fromkeys([*left, *right]))


def rows(left: dict[str, Any], right: dict[str, Any]) -> Iterator[Row]:
    """Every flow metric, then every link metric, for names on either side."""
    for section, key, metrics in (("flow", "flows", FLOW_METRICS), ("link", "links", LINK_METRICS)):
        a, b = left.get(key) or {}, right.get(key) or {}
        for name in _names(a, b):
            for metric, label in metrics:
                lv, rv = _get(a.get(name), metric), _get(b.get(name), metric)
                if lv is None and rv is None:
                    continue
                if metric in _PERCENT:
                    lv = None if lv is None else lv * 100
                    rv = None if rv is None else rv * 100
                yield Row(section, name, metric, label, lv, rv)


def fmt(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) < 1e9:
        return f"{int(value):+d}" if signed else f"{int(value)}"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def fmt_relative(row: Row) -> str:
    rel = row.relative
    return "-" if rel is None else f"{rel * 100:+.1f}%"


def text_table(
    left: dict[str, Any], right: dict[str, Any], titles: tuple[str, str] = ("real", "sim")
) -> str:
    """The side-by-side table as plain text (loss and utilisation in percent; diff is
    left - right, in percentage points for percentages)."""
    header = ["", "metric", titles[0], titles[1], "diff", "rel"]
    lines = [header]
    current = None
    for row in rows(left, right):
        where = f"{row.section} {row.name}"
        lines.append(
            [
                where if where != current else "",
                row.label,
                fmt(row.left),
                fmt(row.right),
                fmt(row.diff, signed=True),
                fmt_relative(row),
            ]
        )
        current = where
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        cells += [cell.rjust(w) for cell, w in zip(line[2:], widths[2:], strict=True)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"
