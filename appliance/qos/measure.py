"""`qos measure`: send flows to a peer's probe responder and report them in the simulator's
result schema (stats_flow.py), plus RTT and per-packet samples.

Method (IPPM framework, RFC 2330). Each probe carries its sequence number and the sender's
wall clock at sending; the responder stamps its wall clock at arrival, echoes both and
records which sequence numbers arrived.

- One-way delay (RFC 7679) = responder's arrival stamp - sender's send stamp. This needs
  the two wall clocks synchronised: between network namespaces of one machine they are the
  same clock (exact); between sites only as good as their NTP/PTP sync (NTP on an ADSL line
  is typically good to a few ms; the error adds to every delay). Jitter (RFC 3550) and RTT
  need no synchronisation: jitter uses delay differences, RTT only the sender's monotonic
  clock (send -> echo back, the responder's turnaround included).
- Loss (RFC 7680) is forward loss: a probe is lost when the responder's arrival record does
  not have it once the sender has waited `loss_timeout_s` (Tmax) after its last probe, or
  when its one-way delay exceeds Tmax. Echoes lost on the way back do not count as loss
  (counted as echo_lost; those packets have no delay sample).
- Throughput = packets arrived by the end of the run x SIZE x 8 / duration, SIZE being the
  bytes the link carries per packet (flows.py), as the simulator counts it.
- Timing: CBR probes leave on an absolute schedule to within a few µs (the last SPIN_S
  before each is spun, see _send_cbr). An echo that comes back during such a spin is
  stamped after it, so an RTT can read up to SPIN_S high; one-way delays are not affected.
- Bulk flows (TCP): see measure_bulk.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from appliance.qos import codec
from appliance.qos import stats_flow as stats
from appliance.qos.config import DEFAULT_PROBE_PORT
from appliance.qos.flows import ETHERNET_HEADER, BulkFlow, CbrFlow, Flow, ip_version, probe_payload
from appliance.qos.measure_bulk import bulk_transfer

START_LEAD_S = 0.05  # flows start together, this long after the sockets are ready
SPIN_S = 0.002  # CBR sends: the last stretch before a due time is spun, not slept (why: _send_cbr)
ANSWER_TRIES = 3
ANSWER_TIMEOUT_S = 1.0  # per summary request; tried ANSWER_TRIES times
HELLO_FLOW = 255  # the summary asked before starting, to learn the responder admits us


class MeasureError(RuntimeError):
    """The measurement could not be made (no responder, not admitted, socket error)."""


@dataclass
class _CbrRun:
    """One CBR flow's send log and what came back for it."""

    flow: CbrFlow
    flow_id: int
    payload: int
    count: int
    sent_at: list[float] = field(default_factory=list)  # s after the common start
    delay_ms: dict[int, float] = field(default_factory=dict)
    rtt_ms: dict[int, float] = field(default_factory=dict)
    arrived: set[int] | None = None  # the responder's record (None: it never answered)
    duplicates: int = 0


