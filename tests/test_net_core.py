"""The net subsystem's pure parts: reconcile diff, routing plan, health state machine,
WireGuard planning and UAPI text (no I/O, no privileges)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses

import pytest

from appliance.mesh.peers import Peer
from appliance.net import plan
from appliance.net.binding import UplinkBinding
from appliance.net.config import HealthConfig
from appliance.net.health import TRANSITIONS, Health, HealthFSM, ProbeEvent, ProbeResult
from appliance.net.monitor import UplinkMonitor
from appliance.net.reconcile import (
    AddAddress,
    AddRule,
    DelAddress,
    DelRoute,
    DelRule,
    DelShaper,
    NetState,
    Observed,
    ReplaceRoute,
    ReplaceShaper,
    Route,
    Rule,
    describe,
    diff,
    teardown,
)
from appliance.net.wg_userspace import parse_get, set_request
from appliance.net.wireguard import WgDevice, WgPeer, WgUpdate, tunnel_peers, update_for

# ----------------------------------------------------------------------------- reconcile


def facts(n: int = 2, **over) -> list[plan.UplinkFacts]:
    out = []
    for i in range(n):
        values = dict(
            index=i,
            name=f"adsl{i + 1}",
            interface=f"eth{i + 1}",
            source=f"192.168.{i + 1}.2",
            gateway=f"192.168.{i + 1}.1",
        )
        values.update(over)
        out.append(plan.UplinkFacts(**values))
    return out


def observed_as(state: NetState, **extra) -> Observed:
    return Observed(state.rules, state.routes, state.shapers, state.addresses, **extra)


def test_plan_gives_each_uplink_its_table_mark_and_rules() -> None:
    state = plan.desired_state(facts(2), None, None)
    assert state.routes == {
        Route(2100, "0.0.0.0/0", "eth1", "192.168.1.1", "192.168.1.2"),
        Route(2101, "0.0.0.0/0", "eth2", "192.168.2.1", "192.168.2.2"),
    }
    assert state.rules == {
        Rule(1000, 2100, fwmark=0x4D10, fwmask=0xFFFF),
        Rule(1001, 2101, fwmark=0x4D11, fwmask=0xFFFF),
        Rule(1100, 2100, src="192.168.1.2"),
        Rule(1101, 2101, src="192.168.2.2"),
    }
    assert all(plan.is_our_priority(r.priority) for r in state.rules)
    assert all(plan.is_our_table(r.table) for r in state.routes)


def test_plan_without_address_or_lease_keeps_only_what_it_can() -> None:
    state = plan.desired_state(facts(1, source=None, gateway=None), None, None)
    assert state.rules == {Rule(1000, 2100, fwmark=0x4D10, fwmask=0xFFFF)}
    assert state.routes == frozenset()


def test_plan_with_tunnels_routes_the_overlay_through_each_uplinks_tunnel() -> None:
    ups = [
        dataclasses.replace(f, tunnel=f"dmwg{f.index}", overlay_address=f"10.90.1.{f.index + 1}")
        for f in facts(2)
    ]
    state = plan.desired_state(ups, "10.90.0.0/16", overlay_default=1)
    assert Route(2101, "10.90.0.0/16", "dmwg1", None, "10.90.1.2") in state.routes
    assert Rule(1201, 2101, src="10.90.1.2") in state.rules
    assert Rule(1290, 2101, dst="10.90.0.0/16") in state.rules
    assert {(a.interface, a.address, a.prefixlen) for a in state.addresses} == {
        ("dmwg0", "10.90.1.1", 32),
        ("dmwg1", "10.90.1.2", 32),
    }


def test_diff_from_nothing_adds_everything_in_dependency_order() -> None:
    ups = [dataclasses.replace(facts(1)[0], tunnel="dmwg0", overlay_address="10.90.1.1")]
    ups[0] = dataclasses.replace(ups[0], shaper=plan.shaper_for("eth1", 760, 200))
    desired = plan.desired_state(ups, "10.90.0.0/16", 0)
    ops = diff(desired, Observed())
    kinds = [type(op) for op in ops]
    assert kinds.index(AddAddress) < kinds.index(ReplaceRoute) < kinds.index(AddRule)
    assert ReplaceShaper in kinds
    assert len(ops) == 1 + 2 + 4 + 1  # address, 2 routes, 4 rules, 1 shaper


def test_diff_of_agreeing_states_is_empty() -> None:
    desired = plan.desired_state(facts(3), None, None)
    assert diff(desired, observed_as(desired)) == []


def test_diff_restores_a_deleted_rule_and_route() -> None:
    desired = plan.desired_state(facts(2), None, None)
    lost_rule = Rule(1101, 2101, src="192.168.2.2")
    lost_route = next(r for r in desired.routes if r.table == 2100)
    damaged = NetState(desired.rules - {lost_rule}, desired.routes - {lost_route})
    assert diff(desired, observed_as(damaged)) == [ReplaceRoute(lost_route), AddRule(lost_rule)]


def test_diff_replaces_a_changed_route_and_swaps_a_changed_rule() -> None:
    desired = plan.desired_state(facts(1), None, None)
    old_route = Route(2100, "0.0.0.0/0", "eth1", "192.168.1.254", "192.168.1.2")
    old_rule = Rule(1100, 2100, src="192.168.1.9")
    have = NetState(
        (desired.rules - {Rule(1100, 2100, src="192.168.1.2")}) | {old_rule},
        frozenset({old_route}),
    )
    ops = diff(desired, observed_as(have))
    new_route = next(iter(desired.routes))
    assert ops == [
        ReplaceRoute(new_route),
        AddRule(Rule(1100, 2100, src="192.168.1.2")),
        DelRule(old_rule),
    ]


def test_diff_removes_ours_that_is_no_longer_wanted() -> None:
    both = plan.desired_state(facts(2), None, None)
    one = plan.desired_state(facts(1), None, None)
    ops = diff(one, observed_as(both))
    assert {type(op) for op in ops} == {DelRule, DelRoute}
    assert all(op.rule.table == 2101 for op in ops if isinstance(op, DelRule))


def test_teardown_removes_exactly_what_is_observed_as_ours() -> None:
    ups = [dataclasses.replace(facts(1)[0], tunnel="dmwg0", overlay_address="10.90.1.1")]
    ups[0] = dataclasses.replace(ups[0], shaper=plan.shaper_for("eth1", 760, 200))
    state = plan.desired_state(ups, "10.90.0.0/16", 0)
    ops = teardown(observed_as(state))
    assert len(ops) == len(state.rules) + len(state.routes) + 1 + 1
    assert {type(op) for op in ops} == {DelRule, DelRoute, DelShaper, DelAddress}
    assert teardown(Observed()) == []


def test_a_foreign_root_qdisc_is_never_replaced() -> None:
    ups = [dataclasses.replace(facts(1)[0], shaper=plan.shaper_for("eth1", 760, 200))]
    desired = plan.desired_state(ups, None, None)
    have = observed_as(dataclasses.replace(desired, shapers=frozenset()))
    assert ReplaceShaper(next(iter(desired.shapers))) in diff(desired, have)
    have = dataclasses.replace(have, foreign_root_qdisc=frozenset({"eth1"}))
    assert diff(desired, have) == []


def test_shaper_is_compared_by_what_the_kernel_reports() -> None:
    s = plan.shaper_for("eth1", 8000, 200)
    assert (s.rate_bytes_s, s.burst_bytes) == (1_000_000, 16_000)
    assert s.limit_bytes == 200_000 + 16_000
    assert dataclasses.replace(s, burst_bytes=0) == s  # read back without the bucket size


def test_every_operation_describes_itself() -> None:
    state = plan.desired_state(facts(1), None, None)
    lines = [describe(op) for op in diff(state, Observed())]
    assert "route replace 0.0.0.0/0 via 192.168.1.1 dev eth1 src 192.168.1.2 table 2100" in lines
    assert "rule add pref 1000 fwmark 0x4d10/0xffff lookup 2100" in lines


# ----------------------------------------------------------------------------- health

HC = HealthConfig(down_after=3, up_after=2, degraded_rtt_ms=100, degraded_loss=0.3, window=4)
OK, SLOW, LOST = ProbeResult(True, 0.01), ProbeResult(True, 0.5), ProbeResult(False)


def test_every_cell_of_the_table_is_defined() -> None:
    assert set(TRANSITIONS) == {(s, e) for s in Health for e in ProbeEvent}


# One test per cell: (state, event) -> expected next state.
CELLS = {
    (Health.UNKNOWN, ProbeEvent.MISS): Health.UNKNOWN,
    (Health.UNKNOWN, ProbeEvent.LOSSY): Health.DEGRADED,
    (Health.UNKNOWN, ProbeEvent.FAIL_STREAK): Health.DOWN,
    (Health.UNKNOWN, ProbeEvent.POOR): Health.DEGRADED,
    (Health.UNKNOWN, ProbeEvent.POOR_STREAK): Health.DEGRADED,
    (Health.UNKNOWN, ProbeEvent.GOOD): Health.UP,
    (Health.UNKNOWN, ProbeEvent.GOOD_STREAK): Health.UP,
    (Health.UP, ProbeEvent.MISS): Health.UP,
    (Health.UP, ProbeEvent.LOSSY): Health.DEGRADED,
    (Health.UP, ProbeEvent.FAIL_STREAK): Health.DOWN,
    (Health.UP, ProbeEvent.POOR): Health.DEGRADED,
    (Health.UP, ProbeEvent.POOR_STREAK): Health.DEGRADED,
    (Health.UP, ProbeEvent.GOOD): Health.UP,
    (Health.UP, ProbeEvent.GOOD_STREAK): Health.UP,
    (Health.DEGRADED, ProbeEvent.MISS): Health.DEGRADED,
    (Health.DEGRADED, ProbeEvent.LOSSY): Health.DEGRADED,
    (Health.DEGRADED, ProbeEvent.FAIL_STREAK): Health.DOWN,
    (Health.DEGRADED, ProbeEvent.POOR): Health.DEGRADED,
    (Health.DEGRADED, ProbeEvent.POOR_STREAK): Health.DEGRADED,
    (Health.DEGRADED, ProbeEvent.GOOD): Health.DEGRADED,
    (Health.DEGRADED, ProbeEvent.GOOD_STREAK): Health.UP,
    (Health.DOWN, ProbeEvent.MISS): Health.DOWN,
    (Health.DOWN, ProbeEvent.LOSSY): Health.DOWN,
    (Health.DOWN, ProbeEvent.FAIL_STREAK): Health.DOWN,
    (Health.DOWN, ProbeEvent.POOR): Health.DOWN,
    (Health.DOWN, ProbeEvent.POOR_STREAK): Health.DEGRADED,
    (Health.DOWN, ProbeEvent.GOOD): Health.DOWN,
    (Health.DOWN, ProbeEvent.GOOD_STREAK): Health.UP,
}


@pytest.mark.parametrize(("cell", "expected"), list(CELLS.items()), ids=lambda v: str(v))
def test_transition_cell(cell: tuple[Health, ProbeEvent], expected: Health) -> None:
    assert TRANSITIONS[cell] is expected


# Probe sequences that produce each event (classification, with the counters).
@pytest.mark.parametrize(
    ("history", "last", "event"),
    [
        ([], LOST, ProbeEvent.MISS),
        ([LOST], LOST, ProbeEvent.MISS),
        ([LOST, LOST], LOST, ProbeEvent.FAIL_STREAK),
        ([OK, OK, LOST], LOST, ProbeEvent.LOSSY),  # 2 of 4 lost > 0.3, streak only 2
        ([], OK, ProbeEvent.GOOD),
        ([OK], OK, ProbeEvent.GOOD_STREAK),
        ([], SLOW, ProbeEvent.POOR),
        ([SLOW], SLOW, ProbeEvent.POOR_STREAK),
        ([SLOW], OK, ProbeEvent.GOOD),  # the good streak restarts after a poor answer
        ([OK, LOST, OK], OK, ProbeEvent.GOOD_STREAK),  # 1 of 4 lost: not lossy
        ([LOST, OK, LOST], OK, ProbeEvent.POOR),  # 2 of 4 lost: answered, but lossy
    ],
)
def test_probe_results_classify_into_events(history, last, event) -> None:
    fsm = HealthFSM(HC)
    for result in history:
        fsm.classify(result)
    assert fsm.classify(last) is event


def run(fsm: HealthFSM, results: list[ProbeResult]) -> list[Health]:
    return [fsm.feed(r)[1] for r in results]


def test_hysteresis_down_after_failures_up_after_successes() -> None:
    fsm = HealthFSM(HC)
    # Two misses in a row, window not yet full: still up.
    assert run(fsm, [OK, LOST, LOST]) == [Health.UP, Health.UP, Health.UP]
    assert run(fsm, [LOST]) == [Health.DOWN]  # the third failure in a row
    assert run(fsm, [OK]) == [Health.DOWN]  # one answer is not enough
    # Half the window lost: the answers are poor (a down line comes back degraded), then
    # up_after good ones make it up.
    expected = [Health.DEGRADED, Health.DEGRADED, Health.UP, Health.UP]
    assert run(fsm, [OK, OK, OK, OK]) == expected


def test_a_slow_line_is_degraded_then_recovers() -> None:
    fsm = HealthFSM(HC)
    assert run(fsm, [OK, SLOW, OK, OK]) == [Health.UP, Health.DEGRADED, Health.DEGRADED, Health.UP]


def test_only_down_is_unusable() -> None:
    assert [h.usable for h in Health] == [True, True, True, False]


# ----------------------------------------------------------------------------- WireGuard

K = [bytes([i]) * 32 for i in range(1, 6)]
B64 = [base64.b64encode(k).decode() for k in K]


def test_multi_tunnel_peer_gives_one_wireguard_peer_per_key() -> None:
    peer = Peer(
        "site-b",
        B64[0],
        ["10.90.2.1", "10.90.2.2"],
        tunnel_keys=[B64[1]],
        endpoints=["203.0.113.1:51820", "203.0.113.2:51821"],
    )
    assert tunnel_peers([peer], 0, 25) == (
        WgPeer(K[0], ("10.90.2.1/32",), "203.0.113.1:51820", 25),
        WgPeer(K[1], ("10.90.2.2/32",), "203.0.113.2:51821", 25),
    )


def test_single_key_peer_owns_all_addresses_and_spreads_endpoints_over_our_uplinks() -> None:
    peer = Peer("pacs", B64[2], ["10.90.3.1", "10.90.3.9"], endpoints=["a.example:1", "b:2"])
    assert [tunnel_peers([peer], i, 0)[0].endpoint for i in range(3)] == [
        "a.example:1",
        "b:2",
        "a.example:1",
    ]
    assert tunnel_peers([peer], 0, 0)[0].allowed_ips == ("10.90.3.1/32", "10.90.3.9/32")


def device(peers: tuple[WgPeer, ...], **over) -> WgDevice:
    values = dict(ifname="dmwg0", private_key=K[4], listen_port=51820, fwmark=0x4D10, peers=peers)
    values.update(over)
    return WgDevice(**values)


def test_update_is_empty_when_the_device_agrees() -> None:
    peers = (WgPeer(K[0], ("10.90.2.1/32",), "198.51.100.1:51820", 25),)
    desired = device(peers)
    assert update_for(desired, desired, desired).empty


def test_update_sets_what_differs_and_removes_unknown_peers() -> None:
    wanted = WgPeer(K[0], ("10.90.2.1/32",), "198.51.100.1:51820", 25)
    stranger = WgPeer(K[1], ("10.90.9.9/32",), None, 0)
    observed = device((stranger,), private_key=b"\0" * 32, listen_port=0, fwmark=0)
    update = update_for(device((wanted,)), observed, None)
    assert update == WgUpdate("dmwg0", K[4], 51820, 0x4D10, remove=(K[1],), upsert=(wanted,))


def test_a_roamed_endpoint_is_not_reset() -> None:
    wanted = WgPeer(K[0], ("10.90.2.1/32",), "198.51.100.1:51820", 25)
    roamed = dataclasses.replace(wanted, endpoint="198.51.100.7:40000")
    assert update_for(device((wanted,)), device((roamed,)), device((wanted,))).empty
    moved = dataclasses.replace(wanted, endpoint="198.51.100.2:51820")  # the registry changed
    assert update_for(device((moved,)), device((roamed,)), device((wanted,))).upsert == (moved,)


def test_uapi_set_request_golden() -> None:
    update = WgUpdate(
        "dmwg0",
        private_key=K[4],
        listen_port=51820,
        fwmark=0x4D10,
        remove=(K[1],),
        upsert=(WgPeer(K[0], ("10.90.2.1/32",), "198.51.100.1:51820", 25),),
    )
    assert set_request(update) == (
        "set=1\n"
        f"private_key={K[4].hex()}\n"
        "listen_port=51820\n"
        "fwmark=19728\n"
        f"public_key={K[1].hex()}\n"
        "remove=true\n"
        f"public_key={K[0].hex()}\n"
        "endpoint=198.51.100.1:51820\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.90.2.1/32\n"
        "\n"
    )


def test_uapi_get_reply_parsed() -> None:
    reply = (
        f"private_key={K[4].hex()}\nlisten_port=51820\nfwmark=19728\n"
        f"public_key={K[0].hex()}\nendpoint=198.51.100.1:51820\n"
        "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\n"
        "tx_bytes=10\nrx_bytes=20\npersistent_keepalive_interval=25\n"
        "allowed_ip=10.90.2.1/32\nprotocol_version=1\nerrno=0\n"
    )
    dev, stats = parse_get("dmwg0", reply)
    assert dev == device((WgPeer(K[0], ("10.90.2.1/32",), "198.51.100.1:51820", 25),))
    assert stats[0]["rx_bytes"] == 20 and stats[0]["last_handshake_time_sec"] == 1700000000


@pytest.mark.timeout(20)  # without the fix this hangs (stop() waits forever)
def test_monitor_stops_even_when_a_probe_swallows_the_cancellation() -> None:
    """stop() arrives just as a probe's answer completes: Python 3.11's asyncio.wait_for then
    returns the answer instead of raising CancelledError (gh-86296). The monitor must end at
    its next round anyway, not probe on forever while stop() waits for it (a CI run hung 600 s
    in tests/test_net_lab.py on this)."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        cfg = HealthConfig(interval_s=0.05, timeout_s=0.5, down_after=3, up_after=3)
        stopped: list[asyncio.Future] = []
        binding = UplinkBinding("adsl1", "127.0.0.1", 0)

        async def prober(targets, binding, timeout) -> ProbeResult:
            answer = loop.create_future()
            loop.call_soon(answer.set_result, ProbeResult(True, 0.001))
            if not stopped:  # stop() lands in the same turns as the answer
                stopped.append(asyncio.ensure_future(monitor.stop()))
            return await asyncio.wait_for(answer, timeout)

        monitor = UplinkMonitor("adsl1", cfg, lambda: (binding, ["x"]), lambda *a: None, prober)
        monitor.start()
        await asyncio.sleep(0.2)
        assert stopped, "no probe ran"
        done, _ = await asyncio.wait(stopped, timeout=2.0)
        assert done, "stop() still waiting for the monitor after 2 s"

    asyncio.run(body())
