"""/metrics in the Prometheus text format (prometheus_client's exposition, a fresh registry
per scrape: no module-level state). Blocking (store stats): render from an executor."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance import __version__
from appliance.web.parts import GatewayParts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


UPLINK_STATES = ("unknown", "up", "degraded", "down")  # appliance.net.health.Health values


class _GatewayCollector(Collector):
    def __init__(
        self, parts: GatewayParts, extra: dict[str, int], net_status: dict[str, Any] | None
    ) -> None:
        self.parts = parts
        self.extra = extra
        self.net_status = net_status

    def collect(self) -> Iterator[Metric]:
        parts = self.parts
        info = GaugeMetricFamily("dicomesh_info", "firmware version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "dicomesh_uptime_seconds", "seconds since start", value=time.time() - parts.started_at
        )
        yield from _store(parts)
        yield from _dicom(parts)
        yield from _mesh(parts)
        yield from _uplinks(self.net_status)
        yield from _sends(self.extra)
        refused = CounterMetricFamily(
            "dicomesh_web_refused", "admin page requests refused before login (overlay, not admin)"
        )
        refused.add_metric([], self.extra.get("web_refused", 0))
        yield refused


def _store(parts: GatewayParts) -> Iterator[Metric]:
    if parts.store is None:
        return
    s = parts.store.stats()
    for name, doc, value in (
        ("used_bytes", "bytes the store uses", s.used_bytes),
        ("quota_bytes", "store.max_bytes (0: no quota)", s.max_bytes),
        ("disk_free_bytes", "free bytes on the store's filesystem", s.disk_free_bytes),
        ("studies", "studies held", s.studies),
        ("instances", "instances held", s.instances),
        ("chunks", "distinct chunks held", s.chunks),
    ):
        yield GaugeMetricFamily(f"dicomesh_store_{name}", doc, value=value)
    yield GaugeMetricFamily("dicomesh_store_full", "1 while the store refuses new instances",
                            value=1 if s.full_reason else 0)  # fmt: skip


def _dicom(parts: GatewayParts) -> Iterator[Metric]:
    if parts.dicom is None:
        return
    c = parts.dicom.stats.snapshot()
    stores = CounterMetricFamily("dicomesh_cstore", "C-STORE requests by outcome",
                                 labels=["result"])  # fmt: skip
    stores.add_metric(["ok"], c.stores_ok)
    stores.add_metric(["duplicate"], c.stores_duplicate)
    stores.add_metric(["failed"], c.stores_failed)
    yield stores
    yield CounterMetricFamily("dicomesh_cstore_bytes", "bytes stored by C-STORE",
                              value=c.bytes_stored)  # fmt: skip
    assocs = CounterMetricFamily("dicomesh_dicom_associations", "associations by outcome",
                                 labels=["result"])  # fmt: skip
    assocs.add_metric(["accepted"], c.associations_accepted)
    assocs.add_metric(["rejected"], c.associations_rejected)
    yield assocs
    yield CounterMetricFamily("dicomesh_cfind", "C-FIND requests", value=c.finds)
    yield CounterMetricFamily("dicomesh_retrieve", "C-GET/C-MOVE requests", value=c.retrieves)


def _mesh(parts: GatewayParts) -> Iterator[Metric]:
    mesh = parts.mesh
    if mesh is None:
        return
    received = mesh.bytes_received()
    sent = mesh.server.bytes_to_peer
    b_in = CounterMetricFamily("dicomesh_peer_received_bytes", "useful bytes received per peer",
                               labels=["peer"])  # fmt: skip
    b_out = CounterMetricFamily("dicomesh_peer_sent_bytes", "chunk bytes served per peer",
                                labels=["peer"])  # fmt: skip
    online = GaugeMetricFamily("dicomesh_peer_online", "1 when the last catalog pull worked",
                               labels=["peer"])  # fmt: skip
    for peer in mesh.registry.peers():
        state = mesh.peer_state.get(peer.name)
        b_in.add_metric([peer.name], received.get(peer.name, 0))
        b_out.add_metric([peer.name], sent.get(peer.name, 0))
        online.add_metric([peer.name], 1 if state and state.online else 0)
    yield from (b_in, b_out, online)
    counts = {"running": 0, "done": 0, "failed": 0}
    for state in mesh.downloads():
        key = "running" if not state.finished else ("failed" if state.error else "done")
        counts[key] += 1
    transfers = GaugeMetricFamily("dicomesh_transfers", "study downloads since start by state",
                                  labels=["state"])  # fmt: skip
    for key, n in counts.items():
        transfers.add_metric([key], n)
    yield transfers
    server: dict[str, Any] = dict(mesh.server.counters)
    yield CounterMetricFamily(
        "dicomesh_mesh_forbidden", "mesh requests refused (403, not admitted)",
        value=server.get("forbidden", 0),
    )  # fmt: skip
    yield CounterMetricFamily("dicomesh_mesh_chunks_served", "chunks served to peers",
                              value=server.get("chunks_served", 0))  # fmt: skip


def _uplinks(net_status: dict[str, Any] | None) -> Iterator[Metric]:
    """Per uplink (labels: uplink): health, probe RTT and loss, interface byte counters."""
    if not net_status:
        return
    labels = ["uplink"]
    up = GaugeMetricFamily("dicomesh_uplink_up", "1 while the uplink is usable (not down)",
                           labels=labels)  # fmt: skip
    state = GaugeMetricFamily("dicomesh_uplink_state", "1 for the uplink's current health state",
                              labels=["uplink", "state"])  # fmt: skip
    rtt = GaugeMetricFamily("dicomesh_uplink_rtt_seconds", "last probe round trip",
                            labels=labels)  # fmt: skip
    loss = GaugeMetricFamily("dicomesh_uplink_loss_ratio", "lost probes in the health window",
                             labels=labels)  # fmt: skip
    capacity = GaugeMetricFamily("dicomesh_uplink_capacity_bps", "nominal line rate (config)",
                                 labels=["uplink", "direction"])  # fmt: skip
    received = CounterMetricFamily(
        "dicomesh_uplink_received_bytes", "bytes received on the uplink's interface", labels=labels
    )
    sent = CounterMetricFamily(
        "dicomesh_uplink_sent_bytes", "bytes sent on the uplink's interface", labels=labels
    )
    for link in net_status.get("uplinks", []):
        name = str(link.get("name"))
        current = link.get("state")
        up.add_metric([name], 0 if current == "down" else 1)
        for value in UPLINK_STATES:
            state.add_metric([name, value], 1 if current == value else 0)
        if link.get("rtt_ms") is not None:
            rtt.add_metric([name], link["rtt_ms"] / 1000)
        if link.get("loss") is not None:
            loss.add_metric([name], link["loss"])
        for direction, key in (("up", "up_kbps"), ("down", "down_kbps")):
            if link.get(key) is not None:
                capacity.add_metric([name, direction], link[key] * 1000)
        if link.get("rx_bytes") is not None:
            received.add_metric([name], link["rx_bytes"])
            sent.add_metric([name], link["tx_bytes"])
    yield from (up, state, rtt, loss, capacity, received, sent)


def _sends(extra: dict[str, int]) -> Iterator[Metric]:
    sends = GaugeMetricFamily("dicomesh_dicom_sends", "sends to DICOM nodes since start by state",
                              labels=["state"])  # fmt: skip
    for key in ("running", "done", "failed"):
        sends.add_metric([key], extra.get(f"sends_{key}", 0))
    yield sends


def render(
    parts: GatewayParts, extra: dict[str, int], net_status: dict[str, Any] | None = None
) -> bytes:
    """The exposition; `net_status` is the network manager's status() (fetched on the loop)
    with interface counters (uplinks.UplinkRates)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_GatewayCollector(parts, extra, net_status))
    return generate_latest(registry)