class _Endpoint(asyncio.DatagramProtocol):
    """The sender's UDP socket: echoes go to their flow, summaries to whoever waits."""

    def __init__(self, session: int, runs: dict[int, _CbrRun], answer_timeout_s: float) -> None:
        self.session = session
        self.answer_timeout_s = answer_timeout_s
        self.runs = runs
        self.mono_sent: dict[tuple[int, int], float] = {}
        self.echoes = 0
        self.all_back = asyncio.Event()
        self.expected = sum(r.count for r in runs.values())
        self.waiting: dict[tuple[int, int], asyncio.Future[codec.Summary]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport does not subclass DatagramTransport (3.11).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        now = time.monotonic()
        try:
            msg = codec.decode(data)
        except codec.CodecError:
            return
        if getattr(msg, "session", None) != self.session:
            return
        if isinstance(msg, codec.Echo):
            self._on_echo(msg, now)
        elif isinstance(msg, codec.Summary):
            waiter = self.waiting.get((msg.flow, msg.first))
            if waiter is not None and not waiter.done():
                waiter.set_result(msg)

    def _on_echo(self, echo: codec.Echo, now: float) -> None:
        run = self.runs.get(echo.flow)
        sent = self.mono_sent.get((echo.flow, echo.seq))
        if run is None or sent is None or echo.seq in run.rtt_ms:
            return
        run.rtt_ms[echo.seq] = (now - sent) * 1000
        run.delay_ms[echo.seq] = (echo.received_ns - echo.sent_ns) / 1e6
        self.echoes += 1
        if self.echoes >= self.expected:
            self.all_back.set()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on a connected socket: nothing listens at the peer.
        self.error = exc

    async def summary(self, flow: int, first: int) -> codec.Summary | None:
        """Ask the responder which probes of `flow` arrived (from `first`); None: no answer."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        for _ in range(ANSWER_TRIES):
            waiter: asyncio.Future[codec.Summary] = loop.create_future()
            self.waiting[(flow, first)] = waiter
            self.transport.sendto(codec.encode(codec.SummaryRequest(self.session, flow, first)))
            try:
                return await asyncio.wait_for(waiter, self.answer_timeout_s)
            except TimeoutError:
                continue
            finally:
                self.waiting.pop((flow, first), None)
        return None


async def measure(
    peer: str,
    flows: list[Flow],
    *,
    duration_s: float,
    port: int = DEFAULT_PROBE_PORT,
    bind: str | None = None,
    loss_timeout_s: float = 2.0,
    link_overhead: int = ETHERNET_HEADER,
    link: str = "path",
    capacity_kbps: float | None = None,
    answer_timeout_s: float = ANSWER_TIMEOUT_S,
) -> dict[str, Any]:
    """Run `flows` to the responder at `peer`:`port` (from `bind`, the source address the
    peer admits) and return the result dict (stats.py schema + rtt_ms, samples, meta)."""
    version = ip_version(peer)
    cbr = [f for f in flows if isinstance(f, CbrFlow)]
    runs = {
        i: _CbrRun(f, i, probe_payload(f.packet_bytes, version, link_overhead), f.count(duration_s))
        for i, f in enumerate(cbr)
    }
    session = secrets.randbits(32)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    loop = asyncio.get_running_loop()
    local = (bind or ("::" if version == 6 else "0.0.0.0"), 0)
    try:
        transport, endpoint = await loop.create_datagram_endpoint(
            lambda: _Endpoint(session, runs, answer_timeout_s),
            local_addr=local,
            remote_addr=(peer, port),
        )
    except OSError as exc:
        raise MeasureError(f"cannot open a UDP socket from {local[0]} to {peer}: {exc}") from exc
    source = transport.get_extra_info("sockname")[0]
    try:
        if await endpoint.summary(HELLO_FLOW, 0) is None:
            why = f" ({endpoint.error})" if endpoint.error else ""
            raise MeasureError(
                f"no answer from the probe responder at {peer} port {port}{why}: is the gateway "
                f"running with [qos] enabled, and is {source} an admitted peer there?"
            )
        start = time.monotonic() + START_LEAD_S  # every send time is on this clock
        bulk = [
            asyncio.create_task(bulk_transfer(f, peer, port, bind, start))
            for f in flows
            if isinstance(f, BulkFlow)
        ]
        try:
            await _send_cbr(list(runs.values()), endpoint, session, start)
            if endpoint.expected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(endpoint.all_back.wait(), loss_timeout_s)
            for run in runs.values():
                await _fetch_record(run, endpoint)
            try:
                bulk_results = await asyncio.gather(*bulk)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                raise MeasureError(f"bulk flow to {peer}:{port}: {exc!r}") from exc
        finally:
            for task in bulk:
                task.cancel()
    finally:
        transport.close()
    bulk_names = [f.name for f in flows if isinstance(f, BulkFlow)]
    return _result(
        runs, dict(zip(bulk_names, bulk_results, strict=True)),
        peer=peer, source=source, started=started, duration_s=duration_s,
        loss_timeout_s=loss_timeout_s, link_overhead=link_overhead, version=version,
        link=link, capacity_kbps=capacity_kbps,
    )  # fmt: skip


async def _send_cbr(runs: list[_CbrRun], endpoint: _Endpoint, session: int, start: float) -> None:
    """Send every CBR flow on its absolute schedule (start + seq x interval), merged in time
    order, so a late wake-up never drifts a flow nor delays another one.

    The loop's timers wake up to ~1 ms late (epoll has ms resolution) and a loaded machine
    adds more; on a saturated line which flow gets the place a departure frees depends on
    the arrival order to within a packet time, so that noise would move loss between flows.
    Hence: sleep until SPIN_S before the due time, then spin on the clock for the rest.
    """
    transport = endpoint.transport
    assert transport is not None
    due = [(start, run.flow_id, 0) for run in runs if run.count]
    heapq.heapify(due)
    by_id = {run.flow_id: run for run in runs}
    while due:
        at, flow_id, seq = heapq.heappop(due)
        run = by_id[flow_id]
        wait = at - SPIN_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        while time.monotonic() < at:
            pass
        endpoint.mono_sent[(flow_id, seq)] = now = time.monotonic()
        run.sent_at.append(now - start)
        probe = codec.Probe(session, flow_id, seq, time.time_ns())
        transport.sendto(codec.encode_probe(probe, run.payload))
        if seq + 1 < run.count:
            heapq.heappush(due, (start + (seq + 1) * run.flow.interval_ms / 1000, flow_id, seq + 1))


async def _fetch_record(run: _CbrRun, endpoint: _Endpoint) -> None:
    """The responder's arrival bitmap for this flow, in SUMMARY_SPAN pieces."""
    arrived: set[int] = set()
    for first in range(0, max(run.count, 1), codec.SUMMARY_SPAN):
        summary = await endpoint.summary(run.flow_id, first)
        if summary is None:
            return  # run.arrived stays None: the report falls back to the echoes
        arrived.update(s for s in range(first, min(run.count, first + codec.SUMMARY_SPAN))
                       if summary.arrived(s))  # fmt: skip
        run.duplicates = summary.duplicates
    run.arrived = arrived


def _cbr_result(run: _CbrRun, duration_s: float, loss_timeout_s: float) -> dict[str, Any]:
    tmax_ms = loss_timeout_s * 1000
    arrived = run.arrived if run.arrived is not None else set(run.delay_ms)
    on_time = {s for s in arrived if run.delay_ms.get(s, 0.0) <= tmax_ms}
    samples: list[stats.Sample] = [
        (t, run.delay_ms[seq] if seq in on_time and seq in run.delay_ms else None)
        for seq, t in enumerate(run.sent_at)
    ]
    result = stats.flow_stats(
        sent=len(run.sent_at),
        received=len(on_time),
        packet_bytes=run.flow.packet_bytes,
        duration_s=duration_s,
        samples=samples,
    )
    result.update(
        kind="cbr",
        packet_bytes=run.flow.packet_bytes,
        interval_ms=run.flow.interval_ms,
        rtt_ms=stats.summary(run.rtt_ms.values()),
        echo_lost=len(on_time - set(run.delay_ms)),
        late=len(arrived - on_time),
        duplicates=run.duplicates,
        forward_record=run.arrived is not None,
        samples=[[t, d] for t, d in samples],
    )
    return result


def _result(
    runs: dict[int, _CbrRun],
    bulk: dict[str, dict[str, Any]],
    *,
    peer: str,
    source: str,
    started: str,
    duration_s: float,
    loss_timeout_s: float,
    link_overhead: int,
    version: int,
    link: str,
    capacity_kbps: float | None,
) -> dict[str, Any]:
    flows = {r.flow.name: _cbr_result(r, duration_s, loss_timeout_s) for r in runs.values()}
    flows.update(bulk)
    delivered = sum(f["throughput_kbps"] for f in flows.values())
    return {
        "flows": flows,
        "links": {link: stats.link_stats(capacity_kbps, delivered)},
        "meta": {
            "source": "measured",
            "peer": peer,
            "from": source,
            "started": started,
            "duration_s": duration_s,
            "loss_timeout_s": loss_timeout_s,
            "packet_bytes_include": f"IPv{version}+UDP headers and {link_overhead} B link header",
            "clock": "one-way delay: responder wall clock - sender wall clock (needs synced "
            "clocks across machines; exact between namespaces of one machine)",
            "delivered_kbps": delivered,
        },
    }
