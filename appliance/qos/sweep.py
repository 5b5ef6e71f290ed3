"""Sweeps: run a scenario over a grid of settings and tabulate what an engineer picks from.

- CBR grid: one cbr flow's (packet_bytes x interval_ms); per cell its loss, throughput, delay
  and the bandwidth left on the tightest link of its path.
- Copies: n simultaneous copies of one flow (e.g. bulk transfers); per n the total and the
  per-copy throughput, the loss, and the bandwidth left.
A row is "ok" when the swept flows lose less than `max_loss` of their packets (1 % default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from appliance.qos.models import CbrFlow, Scenario
from appliance.qos.presets import link_preset
from appliance.qos.scenario import parse_scenario
from appliance.qos.simulator import simulate

DEFAULT_MAX_LOSS = 0.01


def single_link(link: str, *, duration_s: float = 60.0, seed: int = 1) -> Scenario:
    """A one-link scenario with a cbr flow "cbr" and a bulk flow "bulk" template on it.

    `link` is a preset name or a capacity in kbit/s (then with the default queue, no delay).
    Only the flow being swept is kept (see `keep_only`).
    """
    spec: dict[str, Any] = {"name": "link"}
    if link_preset(link) is not None:
        spec["preset"] = link
    else:
        try:
            spec["capacity_kbps"] = float(link)
        except ValueError:
            raise ValueError(f"--link: {link!r} is neither a preset nor a rate in kbit/s") from None
    return parse_scenario(
        {
            "duration_s": duration_s,
            "seed": seed,
            "links": [spec],
            "flows": [
                {"name": "cbr", "kind": "cbr", "packet_bytes": 100, "interval_ms": 20,
                 "path": ["link"]},
                {"name": "bulk", "kind": "bulk", "path": ["link"]},
            ],
        }
    )  # fmt: skip


def keep_only(scenario: Scenario, flow: str) -> Scenario:
    """The scenario with `flow` as its only flow."""
    return dataclasses.replace(scenario, flows=(scenario.flow(flow),))


def _bottleneck(scenario: Scenario, result: dict[str, Any], path: list[str]) -> float:
    return min(result["links"][name]["remaining_kbps"] for name in path)


def _check_flow(scenario: Scenario, name: str) -> None:
    if name not in {f.name for f in scenario.flows}:
        known = ", ".join(f.name for f in scenario.flows)
        raise ValueError(f"no flow {name!r} in the scenario (flows: {known})")


def sweep_cbr(
    scenario: Scenario,
    flow: str,
    sizes: Iterable[int],
    intervals_ms: Iterable[float],
    *,
    max_loss: float = DEFAULT_MAX_LOSS,
) -> list[dict[str, Any]]:
    """One row per (packet_bytes, interval_ms) of the cbr flow `flow`, other flows unchanged."""
    _check_flow(scenario, flow)
    base = scenario.flow(flow)
    if not isinstance(base, CbrFlow):
        raise ValueError(f"flow {flow!r} is {base.kind}, the size x interval grid needs a cbr flow")
    rows = []
    for size in sizes:
        for interval in intervals_ms:
            cell = dataclasses.replace(base, packet_bytes=int(size), interval_ms=float(interval))
            flows = tuple(cell if f.name == flow else f for f in scenario.flows)
            result = simulate(dataclasses.replace(scenario, flows=flows))
            stats = result["flows"][flow]
            rows.append(
                {
                    "packet_bytes": int(size),
                    "interval_ms": float(interval),
                    "offered_kbps": stats["offered_kbps"],
                    "loss_ratio": stats["loss_ratio"],
                    "throughput_kbps": stats["throughput_kbps"],
                    "delay_p95_ms": stats["delay_ms"]["p95"],
                    "jitter_ms": stats["jitter_ms"],
                    "remaining_kbps": _bottleneck(scenario, result, base.path),
                    "ok": stats["loss_ratio"] < max_loss,
                }
            )
    return rows


def sweep_copies(
    scenario: Scenario, flow: str, counts: Iterable[int], *, max_loss: float = DEFAULT_MAX_LOSS
) -> list[dict[str, Any]]:
    """One row per n: `flow` replaced by n copies of it running at once."""
    _check_flow(scenario, flow)
    base = scenario.flow(flow)
    others = tuple(f for f in scenario.flows if f.name != flow)
    rows = []
    for n in counts:
        if n < 1:
            raise ValueError("copies must be >= 1")
        copies = tuple(dataclasses.replace(base, name=f"{flow}#{k + 1}") for k in range(n))
        result = simulate(dataclasses.replace(scenario, flows=others + copies))
        stats = [result["flows"][c.name] for c in copies]
        sent = sum(s["sent"] for s in stats)
        dropped = sum(s["dropped"] for s in stats)
        per_copy = [s.get("goodput_kbps", s["throughput_kbps"]) for s in stats]
        loss = dropped / sent if sent else 0.0
        rows.append(
            {
                "copies": n,
                "total_kbps": sum(per_copy),
                "per_copy_min_kbps": min(per_copy),
                "per_copy_mean_kbps": sum(per_copy) / n,
                "loss_ratio": loss,
                "delay_p95_ms": max((s["delay_ms"]["p95"] or 0.0) for s in stats),
                "completed_s": _last_completion(stats),
                "remaining_kbps": _bottleneck(scenario, result, base.path),
                "ok": loss < max_loss,
            }
        )
    return rows


def _last_completion(stats: list[dict[str, Any]]) -> float | None:
    """When the last finite bulk copy finished (None: endless, or one did not finish)."""
    done = [s.get("completed_s") for s in stats]
    return None if any(t is None for t in done) else max(done)  # type: ignore[type-var]
