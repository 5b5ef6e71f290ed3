"""`dicomesh qos measure | report | compare`: real measurement against a peer's probe
responder, and the comparison of two results (measured vs simulated)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from appliance.qos.cli import Handler
from appliance.qos.config import DEFAULT_PROBE_PORT


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    measure = sub.add_parser(
        "measure",
        help="send probe flows to a peer's responder, report delay, loss, jitter, throughput",
        description="Flows: [NAME=]cbr:SIZE:INTERVAL_MS (SIZE = bytes the link carries per "
        "packet: UDP payload + 28 IPv4/UDP + --link-overhead) or [NAME=]bulk:SECONDS (TCP).",
    )
    measure.add_argument("--peer", required=True, help="the peer's overlay or LAN address")
    measure.add_argument("--flow", action="append", required=True, help="a flow; repeatable")
    measure.add_argument("--duration", type=float, default=10.0, help="CBR sending time, s")
    measure.add_argument(
        "--port", type=int, default=DEFAULT_PROBE_PORT, help="the peer's qos.probe_port"
    )
    measure.add_argument("--bind", help="source address (the one the peer admits)")
    measure.add_argument(
        "--loss-timeout", type=float, default=2.0,
        help="Tmax, s: a probe not at the responder this long after sending is lost",
    )  # fmt: skip
    measure.add_argument(
        "--link-overhead", type=int, default=14,
        help="layer-2 bytes per packet counted in SIZE (14: Ethernet as tc counts it)",
    )  # fmt: skip
    measure.add_argument(
        "--link", default="path",
        help="NAME[:CAPACITY_KBPS] of the path in the result (name it as the scenario's link)",
    )  # fmt: skip
    measure.add_argument("--json", action="store_true", help="print the result as JSON")
    measure.add_argument("-o", "--output", type=Path, help="also write the JSON result here")

    report = sub.add_parser("report", help="HTML report of two results side by side, with plots")
    compare = sub.add_parser("compare", help="print two results side by side")
    for p in (report, compare):
        p.add_argument("left", type=Path, help="result JSON (e.g. measured)")
        p.add_argument("right", type=Path, help="result JSON (e.g. simulated)")
        p.add_argument("--titles", nargs=2, default=["real", "sim"], metavar=("LEFT", "RIGHT"))
    report.add_argument("-o", "--output", type=Path, required=True, help="HTML file to write")
    return {"measure": _measure, "report": _report, "compare": _compare}


def _fail(message: str, code: int) -> int:
    print(f"dicomesh qos: {message}", file=sys.stderr)
    return code


def _link(spec: str) -> tuple[str, float | None]:
    name, _, capacity = spec.partition(":")
    return name, float(capacity) if capacity else None


def _measure(args: argparse.Namespace) -> int:
    from appliance.qos.flows import FlowSpecError, parse_flows
    from appliance.qos.measure import MeasureError, measure

    try:
        flows = parse_flows(args.flow)
        link, capacity = _link(args.link)
        if not args.duration > 0 or not args.loss_timeout > 0:
            raise FlowSpecError("--duration and --loss-timeout must be > 0")
        result = asyncio.run(
            measure(
                args.peer, flows, duration_s=args.duration, port=args.port, bind=args.bind,
                loss_timeout_s=args.loss_timeout, link_overhead=args.link_overhead,
                link=link, capacity_kbps=capacity,
            )
        )  # fmt: skip
    except (FlowSpecError, ValueError) as exc:
        return _fail(str(exc), 2)
    except MeasureError as exc:
        return _fail(str(exc), 1)
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_summary_text(result))
    return 0


def _summary_text(result: dict[str, Any]) -> str:
    lines = []
    for name, f in result["flows"].items():
        if f.get("kind") == "bulk":
            lines.append(f"{name}: bulk TCP {f['throughput_kbps']:.1f} kbit/s goodput, "
                         f"{f['received']} B in {f['seconds']} s")  # fmt: skip
            continue
        d, rtt = f["delay_ms"], f["rtt_ms"]
        lines.append(
            f"{name}: sent {f['sent']} received {f['received']} loss {f['loss_ratio']:.2%} "
            f"throughput {f['throughput_kbps']:.1f} kbit/s"
        )
        if d["mean"] is not None:
            lines.append(
                f"  delay ms mean {d['mean']:.1f} p50 {d['p50']:.1f} p95 {d['p95']:.1f} "
                f"max {d['max']:.1f}  jitter {f['jitter_ms'] or 0:.2f}  rtt mean {rtt['mean']:.1f}"
            )
    for name, link in result["links"].items():
        if link["capacity_kbps"] is not None:
            lines.append(f"link {name}: utilisation {link['utilisation']:.1%}, "
                         f"remaining {link['remaining_kbps']:.1f} kbit/s")  # fmt: skip
    return "\n".join(lines) + "\n"


def _load_pair(args: argparse.Namespace) -> tuple[dict, dict]:
    from appliance.qos.report_table import load_result

    return load_result(args.left), load_result(args.right)


def _report(args: argparse.Namespace) -> int:
    from appliance.qos.report import render_html
    from appliance.qos.report_table import ReportError

    try:
        left, right = _load_pair(args)
    except ReportError as exc:
        return _fail(str(exc), 2)
    page = render_html(
        left, right, titles=tuple(args.titles), sources=(str(args.left), str(args.right))
    )
    try:
        args.output.write_text(page)
    except OSError as exc:
        return _fail(f"{args.output}: {exc.strerror or exc}", 1)
    print(f"wrote {args.output}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from appliance.qos.report_table import ReportError, text_table

    try:
        left, right = _load_pair(args)
    except ReportError as exc:
        return _fail(str(exc), 2)
    sys.stdout.write(text_table(left, right, tuple(args.titles)))
    return 0
