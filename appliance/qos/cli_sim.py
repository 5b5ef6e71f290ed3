"""`dicomesh qos simulate | predict | sweep`: the simulator's commands.

    dicomesh qos simulate SCENARIO.toml [--json [--samples]]
    dicomesh qos predict --study-mb 1000 --holder 800 --holder adsl-up ... [--downlink 3000]
                         [--compression 0.5] [--latency-ms 20] [--efficiency 0.917] [--json]
    dicomesh qos sweep [SCENARIO.toml | --link PRESET|KBPS] [--flow NAME]
                       (--sizes 80,160 --intervals 20,40 | --copies 1,2,4) [--max-loss 0.01]

Exit codes: 0 done, 2 invalid scenario or arguments (every scenario error with its key path).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.qos.cli import Handler


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    simulate = sub.add_parser(
        "simulate", help="discrete-event simulation of a scenario file (flows over links)"
    )
    simulate.add_argument("scenario", type=Path, help="scenario TOML file")
    simulate.add_argument("--json", action="store_true", help="print the result as JSON")
    simulate.add_argument(
        "--samples", action="store_true", help="with --json: per-packet [send_s, delay_ms|null]"
    )

    predict = sub.add_parser(
        "predict", help="how long a study takes from k holders (swarm scheduler, simulated)"
    )
    predict.add_argument("--study-mb", type=float, required=True, help="study size, MB (10^6)")
    predict.add_argument(
        "--holder", action="append", required=True, metavar="KBPS|PRESET",
        help="one holder's uplink (kbit/s or a link preset such as adsl-up); repeatable",
    )  # fmt: skip
    predict.add_argument(
        "--downlink", default="inf", metavar="KBPS|PRESET", help="the downloader's downlink"
    )
    predict.add_argument(
        "--compression", type=float, default=1.0, help="compressed/raw size on the wire (0-1]"
    )
    predict.add_argument("--latency-ms", type=float, default=20.0, help="one-way, per path")
    predict.add_argument(
        "--efficiency", type=float, default=None, help="goodput/line rate (default 0.917, WG)"
    )
    predict.add_argument("--json", action="store_true", help="print the result as JSON")

    sweep = sub.add_parser(
        "sweep", help="grid of CBR packet size x interval, or of simultaneous transfers"
    )
    sweep.add_argument("scenario", type=Path, nargs="?", help="scenario TOML file")
    sweep.add_argument("--link", help="instead of a file: one link, a preset or kbit/s")
    sweep.add_argument("--flow", help="the flow to vary (default: cbr, or bulk with --copies)")
    sweep.add_argument("--sizes", type=_ints, help="packet sizes, bytes: 80,160,512,1024")
    sweep.add_argument("--intervals", type=_floats, help="intervals, ms: 20,40,80,120")
    sweep.add_argument("--copies", type=_ints, help="numbers of simultaneous copies: 1,2,4,8")
    sweep.add_argument("--duration", type=float, help="override duration_s")
    sweep.add_argument("--max-loss", type=float, default=0.01, help="ok below this loss ratio")
    sweep.add_argument("--json", action="store_true", help="print the rows as JSON")
    return {"simulate": _simulate, "predict": _predict, "sweep": _sweep}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _fail(message: str) -> int:
    print(f"dicomesh qos: {message}", file=sys.stderr)
    return 2


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=1)
    sys.stdout.write("\n")


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns, the first one left-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


# -- simulate ----------------------------------------------------------------------------


def _simulate(args: argparse.Namespace) -> int:
    from appliance.qos.scenario import ScenarioError, load_scenario
    from appliance.qos.simulator import simulate

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        return _fail(f"invalid scenario {args.scenario}:\n{exc}")
    result = simulate(scenario, samples=args.samples and args.json)
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(simulate_text(result))
    return 0


def simulate_text(result: dict[str, Any]) -> str:
    """The human summary of a simulation result: a flow table and a link table."""
    flow_rows = []
    for name, f in result["flows"].items():
        d = f["delay_ms"]
        flow_rows.append(
            [
                name, f["kind"], str(f["sent"]), str(f["received"]), str(f["dropped"]),
                f"{100 * f['loss_ratio']:.2f}", f"{f['throughput_kbps']:.1f}",
                _num(d["mean"]), _num(d["p50"]), _num(d["p95"]), _num(d["max"]),
                _num(f["jitter_ms"], ".2f"), _num(f["ipt_ms"]["mean"]),
            ]
        )  # fmt: skip
    flows = table(
        ["flow", "kind", "sent", "recv", "drop", "loss%", "kbit/s", "delay ms mean", "p50",
         "p95", "max", "jitter ms", "ipt ms"],
        flow_rows,
    )  # fmt: skip
    link_rows = [
        [name, f"{k['capacity_kbps']:g}", f"{100 * k['utilisation']:.1f}",
         f"{k['remaining_kbps']:.1f}", str(k["tail_drops"]), str(k["line_losses"])]
        for name, k in result["links"].items()
    ]  # fmt: skip
    links = table(
        ["link", "capacity kbit/s", "util%", "remaining kbit/s", "queue drops", "line losses"],
        link_rows,
    )
    head = f"simulated {result['duration_s']:g} s, seed {result['seed']}\n\n"
    return head + flows + "\n" + links


# -- predict -----------------------------------------------------------------------------


def _rate(text: str) -> float:
    """kbit/s from a number or a link preset name."""
    from appliance.qos.presets import link_preset

    preset = link_preset(text)
    if preset is not None:
        return float(preset["capacity_kbps"])
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a rate in kbit/s nor a link preset") from None
    if not value > 0:
        raise ValueError(f"rate {text!r} must be > 0")
    return value


def _predict(args: argparse.Namespace) -> int:
    from appliance.qos.predict import WIREGUARD_EFFICIENCY, predict_study

    try:
        holders = [_rate(h) for h in args.holder]
        downlink = math.inf if args.downlink == "inf" else _rate(args.downlink)
        efficiency = WIREGUARD_EFFICIENCY if args.efficiency is None else args.efficiency
        prediction = predict_study(
            round(args.study_mb * 1e6), holders, downlink, compression=args.compression,
            latency_ms=args.latency_ms, efficiency=efficiency,
        )  # fmt: skip
    except ValueError as exc:
        return _fail(str(exc))
    out = prediction.as_dict() | {
        "holders_kbps": holders,
        "downlink_kbps": None if math.isinf(downlink) else downlink,
        "compression": args.compression,
        "latency_ms": args.latency_ms,
        "efficiency": efficiency,
    }
    if args.json:
        _print_json(out)
        return 0
    rows = [
        [name, f"{kbps:g}", f"{b / 1e6:.1f}", f"{100 * b / prediction.wire_bytes:.1f}"]
        for (name, b), kbps in zip(prediction.path_bytes.items(), holders, strict=True)
    ]
    sys.stdout.write(
        f"study {args.study_mb:g} MB ({prediction.wire_bytes / 1e6:.1f} MB on the wire) from "
        f"{len(holders)} holder(s) into a {_num(out['downlink_kbps'], 'g')} kbit/s downlink:\n"
        f"  {_duration(prediction.seconds)} ({prediction.seconds:.0f} s), "
        f"{out['mean_kbps']:.0f} kbit/s on average; "
        f"bound {_duration(prediction.lower_bound_s)}\n\n"
        + table(["path", "uplink kbit/s", "MB sent", "share%"], rows)
    )
    return 0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# -- sweep -------------------------------------------------------------------------------


def _sweep(args: argparse.Namespace) -> int:
    import dataclasses

    from appliance.qos.scenario import ScenarioError, load_scenario
    from appliance.qos.sweep import keep_only, single_link, sweep_cbr, sweep_copies

    if (args.scenario is None) == (args.link is None):
        return _fail("sweep: give a scenario file or --link, not both")
    grid = args.sizes is not None or args.intervals is not None
    if grid == (args.copies is not None):
        return _fail("sweep: give --sizes and --intervals, or --copies")
    if grid and (not args.sizes or not args.intervals):
        return _fail("sweep: --sizes and --intervals go together")
    flow = args.flow or ("cbr" if grid else "bulk")
    try:
        if args.scenario is not None:
            scenario = load_scenario(args.scenario)
        else:
            scenario = keep_only(single_link(args.link), flow)
        if args.duration is not None:
            scenario = dataclasses.replace(scenario, duration_s=args.duration)
        if grid:
            rows = sweep_cbr(scenario, flow, args.sizes, args.intervals, max_loss=args.max_loss)
        else:
            rows = sweep_copies(scenario, flow, args.copies, max_loss=args.max_loss)
    except ScenarioError as exc:
        return _fail(f"invalid scenario:\n{exc}")
    except (ValueError, KeyError) as exc:
        return _fail(str(exc))
    if args.json:
        _print_json(rows)
        return 0
    ok = sum(r["ok"] for r in rows)
    what = "combination(s)" if grid else "count(s)"
    sys.stdout.write(
        (_grid_text(rows) if grid else _copies_text(rows))
        + f"\n{ok} of {len(rows)} {what} keep loss under {100 * args.max_loss:g} %\n"
    )
    return 0


def _grid_text(rows: list[dict[str, Any]]) -> str:
    return table(
        ["bytes", "every ms", "offered kbit/s", "loss%", "kbit/s", "p95 delay ms", "jitter ms",
         "remaining kbit/s", "ok"],
        [
            [str(r["packet_bytes"]), f"{r['interval_ms']:g}", f"{r['offered_kbps']:.1f}",
             f"{100 * r['loss_ratio']:.2f}", f"{r['throughput_kbps']:.1f}",
             _num(r["delay_p95_ms"]), _num(r["jitter_ms"], ".2f"),
             f"{r['remaining_kbps']:.1f}", "yes" if r["ok"] else "no"]
            for r in rows
        ],
    )  # fmt: skip


def _copies_text(rows: list[dict[str, Any]]) -> str:
    return table(
        ["copies", "total kbit/s", "min/copy", "mean/copy", "loss%", "p95 delay ms",
         "done at s", "remaining kbit/s", "ok"],
        [
            [str(r["copies"]), f"{r['total_kbps']:.1f}", f"{r['per_copy_min_kbps']:.1f}",
             f"{r['per_copy_mean_kbps']:.1f}", f"{100 * r['loss_ratio']:.2f}",
             _num(r["delay_p95_ms"]), _num(r["completed_s"]), f"{r['remaining_kbps']:.1f}",
             "yes" if r["ok"] else "no"]
            for r in rows
        ],
    )  # fmt: skip
