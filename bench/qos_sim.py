#!/usr/bin/env python3
"""QoS simulator: cross-check against ns-3 on the same scenarios, and its speed.

Cross-check. Each scenario runs in our simulator (appliance.qos.simulator) and in ns-3 with
the same topology: a chain of point-to-point links (DataRate, Delay, a DropTailQueue of
queue_packets on the device, traffic control uninstalled so the device queue is the only
one), UdpClient/UdpServer for CBR flows (payload = packet_bytes - 30: IPv4 + UDP + PPP), and
BulkSend/PacketSink over TcpNewReno for the TCP case. ns-3's FlowMonitor gives packets sent
and received and the mean one-way delay (IP send to IP receive, as ours). Scenarios:
  1. cbr-under   1000 B / 90 ms over 128 kbit/s, 100 ms, 50 packets: no loss;
  2. cbr-over    1000 B / 50 ms over the same line: 160 kbit/s into 128, ~20 % loss;
  3. shared-2hop two CBR flows (500 B / 20 ms, 200 B / 10 ms) over a 10 Mbit/s LAN then a
                 256 kbit/s line with a 30-packet queue: 360 kbit/s into 256;
  4. tcp-bulk    (informative) one TCP bulk transfer over 512 kbit/s, 20 ms, 50 packets.
TCP is a different model on each side (ours: ACK per packet, SACK-like recovery, uncongested
reverse path; ns-3: NewReno with delayed ACKs), so only its goodput is compared.

ns-3 comes from PyPI's `ns3` wheel, which is far too big for the project venv; install it
into a throwaway venv and point NS3_PYTHON at it (default /tmp/ns3venv/bin/python):
    python3 -m venv /tmp/ns3venv && /tmp/ns3venv/bin/pip install ns3 simpy
On this machine ns3 3.44.post0 installs and runs (cppyy prints "Failed to materialize
symbols" lines at start-up, harmless). Without it the cross-check is skipped with a message.
SimPy in the same venv times a SimPy model of one drop-tail link against ours (why network.py
does not use SimPy).

Speed. Events per second of our engine on a LAN-rate Poisson flow and on a LAN-rate TCP
transfer; and the time to predict a 1 GB study over 4 holder paths (appliance.qos.predict,
the swarm scheduler driven by appliance.mesh.swarm.sim), target < 5 s.

Usage: .venv/bin/python bench/qos_sim.py [--skip-ns3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NS3_PYTHON = os.environ.get("NS3_PYTHON", "/tmp/ns3venv/bin/python")

LINE_128 = {"name": "wan", "capacity_kbps": 128, "delay_ms": 100, "queue_packets": 50}
SCENARIOS: dict[str, dict[str, Any]] = {
    "cbr-under": {
        "duration_s": 120,
        "links": [LINE_128],
        "flows": [{"name": "ecg", "kind": "cbr", "packet_bytes": 1000, "interval_ms": 90}],
    },
    "cbr-over": {
        "duration_s": 120,
        "links": [LINE_128],
        "flows": [{"name": "ecg", "kind": "cbr", "packet_bytes": 1000, "interval_ms": 50}],
    },
    "shared-2hop": {
        "duration_s": 120,
        "links": [
            {"name": "lan", "capacity_kbps": 10_000, "delay_ms": 1, "queue_packets": 1000},
            {"name": "wan", "capacity_kbps": 256, "delay_ms": 20, "queue_packets": 30},
        ],
        "flows": [
            {"name": "a", "kind": "cbr", "packet_bytes": 500, "interval_ms": 20},
            {"name": "b", "kind": "cbr", "packet_bytes": 200, "interval_ms": 10, "start_s": 0.003},
        ],
    },
    "tcp-bulk": {
        "duration_s": 60,
        "links": [{"name": "wan", "capacity_kbps": 512, "delay_ms": 20, "queue_packets": 50}],
        "flows": [{"name": "ftp", "kind": "bulk", "packet_bytes": 1502, "window_packets": 89}],
    },
}


# -- the ns-3 side (runs under NS3_PYTHON: imports nothing from the project) -------------------


def ns3_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from ns import ns  # type: ignore[import-not-found]

    links, flows, duration = spec["links"], spec["flows"], spec["duration_s"]
    ns.Config.SetDefault("ns3::TcpL4Protocol::SocketType", ns.StringValue("ns3::TcpNewReno"))
    ns.Config.SetDefault("ns3::TcpSocket::SegmentSize", ns.UintegerValue(1460))
    nodes = ns.NodeContainer()
    nodes.Create(len(links) + 1)
    ns.InternetStackHelper().Install(nodes)
    sink_address = None
    for i, link in enumerate(links):
        p2p = ns.PointToPointHelper()
        p2p.SetDeviceAttribute(
            "DataRate", ns.StringValue(f"{int(link['capacity_kbps'] * 1000)}bps")
        )
        p2p.SetChannelAttribute("Delay", ns.StringValue(f"{int(link['delay_ms'] * 1000)}us"))
        p2p.SetQueue(
            "ns3::DropTailQueue<Packet>", "MaxSize", ns.StringValue(f"{link['queue_packets']}p")
        )
        devices = p2p.Install(nodes.Get(i), nodes.Get(i + 1))
        addresses = ns.Ipv4AddressHelper()
        addresses.SetBase(ns.Ipv4Address(f"10.1.{i}.0"), ns.Ipv4Mask("255.255.255.0"))
        sink_address = addresses.Assign(devices).GetAddress(1)
        ns.TrafficControlHelper().Uninstall(devices)  # the device's drop-tail queue only
    ns.Ipv4GlobalRoutingHelper.PopulateRoutingTables()
    receiver, names = nodes.Get(len(links)), {}
    for k, flow in enumerate(flows):
        port = 9000 + k
        names[port] = flow["name"]
        start = ns.Seconds(flow.get("start_s", 0.0))
        if flow["kind"] == "cbr":
            ns.UdpServerHelper(port).Install(receiver).Start(ns.Seconds(0.0))
            client = ns.UdpClientHelper(ns.InetSocketAddress(sink_address, port).ConvertTo())
            client.SetAttribute("MaxPackets", ns.UintegerValue(10**9))
            client.SetAttribute("Interval", ns.StringValue(f"{int(flow['interval_ms'] * 1000)}us"))
            client.SetAttribute("PacketSize", ns.UintegerValue(flow["packet_bytes"] - 30))
        else:
            any_address = ns.InetSocketAddress(ns.Ipv4Address.GetAny(), port).ConvertTo()
            ns.PacketSinkHelper("ns3::TcpSocketFactory", any_address).Install(receiver)
            client = ns.BulkSendHelper(
                "ns3::TcpSocketFactory", ns.InetSocketAddress(sink_address, port).ConvertTo()
            )
            client.SetAttribute("MaxBytes", ns.UintegerValue(0))
        apps = client.Install(nodes.Get(0))
        apps.Start(start)
        apps.Stop(ns.Seconds(duration))
    monitor_helper = ns.FlowMonitorHelper()
    monitor = monitor_helper.InstallAll()
    ns.Simulator.Stop(ns.Seconds(duration + 30))  # drain: every packet received or lost
    began = time.perf_counter()
    ns.Simulator.Run()
    wall = time.perf_counter() - began
    monitor.CheckForLostPackets()
    classifier = ns.DynamicCast[ns.Ipv4FlowClassifier](monitor_helper.GetClassifier())
    out = {}
    for item in monitor.GetFlowStats():
        stats = item.second
        name = names.get(classifier.FindFlow(item.first).destinationPort)
        if name is None:
            continue  # TCP's ACK direction
        out[name] = {
            "sent": int(stats.txPackets),
            "received": int(stats.rxPackets),
            "delay_mean_ms": stats.delaySum.GetSeconds() * 1000 / max(1, stats.rxPackets),
            "rx_ip_bytes": int(stats.rxBytes),
        }
    ns.Simulator.Destroy()
    return {"flows": out, "wall_s": wall}


def simpy_worker(packets: int) -> dict[str, float]:
    """The M/D/1 link of speed_poisson() in SimPy: a source process and a link process."""
    import random

    import simpy  # type: ignore[import-not-found]

    env = simpy.Environment()
    queue = simpy.Store(env)
    rng = random.Random(1)
    service, gap, limit, delays = 0.0001, 0.0002, 1000, []

    def source() -> Any:
        for _ in range(packets):
            yield env.timeout(rng.expovariate(1 / gap))
            if len(queue.items) < limit:
                queue.put(env.now)

    def link() -> Any:
        while True:
            sent_at = yield queue.get()
            yield env.timeout(service)
            delays.append(env.now + 0.0001 - sent_at)

    env.process(source())
    env.process(link())
    began = time.perf_counter()
    env.run()
    wall = time.perf_counter() - began
    return {
        "packets": len(delays),
        "wall_s": wall,
        "mean_delay_ms": 1000 * sum(delays) / len(delays),
    }


def _in_ns3_python(mode: str, arg: Any) -> dict[str, Any] | str:
    """Run a worker under NS3_PYTHON; its JSON result, or why it could not run."""
    if not Path(NS3_PYTHON).exists():
        return f"{NS3_PYTHON} not found (python3 -m venv /tmp/ns3venv && " \
            "/tmp/ns3venv/bin/pip install ns3 simpy)"  # fmt: skip
    proc = subprocess.run(
        [NS3_PYTHON, __file__, mode, json.dumps(arg)], capture_output=True, text=True, timeout=900
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return f"{mode} failed: {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(lines[-1])


# -- our side -------------------------------------------------------------------------------


def scenario_of(spec: dict[str, Any]) -> Any:
    from appliance.qos.scenario import parse_scenario

    path = [link["name"] for link in spec["links"]]
    flows = [flow | {"path": path} for flow in spec["flows"]]
    return parse_scenario({"seed": 1, **spec, "flows": flows})


def cross_check(skip_ns3: bool) -> None:
    from appliance.qos.simulator import simulate

    print("== cross-check against ns-3 (same scenario, packets on the wire incl. PPP header)")
    header = f"{'scenario':12} {'flow':5} {'':4} {'sent':>6} {'recv':>6} {'loss%':>7} " \
        f"{'kbit/s':>8} {'delay ms':>9}"  # fmt: skip
    print(header)
    for name, spec in SCENARIOS.items():
        began = time.perf_counter()
        ours = simulate(scenario_of(spec))
        our_wall = time.perf_counter() - began
        theirs = "skipped (--skip-ns3)" if skip_ns3 else _in_ns3_python("--ns3-worker", spec)
        duration = spec["duration_s"]
        for flow in spec["flows"]:
            f = ours["flows"][flow["name"]]
            rows = [("ours", f["sent"], f["received"], f["loss_ratio"], f["delay_ms"]["mean"])]
            rate = (
                f.get("goodput_kbps") or f["received"] * flow["packet_bytes"] * 8 / duration / 1000
            )
            rates = [rate]
            if isinstance(theirs, dict):
                t = theirs["flows"][flow["name"]]
                loss = 1 - t["received"] / t["sent"] if t["sent"] else 0.0
                rows.append(("ns-3", t["sent"], t["received"], loss, t["delay_mean_ms"]))
                if flow["kind"] == "bulk":  # payload: IP bytes minus 40 of TCP/IP headers
                    payload = t["rx_ip_bytes"] * 1460 / 1500
                    rates.append(payload * 8 / duration / 1000)
                else:
                    rates.append(t["received"] * flow["packet_bytes"] * 8 / duration / 1000)
            for (side, sent, received, loss, delay), kbps in zip(rows, rates, strict=True):
                print(f"{name:12} {flow['name']:5} {side:4} {sent:6d} {received:6d} "
                      f"{100 * loss:7.2f} {kbps:8.1f} {delay or 0:9.1f}")  # fmt: skip
        wall = f", ns-3 {theirs['wall_s']:.3f} s" if isinstance(theirs, dict) else ""
        print(f"{'':12} wall: ours {our_wall:.3f} s{wall}")
        if isinstance(theirs, str):
            print(f"{'':12} ns-3: {theirs}")
    print("  (kbit/s: CBR = received x packet size / duration; TCP = payload goodput)")


def speed(skip_ns3: bool) -> None:
    from appliance.qos.predict import predict_study
    from appliance.qos.scenario import parse_scenario
    from appliance.qos.simulator import simulate

    print("\n== speed")
    lan = {"name": "lan", "capacity_kbps": 100_000, "delay_ms": 0.1, "queue_packets": 1000}
    cases = {
        "poisson 50 Mbit/s, 60 s (M/D/1, rho 0.5)": {"name": "p", "kind": "cbr",
            "packet_bytes": 1250, "interval_ms": 0.2, "arrivals": "poisson", "path": ["lan"]},
        "tcp bulk 100 Mbit/s, 60 s": {"name": "b", "kind": "bulk", "path": ["lan"]},
    }  # fmt: skip
    for label, flow in cases.items():
        scenario = parse_scenario({"duration_s": 60, "links": [lan], "flows": [flow]})
        began = time.perf_counter()
        result = simulate(scenario)
        wall = time.perf_counter() - began
        packets = result["flows"][flow["name"]]["sent"]
        rates = f"{result['events'] / wall:,.0f} events/s, {packets / wall:,.0f} packets/s"
        print(f"  {label}: {result['events']} events, {packets} packets in {wall:.2f} s: {rates}")
    if not skip_ns3:
        simpy = _in_ns3_python("--simpy-worker", 300_000)
        if isinstance(simpy, dict):
            print(f"  the same M/D/1 link in SimPy: {simpy['packets']} packets in "
                  f"{simpy['wall_s']:.2f} s: {simpy['packets'] / simpy['wall_s']:,.0f} packets/s "
                  f"(mean delay {simpy['mean_delay_ms']:.4f} ms)")  # fmt: skip
        else:
            print(f"  SimPy comparison: {simpy}")
    for downlink in (3000, 20_000):
        began = time.perf_counter()
        p = predict_study(10**9, [800, 800, 800, 800], downlink)
        wall = time.perf_counter() - began
        print(f"  predict 1 GB from 4 x 800 kbit/s into {downlink} kbit/s: {wall:.2f} s wall "
              f"(target < 5 s), {p.steps} steps; predicted {p.seconds:.0f} s, "
              f"bound {p.lower_bound_s:.0f} s")  # fmt: skip
    began = time.perf_counter()
    p = predict_study(10**9, [800, 3000, 1000, 512], 20_000, latency_ms=60)
    wall = time.perf_counter() - began
    print(f"  predict 1 GB from 800/3000/1000/512 kbit/s, 60 ms: {wall:.2f} s wall, "
          f"{p.steps} steps; predicted {p.seconds:.0f} s, "
          f"bound {p.lower_bound_s:.0f} s")  # fmt: skip


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--ns3-worker":
        print(json.dumps(ns3_worker(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--simpy-worker":
        print(json.dumps(simpy_worker(int(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-ns3", action="store_true", help="only our simulator")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    cross_check(args.skip_ns3)
    speed(args.skip_ns3)


if __name__ == "__main__":
    main()
