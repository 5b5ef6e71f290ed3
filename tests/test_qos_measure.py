"""QoS measurement: probe wire format, statistics, responder admission, and `qos measure`
against real responders on loopback (in-process, through a lossy UDP relay, and inside a
running gateway)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from asynckit import run
from gateway import DICOMESH, REPO
from procs import LOOPBACK, free_port

from appliance.config import ConfigError, load_config
from appliance.mesh.peers import PEERS_FILE, Peer, PeerRegistry, add_peer
from appliance.qos import codec, probe_core
from appliance.qos.config import QosConfig
from appliance.qos.flows import (
    BulkFlow,
    CbrFlow,
    FlowSpecError,
    parse_flow,
    parse_flows,
    probe_payload,
)
from appliance.qos.measure import MeasureError, measure
from appliance.qos.probe import ProbeResponder
from appliance.qos.probe_core import ResponderCore
from appliance.qos.stats_flow import flow_stats, link_stats, percentile, rfc3550_jitter, summary

SCHEMA_FLOW = {"sent", "received", "dropped", "loss_ratio", "throughput_kbps", "jitter_ms"}
SCHEMA_DELAY = {"mean", "p50", "p95", "max"}
SCHEMA_LINK = {"capacity_kbps", "utilisation", "remaining_kbps"}


class NoPeers:
    def by_address(self, address: str) -> Peer | None:
        return None


# -- wire format --------------------------------------------------------------------------


def test_probe_golden_bytes() -> None:
    probe = codec.Probe(session=0x01020304, flow=7, seq=9, sent_ns=0x1122334455667788)
    wire = codec.encode_probe(probe, 32)
    assert wire == bytes.fromhex(
        "4451" "01" "07" "01020304" "00000009" "1122334455667788" "0000000000000000" "00000000"
    )  # fmt: skip
    assert codec.decode(wire) == probe


def test_echo_and_summary_round_trip() -> None:
    echo = codec.Echo(5, 1, 2, 3, 4)
    assert codec.encode(echo) == bytes.fromhex("4451020100000005000000020000000000000003"
                                               "0000000000000004")  # fmt: skip
    assert codec.decode(codec.encode(echo)) == echo
    request = codec.SummaryRequest(5, 1, 8192)
    assert codec.decode(codec.encode(request)) == request
    summary = codec.Summary(5, 1, 0, received=3, duplicates=1, bitmap=b"\x0b")
    back = codec.decode(codec.encode(summary))
    assert back == summary
    assert [s for s in range(10) if back.arrived(s)] == [0, 1, 3]


@pytest.mark.parametrize(
    "data",
    [b"", b"DQ\x01", b"XX" + bytes(26), b"DQ\x09" + bytes(25), b"DQ\x04" + bytes(25) + bytes(1025)],
    ids=["empty", "short", "magic", "kind", "bitmap"],
)
def test_malformed_datagrams_rejected(data: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(data)


def test_probe_sizes_checked() -> None:
    with pytest.raises(codec.CodecError):
        codec.encode_probe(codec.Probe(1, 0, 0, 0), codec.HEADER_BYTES - 1)
    with pytest.raises(codec.CodecError):
        codec.encode_probe(codec.Probe(1 << 32, 0, 0, 0), 100)


# -- flows and the packet size mapping ------------------------------------------------------


def test_packet_size_is_what_the_link_carries() -> None:
    # 1000 B on an Ethernet link over IPv4: 14 Ethernet + 20 IP + 8 UDP + 958 payload.
    assert probe_payload(1000, 4) == 958
    assert probe_payload(1000, 6) == 938
    assert probe_payload(1000, 4, link_overhead=0) == 972
    assert probe_payload(70, 4) == codec.HEADER_BYTES  # the smallest probe
    with pytest.raises(FlowSpecError, match="at least 70 B"):
        probe_payload(69, 4)


def test_flow_specs() -> None:
    assert parse_flow("cbr:1000:90", 1) == CbrFlow("cbr1", 1000, 90.0)
    assert parse_flow("ecg=cbr:200:20.5", 2) == CbrFlow("ecg", 200, 20.5)
    assert parse_flow("bulk:3", 3) == BulkFlow("bulk3", 3.0)
    for bad in ("cbr:1000", "cbr:x:1", "cbr:0:1", "vbr:1:2", "bulk:-1", "a b=cbr:100:1"):
        with pytest.raises(FlowSpecError):
            parse_flow(bad, 1)
    with pytest.raises(FlowSpecError, match="unique"):
        parse_flows(["a=cbr:100:10", "a=cbr:200:10"])


def test_cbr_count_matches_send_times_before_the_end() -> None:
    assert CbrFlow("a", 100, 100).count(1.0) == 10  # 0, 100, ... 900 ms
    assert CbrFlow("a", 100, 300).count(1.0) == 4  # 0, 300, 600, 900 ms
    assert CbrFlow("a", 100, 90).count(120) == 1334


# -- statistics ---------------------------------------------------------------------------


def test_rfc3550_jitter_known_sequence() -> None:
    # Transits alternate 0/10 ms: every |D| is 10, J_n = 10 (1 - (15/16)^n).
    got = rfc3550_jitter([0.0, 10.0, 0.0, 10.0, 0.0])
    assert got == pytest.approx(10 * (1 - (15 / 16) ** 4))
    assert rfc3550_jitter([5.0] * 50) == 0.0
    # A constant clock offset does not change it (RFC 3550: only differences count).
    assert rfc3550_jitter([x + 1e6 for x in (0.0, 3.0, 1.0)]) == pytest.approx(
        rfc3550_jitter([0.0, 3.0, 1.0])
    )
    assert rfc3550_jitter([1.0]) is None


def test_percentiles_match_numpy() -> None:
    values = sorted([3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0])
    for p in (0, 50, 95, 100):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))
    assert summary([]) == {"mean": None, "p50": None, "p95": None, "max": None}


def test_flow_stats_throughput_counts_arrivals_by_the_end() -> None:
    # 4 packets of 125 B (1000 bit) in 1 s; one lost, one arriving after the end.
    samples = [(0.0, 10.0), (0.25, None), (0.5, 10.0), (0.99, 20.0)]
    got = flow_stats(sent=4, received=3, packet_bytes=125, duration_s=1.0, samples=samples)
    assert (got["dropped"], got["loss_ratio"]) == (1, 0.25)
    assert got["throughput_kbps"] == pytest.approx(2.0)
    assert got["delay_ms"]["max"] == 20.0
    assert link_stats(128, 100) == {
        "capacity_kbps": 128,
        "utilisation": 100 / 128,
        "remaining_kbps": 28,
    }


# -- the responder core: admission, records, bounds ----------------------------------------


def _probe(seq: int, session: int = 1, flow: int = 0) -> bytes:
    return codec.encode_probe(codec.Probe(session, flow, seq, 1000), 40)


def test_unknown_source_gets_nothing_and_is_counted(caplog) -> None:
    core = ResponderCore(lambda address: address == "10.0.0.1")
    assert core.on_datagram(_probe(0), "10.0.0.9", 5000, 0.0) is None
    assert core.on_datagram(_probe(1), "10.0.0.9", 5000, 0.0) is None
    ask = codec.encode(codec.SummaryRequest(1, 0, 0))
    assert core.on_datagram(ask, "10.0.0.9", 5000, 0.0) is None
    assert core.counters["unknown_source"] == 3
    assert core.records == {}  # nothing recorded for a stranger
    warnings = [r for r in caplog.records if "unknown address 10.0.0.9" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"  # then debug only

    echo = codec.decode(core.on_datagram(_probe(0), "10.0.0.1", 5000, 0.0) or b"")
    assert echo == codec.Echo(1, 0, 0, 1000, 5000)


def test_records_count_arrivals_once_and_stay_bounded() -> None:
    core = ResponderCore(lambda address: True)
    for seq in (0, 2, 2, 9):
        core.on_datagram(_probe(seq), "10.0.0.1", 1, 0.0)
    ask = codec.encode(codec.SummaryRequest(1, 0, 0))
    summary_msg = codec.decode(core.on_datagram(ask, "10.0.0.1", 1, 0.0) or b"")
    assert isinstance(summary_msg, codec.Summary)
    assert (summary_msg.received, summary_msg.duplicates) == (3, 1)
    assert [s for s in range(16) if summary_msg.arrived(s)] == [0, 2, 9]
    # Another source asking about the same session learns nothing about this one.
    other = codec.decode(core.on_datagram(ask, "10.0.0.2", 1, 0.0) or b"")
    assert isinstance(other, codec.Summary) and other.received == 0

    core.on_datagram(_probe(probe_core.MAX_SEQ), "10.0.0.1", 1, 0.0)
    assert core.counters["seq_out_of_range"] == 1
    for session in range(2, 2 + probe_core.MAX_RECORDS + 5):
        core.on_datagram(_probe(0, session), "10.0.0.1", 1, 1.0)
    assert len(core.records) == probe_core.MAX_RECORDS
    core.on_datagram(_probe(0, 999), "10.0.0.1", 1, 1.0 + probe_core.RECORD_IDLE_S + 1)
    assert len(core.records) == 1  # idle records expire


def test_qos_config_section(tmp_path: Path) -> None:
    cfg = load_config(None, {"qos.lan_addresses": ["192.168.1.20"], "qos.probe_port": 9000})
    assert cfg.qos == QosConfig(enabled=True, probe_port=9000, lan_addresses=["192.168.1.20"])
    assert load_config().qos.probe_port == 7481
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"qos.lan_addresses": ["0.0.0.0", "lan"], "qos.probe_port": 0})
    assert len(exc.value.errors) == 3
    assert "qos.lan_addresses[0]: must be one address of this gateway" in str(exc.value)


def test_registry_admission_reloads_live(tmp_path: Path) -> None:
    registry = PeerRegistry(tmp_path / PEERS_FILE)
    responder = ProbeResponder(
        QosConfig(), [LOOPBACK], registry, refresh=registry.reload_if_changed, refresh_s=0.0
    )
    assert responder.admitted("127.0.0.1") and responder.admitted("::1")
    assert not responder.admitted("10.9.0.2")
    key = base64.b64encode(os.urandom(32)).decode()
    add_peer(registry.path, Peer(name="far", public_key=key, addresses=["10.9.0.2"]))
    assert responder.admitted("10.9.0.2")
    assert not responder.admitted("10.9.0.3")


# -- measure against real responders on loopback ------------------------------------------


def _check_schema(result: dict) -> None:
    for flow in result["flows"].values():
        assert set(flow) >= SCHEMA_FLOW
        assert set(flow["delay_ms"]) == SCHEMA_DELAY
    for link in result["links"].values():
        assert set(link) == SCHEMA_LINK


def test_measure_on_loopback() -> None:
    async def body() -> dict:
        responder = ProbeResponder(QosConfig(probe_port=0), [LOOPBACK], NoPeers())
        await responder.start()
        try:
            return await measure(
                LOOPBACK,
                parse_flows(["ecg=cbr:200:20", "cbr:1000:50", "bulk:0.3"]),
                duration_s=1.0,
                port=responder.port,
                link="wan",
                capacity_kbps=1000,
            )
        finally:
            await responder.stop()

    result = run(body(), max_block_s=0.2)
    _check_schema(result)
    ecg, big, bulk = (result["flows"][n] for n in ("ecg", "cbr2", "bulk3"))
    assert (ecg["sent"], ecg["received"], ecg["loss_ratio"]) == (50, 50, 0.0)
    assert (big["sent"], big["received"]) == (20, 20)
    assert ecg["throughput_kbps"] == pytest.approx(80.0)  # 200 B x 8 / 20 ms
    assert big["throughput_kbps"] == pytest.approx(160.0)
    assert 0 < ecg["delay_ms"]["p50"] < 50 and 0 < ecg["rtt_ms"]["p50"] < 50
    assert ecg["jitter_ms"] is not None and ecg["ipt_ms"]["mean"] == pytest.approx(20, abs=2)
    assert len(ecg["samples"]) == 50 and all(d is not None for _, d in ecg["samples"])
    assert ecg["samples"][10][0] == pytest.approx(0.2, abs=0.02)
    assert bulk["received"] == bulk["sent"] > 0 and bulk["throughput_kbps"] > 1000
    wan = result["links"]["wan"]
    assert wan["capacity_kbps"] == 1000
    assert wan["remaining_kbps"] == pytest.approx(1000 - result["meta"]["delivered_kbps"])


class LossyRelay(asyncio.DatagramProtocol):
    """A real UDP hop on loopback that drops chosen probes and chosen echoes."""

    def __init__(self, target: tuple[str, int], drop_probe: set[int], drop_echo: set[int]):
        self.target, self.drop_probe, self.drop_echo = target, drop_probe, drop_echo
        self.client: tuple | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        assert self.transport is not None
        msg = codec.decode(data)
        if addr == self.target:
            if not (isinstance(msg, codec.Echo) and msg.seq in self.drop_echo):
                self.transport.sendto(data, self.client)
            return
        self.client = addr
        if not (isinstance(msg, codec.Probe) and msg.seq in self.drop_probe):
            self.transport.sendto(data, self.target)


def test_forward_loss_is_counted_and_lost_echoes_are_not() -> None:
    dropped, echo_lost = {3, 4, 17}, {8, 30}

    async def body() -> dict:
        loop = asyncio.get_running_loop()
        responder = ProbeResponder(QosConfig(probe_port=0), [LOOPBACK], NoPeers())
        await responder.start()
        relay, _ = await loop.create_datagram_endpoint(
            lambda: LossyRelay((LOOPBACK, responder.port), dropped, echo_lost),
            local_addr=(LOOPBACK, 0),
        )
        try:
            return await measure(
                LOOPBACK,
                [CbrFlow("f", 100, 25.0)],
                duration_s=1.0,
                port=relay.get_extra_info("sockname")[1],
                loss_timeout_s=0.3,
            )
        finally:
            relay.close()
            await responder.stop()

    flow = run(body())["flows"]["f"]
    assert (flow["sent"], flow["received"], flow["dropped"]) == (40, 37, 3)
    assert flow["loss_ratio"] == pytest.approx(3 / 40)
    assert flow["echo_lost"] == 2 and flow["forward_record"] is True
    lost = [i for i, (_, d) in enumerate(flow["samples"]) if d is None]
    assert lost == sorted(dropped | echo_lost)  # no delay known for these
    assert flow["throughput_kbps"] == pytest.approx(37 * 100 * 8 / 1000)


def test_measure_without_responder_fails_clearly() -> None:
    async def body() -> None:
        await measure(
            LOOPBACK,
            [CbrFlow("f", 100, 10)],
            duration_s=0.1,
            port=free_port(),
            answer_timeout_s=0.1,
        )

    with pytest.raises(MeasureError, match="no answer from the probe responder"):
        run(body())


def test_gateway_answers_qos_measure_cli(gateway_factory, tmp_path: Path) -> None:
    """A real `dicomesh run` with the responder wired in, measured by the real CLI."""
    port = free_port()
    gw = gateway_factory(qos={"probe_port": port})
    out = tmp_path / "real.json"
    done = subprocess.run(
        [*DICOMESH, "qos", "measure", "--peer", LOOPBACK, "--port", str(port),
         "--flow", "a=cbr:100:20", "--flow", "b=cbr:300:40", "--duration", "1",
         "--link", "lo:500", "--json", "-o", str(out)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + gw.log()
    result = json.loads(done.stdout)
    assert result == json.loads(out.read_text())
    _check_schema(result)
    assert result["flows"]["a"]["received"] == 50 and result["flows"]["b"]["received"] == 25
    assert result["links"]["lo"]["utilisation"] == pytest.approx((40 + 60) / 500)
    assert f"qos probe responder on 127.0.0.1 port {port}" in gw.log()
    text = subprocess.run(
        [*DICOMESH, "qos", "measure", "--peer", LOOPBACK, "--port", str(port),
         "--flow", "cbr:100:20", "--duration", "0.2"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert text.returncode == 0 and "cbr1: sent 10 received 10 loss 0.00%" in text.stdout


def test_measure_cli_rejects_bad_flows() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "qos", "measure", "--peer", LOOPBACK,
         "--flow", "cbr:10:20"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 2 and "at least 70 B" in done.stderr
