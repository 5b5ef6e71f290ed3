"""The QoS simulator (appliance.qos.simulator) against queueing theory and its own contract.

Rates in kbit/s, sizes in bytes on the link, times in seconds unless a key says _ms.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from appliance.qos.scenario import parse_scenario
from appliance.qos.simulator import simulate
from appliance.qos.stats_flow import percentile, rfc3550_jitter
from appliance.qos.traffic import draw


def run(links: list[dict[str, Any]], flows: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    data = {"duration_s": 120, "seed": 1, "links": links, "flows": flows} | top
    return simulate(parse_scenario(data))


def link(name: str = "wan", **keys: Any) -> dict[str, Any]:
    return {"name": name, "capacity_kbps": 128, "queue_packets": 50, "delay_ms": 100} | keys


def cbr(name: str, size: int, interval_ms: float, path: list[str], **keys: Any) -> dict[str, Any]:
    flow = {"name": name, "kind": "cbr", "packet_bytes": size, "interval_ms": interval_ms}
    return flow | {"path": path} | keys


# -- analytic cases ---------------------------------------------------------------------------


def test_load_below_capacity_loses_nothing_and_leaves_capacity_minus_load() -> None:
    # 1000 B every 90 ms = 88.9 kbit/s on 128 kbit/s: the queue never builds up.
    r = run([link()], [cbr("ecg", 1000, 90, ["wan"])])
    ecg, wan = r["flows"]["ecg"], r["links"]["wan"]
    load = 8 * 1000 / 0.090 / 1000
    assert ecg["sent"] == ecg["received"] == math.ceil(120 / 0.090)
    assert ecg["dropped"] == 0 and ecg["loss_ratio"] == 0
    assert wan["remaining_kbps"] == pytest.approx(128 - load, abs=0.1)
    assert wan["utilisation"] == pytest.approx(load / 128, abs=1e-3)
    assert ecg["throughput_kbps"] == pytest.approx(load, rel=2e-3)
    # Every packet: 62.5 ms on the wire + 100 ms propagation, never a wait.
    assert ecg["delay_ms"] == pytest.approx(
        {"mean": 162.5, "p50": 162.5, "p95": 162.5, "max": 162.5}
    )
    assert ecg["jitter_ms"] == pytest.approx(0, abs=1e-9)
    assert ecg["ipt_ms"]["mean"] == pytest.approx(90)


def test_flows_sharing_a_link_add_up() -> None:
    flows = [cbr("a", 600, 100, ["wan"]), cbr("b", 300, 50, ["wan"], start_s=0.013)]
    r = run([link()], flows)
    assert r["flows"]["a"]["dropped"] == r["flows"]["b"]["dropped"] == 0
    assert r["links"]["wan"]["remaining_kbps"] == pytest.approx(128 - 48 - 48, abs=0.1)


@pytest.mark.parametrize("queue", [{"queue_packets": 50}, {"queue_bytes": 20_000}])
def test_overload_loses_one_minus_capacity_over_load(queue: dict[str, int]) -> None:
    # 160 kbit/s offered to 128 kbit/s for 20 minutes: the 50-packet transient is ~0.2 %.
    wan = {"name": "wan", "capacity_kbps": 128, "delay_ms": 100} | queue
    r = run([wan], [cbr("ecg", 1000, 50, ["wan"])], duration_s=1200)
    ecg = r["flows"]["ecg"]
    assert ecg["loss_ratio"] == pytest.approx(1 - 128 / 160, abs=0.005)
    assert ecg["sent"] == ecg["received"] + ecg["dropped"]
    assert ecg["throughput_kbps"] == pytest.approx(128, rel=0.005)
    assert r["links"]["wan"]["remaining_kbps"] == pytest.approx(0, abs=0.5)
    # A full queue of 50 x 1000 B (or 20 kB) ahead: 50 or 20 packet times + own + propagation.
    waiting = queue.get("queue_packets", 20)
    assert ecg["delay_ms"]["max"] == pytest.approx(62.5 * (waiting + 1) + 100, abs=62.5)


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_poisson_arrivals_of_fixed_packets_wait_as_md1(rho: float) -> None:
    # M/D/1: mean wait W = rho / (2 mu (1 - rho)); P(no wait) = 1 - rho (PASTA).
    service = 0.001  # 1250 B at 10 Mbit/s
    lan = {"name": "lan", "capacity_kbps": 10_000, "queue_packets": 100_000, "delay_ms": 1}
    flow = cbr("p", 1250, 1000 * service / rho, ["lan"], arrivals="poisson")
    r = run([lan], [flow], duration_s=200_000 * service / rho)
    p = r["flows"]["p"]
    wait_ms = p["delay_ms"]["mean"] - 1000 * service - 1
    expected_ms = 1000 * rho * service / (2 * (1 - rho))
    assert p["dropped"] == 0
    assert wait_ms == pytest.approx(expected_ms, rel=0.05 if rho == 0.5 else 0.1)
    assert r["links"]["lan"]["utilisation"] == pytest.approx(rho, rel=0.02)


def test_md1_share_of_packets_that_do_not_wait() -> None:
    lan = {"name": "lan", "capacity_kbps": 10_000, "queue_packets": 100_000, "delay_ms": 0}
    flow = cbr("p", 1250, 2.0, ["lan"], arrivals="poisson")  # rho = 0.5
    data = {"duration_s": 200, "seed": 3, "links": [lan], "flows": [flow]}
    r = simulate(parse_scenario(data), samples=True)
    delays = [d for _, d in r["flows"]["p"]["samples"]]
    no_wait = sum(1 for d in delays if d is not None and d < 1.0 + 1e-9) / len(delays)
    assert no_wait == pytest.approx(0.5, abs=0.01)


# -- queue and loss semantics --------------------------------------------------------------------


def burst_link(**queue: int) -> dict[str, Any]:
    return {"name": "l", "capacity_kbps": 1000, "delay_ms": 5} | queue


def burst(frame_packets: int) -> dict[str, Any]:
    """Once a second, `frame_packets` packets of 100 B at the same instant (fixed-size frames)."""
    return {"name": "v", "kind": "vbr", "frame_rate": 1, "frame_bytes": 100 * frame_packets,
            "frame_cv": 0, "packet_bytes": 100, "path": ["l"]}  # fmt: skip


def test_the_packet_on_the_wire_does_not_count_toward_queue_packets() -> None:
    # 10 packets at once into queue_packets = 3: one transmitted at once, 3 wait, 6 dropped.
    r = run([burst_link(queue_packets=3)], [burst(10)], duration_s=10)
    assert (r["flows"]["v"]["received"], r["flows"]["v"]["dropped"]) == (40, 60)
    assert r["links"]["l"]["tail_drops"] == 60


def test_queue_bytes_counts_waiting_bytes_only() -> None:
    # 250 bytes of queue: 100 B on the wire, 2 x 100 B waiting, the third would make 300.
    r = run([burst_link(queue_bytes=250)], [burst(10)], duration_s=10)
    assert (r["flows"]["v"]["received"], r["flows"]["v"]["dropped"]) == (30, 70)


def test_zero_queue_keeps_only_the_packet_on_the_wire() -> None:
    r = run([burst_link(queue_packets=0)], [burst(5)], duration_s=10)
    assert (r["flows"]["v"]["received"], r["flows"]["v"]["dropped"]) == (10, 40)


def test_random_loss_hits_after_transmission() -> None:
    lossy = link(loss=0.1, capacity_kbps=1000)
    r = run([lossy], [cbr("c", 500, 10, ["wan"])], duration_s=600)
    c, wan = r["flows"]["c"], r["links"]["wan"]
    assert c["loss_ratio"] == pytest.approx(0.1, abs=0.01)
    assert wan["line_losses"] == c["dropped"] and wan["tail_drops"] == 0
    # The lost packets used the line too: utilisation is the whole offered load.
    assert wan["utilisation"] == pytest.approx(400 / 1000, rel=1e-3)


def test_a_path_adds_up_its_links() -> None:
    links = [link("lan", capacity_kbps=10_000, delay_ms=1), link("wan")]
    r = run(links, [cbr("c", 1000, 200, ["lan", "wan"])])
    # 0.8 ms + 1 ms on the LAN, 62.5 ms + 100 ms on the WAN, no queueing.
    assert r["flows"]["c"]["delay_ms"]["max"] == pytest.approx(164.3)
    assert r["links"]["lan"]["utilisation"] == pytest.approx(40 / 10_000, rel=1e-2)


def test_the_bottleneck_of_a_path_drops_not_the_access_link() -> None:
    links = [link("lan", capacity_kbps=10_000, delay_ms=1), link("wan")]
    r = run(links, [cbr("c", 1000, 50, ["lan", "wan"])], duration_s=1200)
    assert r["links"]["lan"]["tail_drops"] == 0
    assert r["flows"]["c"]["loss_ratio"] == pytest.approx(0.2, abs=0.005)


# -- traffic models -----------------------------------------------------------------------------


def test_onoff_sends_at_its_duty_cycle() -> None:
    voip = {"name": "v", "kind": "onoff", "packet_bytes": 240, "interval_ms": 20,
            "on_ms": 1000, "off_ms": 1500, "path": ["wan"]}  # fmt: skip
    r = run([link(capacity_kbps=1000)], [voip], duration_s=3000)
    v = r["flows"]["v"]
    # 96 kbit/s while on, on 40 % of the time (plus the packet every burst starts with).
    assert v["throughput_kbps"] == pytest.approx(96 * 0.4, rel=0.05)
    assert v["offered_kbps"] == pytest.approx(96 * 0.4)


@pytest.mark.parametrize("cv", [0.0, 0.5])
def test_vbr_carries_its_mean_frame_rate(cv: float) -> None:
    video = {"name": "v", "kind": "vbr", "frame_rate": 25, "frame_bytes": 4000,
             "frame_cv": cv, "path": ["wan"]}  # fmt: skip
    r = run([link(capacity_kbps=3000)], [video], duration_s=600)
    assert r["flows"]["v"]["throughput_kbps"] == pytest.approx(800, rel=0.03)
    assert r["flows"]["v"]["dropped"] == 0


def test_a_lone_bulk_transfer_fills_the_line() -> None:
    r = run([link()], [{"name": "ftp", "kind": "bulk", "path": ["wan"]}], duration_s=300)
    ftp = r["flows"]["ftp"]
    assert ftp["throughput_kbps"] == pytest.approx(128, rel=0.01)
    assert ftp["goodput_kbps"] == pytest.approx(128 * 1460 / 1500, rel=0.01)
    assert r["links"]["wan"]["remaining_kbps"] < 1.3


def test_a_finite_bulk_transfer_completes_no_sooner_than_the_line_allows() -> None:
    ftp = {"name": "ftp", "kind": "bulk", "path": ["wan"], "size_bytes": "500 kB"}
    r = run([link(queue_packets=100)], [ftp])
    done = r["flows"]["ftp"]["completed_s"]
    line_s = 500_000 / 1460 * 1500 * 8 / 128_000
    assert line_s < done < line_s * 1.1


def test_a_peak_rate_caps_a_bulk_transfer() -> None:
    ftp = {"name": "ftp", "kind": "bulk", "path": ["wan"], "peak_kbps": 64}
    r = run([link()], [ftp])
    assert r["flows"]["ftp"]["throughput_kbps"] == pytest.approx(64, rel=0.01)
    assert r["flows"]["ftp"]["dropped"] == 0


def test_bulk_transfers_share_a_line() -> None:
    flows = [{"name": f"b{i}", "kind": "bulk", "path": ["wan"]} for i in range(2)]
    r = run([link(capacity_kbps=800, delay_ms=20)], flows, duration_s=600)
    rates = [f["throughput_kbps"] for f in r["flows"].values()]
    assert sum(rates) == pytest.approx(800, rel=0.01)
    assert min(rates) > 0.25 * 800  # drop-tail is not fair, but neither starves here


def test_consults_take_at_least_their_transfer_time() -> None:
    consult = {"name": "c", "kind": "consult", "path": ["wan"], "think_ms": 3000}
    r = run([link()], [consult], duration_s=600)
    c = r["flows"]["c"]
    line_ms = 1000 * 10_000 * 8 / 128_000  # the smallest request on the wire, payload only
    assert c["transfers"] > 50
    assert c["transfer_ms"]["p50"] > line_ms + 200  # plus a round trip at least


@pytest.mark.parametrize("distribution", ["exponential", "pareto", "fixed"])
def test_periods_and_think_times_have_the_mean_asked_for(distribution: str) -> None:
    rng = random.Random(5)
    values = [draw(rng, distribution, 2.0, 3.0) for _ in range(200_000)]
    assert sum(values) / len(values) == pytest.approx(2.0, rel=0.02)
    if distribution == "pareto":
        assert min(values) == pytest.approx(2.0 * 2 / 3, rel=1e-3)  # the scale, mean (a-1)/a


# -- contract ----------------------------------------------------------------------------------


MIXED = {
    "duration_s": 60,
    "seed": 7,
    "links": [{"name": "lan", "preset": "lan"}, {"name": "up", "preset": "adsl-up"}],
    "flows": [
        {"name": "ecg", "kind": "cbr", "packet_bytes": 200, "interval_ms": 40,
         "path": ["lan", "up"], "arrivals": "poisson"},
        {"name": "voip", "kind": "onoff", "packet_bytes": 240, "interval_ms": 20,
         "on_ms": 800, "off_ms": 800, "distribution": "pareto", "path": ["up"]},
        {"name": "video", "kind": "vbr", "frame_rate": 12, "frame_bytes": 3000, "path": ["up"]},
        {"name": "study", "kind": "bulk", "path": ["lan", "up"]},
        {"name": "consult", "kind": "consult", "path": ["up"], "think_ms": 500},
    ],
}  # fmt: skip


def test_same_seed_same_result_other_seed_other_result() -> None:
    a = simulate(parse_scenario(MIXED), samples=True)
    b = simulate(parse_scenario(MIXED), samples=True)
    c = simulate(parse_scenario(MIXED | {"seed": 8}), samples=True)
    assert a == b
    assert a["flows"] != c["flows"]


def test_every_packet_sent_is_received_or_dropped() -> None:
    r = simulate(parse_scenario(MIXED), samples=True)
    for name, f in r["flows"].items():
        assert f["sent"] == f["received"] + f["dropped"], name
        samples = f["samples"]
        assert len(samples) == f["sent"]
        assert sum(1 for _, d in samples if d is None) == f["dropped"]
        assert [s for s, _ in samples] == sorted(s for s, _ in samples)
        assert f["loss_ratio"] == pytest.approx(f["dropped"] / f["sent"])


def test_rfc3550_jitter_and_percentiles() -> None:
    # Transit times alternating 0 and 16 ms: each |D| is 16 ms, J -> 16 ms from below.
    transits = [0.016 * (i % 2) for i in range(200)]
    assert rfc3550_jitter(transits) == pytest.approx(0.016, rel=1e-4)
    assert rfc3550_jitter([0.0, 0.016]) == pytest.approx(0.001)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
