"""`simulate(scenario)`: a packet-level discrete-event run of a scenario, statistics as JSON.

Semantics (ns-2's for the same scenario; details in network.py, models.py, traffic_tcp.py):
- Sources send during [start_s, min(stop_s, duration_s)). The network is then drained, so
  every packet sent is either received or dropped: sent = received + dropped.
- A link transmits one packet at a time at its capacity; packets wait in a FIFO drop-tail
  queue whose limit excludes the packet being transmitted; a packet arriving at a full queue
  is dropped. Random loss drops a packet after its transmission. Then it propagates for
  delay_ms and enters the next link of its path.
- One-way delay is from the moment the sender emits the packet to its arrival at the end of
  its path (queueing + transmission + propagation on every link).
- Link utilisation is the time it spent transmitting within [0, duration_s] over duration_s;
  remaining_kbps = capacity_kbps x (1 - utilisation), the capacity left for more traffic.
- Deterministic for a seed: each flow and each link draws from its own random stream, seeded
  from (seed, its name), so adding a flow does not change the others' draws.

Result (JSON keys; values null when there is nothing to measure):
    {"duration_s", "seed",
     "flows": {name: {"kind", "sent", "received", "dropped", "loss_ratio", "throughput_kbps",
                      "delay_ms": {"mean", "p50", "p95", "max"}, "jitter_ms",
                      "ipt_ms": {"mean", "p50", "p95", "max"}, "offered_kbps",
                      bulk/consult also "goodput_kbps", bulk "completed_s",
                      consult "transfers" and "transfer_ms": {...},
                      with samples=True "samples": [[send_time_s, delay_ms or null], ...]}},
     "links": {name: {"capacity_kbps", "utilisation", "remaining_kbps", "carried_kbps",
                      "packets", "tail_drops", "line_losses"}},
     "events": number of events the engine processed}
"""

from __future__ import annotations

import random
from typing import Any

from appliance.qos.models import TCP_HEADER_BYTES, Scenario
from appliance.qos.network import Engine, LinkQueue, Packet
from appliance.qos.simstats import FlowRecord, summary_ms
from appliance.qos.traffic import CbrSource, FlowRuntime, OnOffSource, VbrSource
from appliance.qos.traffic_tcp import BulkSender, ConsultSender, TcpSender

_RUNTIMES: dict[str, type[FlowRuntime]] = {
    "cbr": CbrSource,
    "onoff": OnOffSource,
    "vbr": VbrSource,
    "bulk": BulkSender,
    "consult": ConsultSender,
}


class Simulation:
    """One run of a scenario: build links and flows, run the engine, summarise."""

    def __init__(self, scenario: Scenario, *, samples: bool = False) -> None:
        self.scenario = scenario
        self.engine = Engine()
        horizon = scenario.duration_s
        seed = scenario.seed
        self.links = {
            link.name: LinkQueue(link, random.Random(f"{seed}/link/{link.name}"), horizon)
            for link in scenario.links
        }
        self.flows: dict[str, FlowRuntime] = {}
        for flow in scenario.flows:
            stop = min(flow.stop_s or horizon, horizon)
            runtime = _RUNTIMES[flow.kind](
                flow,
                self.engine,
                [self.links[name] for name in flow.path],
                random.Random(f"{seed}/flow/{flow.name}"),
                FlowRecord(horizon, samples),
                stop,
                self._hop,
            )
            self.flows[flow.name] = runtime

    def run(self) -> dict[str, Any]:
        for runtime in self.flows.values():
            runtime.start()
        self.engine.run()
        return self.result()

    def _hop(self, packet: Packet) -> None:
        """The packet enters link number packet.hop of its path, now."""
        flow = packet.flow
        links = flow.links
        link = links[packet.hop]
        now = self.engine.now
        end = link.transmit(now, packet.size)
        if end < 0:
            flow.on_drop(packet, now)
            return
        packet.hop += 1
        if packet.hop == len(links):
            flow.on_arrival(packet, end + link.delay)
        else:
            self.engine.at(end + link.delay, self._hop, packet)

    def result(self) -> dict[str, Any]:
        duration = self.scenario.duration_s
        flows = {}
        for name, runtime in self.flows.items():
            out = {"kind": runtime.model.kind, **runtime.record.summary(duration)}
            out["offered_kbps"] = _offered_kbps(runtime, duration)
            if isinstance(runtime, TcpSender):
                payload_bits = 8 * (runtime.model.packet_bytes - TCP_HEADER_BYTES)
                out["goodput_kbps"] = runtime.acked_in_time * payload_bits / duration / 1000
            if isinstance(runtime, BulkSender):
                out["completed_s"] = runtime.completed_at
            if isinstance(runtime, ConsultSender):
                out["transfers"] = len(runtime.transfers)
                out["transfer_ms"] = summary_ms(runtime.transfers)
            flows[name] = out
        return {
            "duration_s": duration,
            "seed": self.scenario.seed,
            "flows": flows,
            "links": {name: link.summary(duration) for name, link in self.links.items()},
            "events": self.engine.events,
        }


def _offered_kbps(runtime: FlowRuntime, duration: float) -> float | None:
    """The rate the model asks for on average (None for elastic flows: they take what is free)."""
    m: Any = runtime.model
    active = min(m.stop_s or duration, duration) - m.start_s
    share = active / duration
    if m.kind == "cbr":
        return 8 * m.packet_bytes / (m.interval_ms / 1000) / 1000 * share
    if m.kind == "onoff":
        duty = m.on_ms / (m.on_ms + m.off_ms)
        return 8 * m.packet_bytes / (m.interval_ms / 1000) / 1000 * duty * share
    if m.kind == "vbr":
        return 8 * m.frame_bytes * m.frame_rate / 1000 * share
    return None


def simulate(scenario: Scenario, *, samples: bool = False) -> dict[str, Any]:
    """Run `scenario` once; the statistics as a JSON-able dict (see the module docstring)."""
    return Simulation(scenario, samples=samples).run()
