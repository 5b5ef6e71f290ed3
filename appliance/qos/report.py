"""`qos report`: one self-contained HTML page comparing two results (typically measured vs
simulated): the side-by-side table with differences, and plots of delay over time, loss and
throughput embedded as base64 PNG, so the file can be mailed or archived as it is."""

from __future__ import annotations

import base64
import html
import json
from datetime import UTC, datetime
from typing import Any

from appliance import __version__
from appliance.qos import report_plots
from appliance.qos.report_table import fmt, fmt_relative, rows

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child, td:nth-child(2) { text-align: left; }
tr.first td { border-top: 2px solid #999; }
.note { color: #666; font-size: 12px; }
img { display: block; margin: 1em 0; max-width: 100%; }
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(left: dict, right: dict, titles: tuple[str, str]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in ("", "metric", *titles, "diff", "rel"))
    body, current = [], None
    for row in rows(left, right):
        where = f"{row.section} {row.name}"
        cls = ' class="first"' if where != current else ""
        cells = [where if where != current else "", row.label, fmt(row.left), fmt(row.right),
                 fmt(row.diff, signed=True), fmt_relative(row)]  # fmt: skip
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        current = where
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _value(result: dict, flow: str, key: str, scale: float = 1.0) -> float | None:
    value = (result.get("flows", {}).get(flow) or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value * scale


def _plots(left: dict, right: dict, titles: tuple[str, str]) -> list[str]:
    flows = list(dict.fromkeys([*left["flows"], *right["flows"]]))
    parts: list[str] = []
    if flows:
        for key, title, unit, scale in (
            ("loss_ratio", "Loss per flow", "loss (%)", 100.0),
            ("throughput_kbps", "Throughput per flow", "kbit/s", 1.0),
        ):
            sides = [(t, [_value(r, f, key, scale) for f in flows])
                     for t, r in zip(titles, (left, right), strict=True)]  # fmt: skip
            parts.append(_img(report_plots.bars_plot(title, unit, flows, sides), title))
    missing = []
    for flow in flows:
        sides = [(t, report_plots.samples_of(r, flow))
                 for t, r in zip(titles, (left, right), strict=True)]  # fmt: skip
        missing += [f"{flow} ({t})" for t, s in sides if s is None]
        png = report_plots.delay_plot(flow, sides)
        if png is not None:
            parts.append(_img(png, f"{flow}: delay over time"))
    if missing:
        parts.append(
            '<p class="note">No per-packet samples for: '
            + html.escape(", ".join(missing))
            + " (no delay-over-time curve for them; run simulate with samples to get one).</p>"
        )
    return parts


def render_html(
    left: dict[str, Any],
    right: dict[str, Any],
    *,
    titles: tuple[str, str] = ("real", "sim"),
    sources: tuple[str, str] = ("", ""),
) -> str:
    """The report page for two loaded results (report_table.load_result)."""
    made = datetime.now(UTC).isoformat(timespec="seconds")
    meta = []
    for title, source, result in zip(titles, sources, (left, right), strict=True):
        about = json.dumps(result["meta"]) if result.get("meta") else ""
        meta.append(
            f"<li><b>{html.escape(title)}</b>: {html.escape(source or '(given in memory)')}"
            f" <span class='note'>{html.escape(about)}</span></li>"
        )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>QoS report: {html.escape(titles[0])} vs {html.escape(titles[1])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>QoS report: {html.escape(titles[0])} vs {html.escape(titles[1])}</h1>",
        f"<ul>{''.join(meta)}</ul>",
        f"<p class='note'>dicomesh {__version__}, {made}. diff = {html.escape(titles[0])} - "
        f"{html.escape(titles[1])} (percentage points for loss and utilisation); "
        "rel = diff / |right|.</p>",
        "<h2>Side by side</h2>",
        _table(left, right, titles),
        "<h2>Plots</h2>",
        *_plots(left, right, titles),
        "</body></html>",
    ]
    return "\n".join(parts)
