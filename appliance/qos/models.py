"""Traffic and network models: the typed pieces of a QoS scenario (see scenario.py for the file).

Units: rates in kbit/s (1 kbit = 1000 bit), sizes in bytes as the link transmits them (all
headers included), times in the unit their key names (_ms, _s). Every flow runs one way along
its `path`, a list of link names; links are one-directional (a two-way line is two links).

Traffic kinds (MISSION.md): real-time flows are open-loop, as over UDP (cbr, onoff, vbr);
non-real-time flows are elastic, as over TCP (bulk, consult): see tcp.py for the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.schema import ByteSize, in_range, non_negative, positive, setting

# IPv4 + TCP headers without options: what an elastic flow's packet carries besides payload.
TCP_HEADER_BYTES = 40

Distribution = Literal["exponential", "pareto", "fixed"]


def _pareto_shape(value: float) -> str | None:
    # A Pareto law has a finite mean only for shape > 1, and the mean is what the user sets.
    return None if value > 1 else "must be > 1 (the Pareto mean is infinite otherwise)"


@dataclass(frozen=True, kw_only=True)
class LinkModel:
    """One direction of a line: capacity, drop-tail queue, propagation delay, random loss.

    Queue semantics (as ns-2's DropTail, whose limit excludes the packet on the wire): the
    packet being transmitted does not count toward the queue; a packet arriving when
    `queue_packets` packets (or more than `queue_bytes` bytes with it) already wait is
    dropped. Random loss hits a packet after it was transmitted (it used the capacity), as
    ns-2's link loss module placed between queue and delay line.
    """

    name: str = setting(doc="unique link name, used in flow paths")
    preset: str | None = setting(None, doc="start from a preset (see presets.py)")
    capacity_kbps: float = setting(check=positive, doc="line rate, kbit/s")
    queue_packets: int | None = setting(
        None, check=non_negative, doc="drop-tail limit, packets waiting (default 50)"
    )
    queue_bytes: ByteSize | None = setting(None, doc="drop-tail limit, bytes waiting")
    delay_ms: float = setting(0.0, check=non_negative, doc="one-way propagation delay")
    loss: float = setting(0.0, check=in_range(0.0, 1.0), doc="random loss probability")

    def validate(self) -> list[tuple[str, str]]:
        if self.queue_packets is not None and self.queue_bytes is not None:
            return [("queue_bytes", "set queue_packets or queue_bytes, not both")]
        return []


@dataclass(frozen=True, kw_only=True)
class FlowModel:
    """What every flow has: a name, its kind, the links it crosses, when it is active."""

    name: str = setting(doc="unique flow name")
    kind: str = setting(doc="cbr | onoff | vbr | bulk | consult")
    path: list[str] = setting(doc="link names, in the order the packets cross them")
    start_s: float = setting(0.0, check=non_negative, doc="first packet")
    stop_s: float | None = setting(None, check=positive, doc="no packet sent after (duration)")

    def validate(self) -> list[tuple[str, str]]:
        if not self.path:
            return [("path", "must name at least one link")]
        if self.stop_s is not None and self.stop_s <= self.start_s:
            return [("stop_s", "must be after start_s")]
        return []


@dataclass(frozen=True, kw_only=True)
class CbrFlow(FlowModel):
    """Constant bit rate (biosignals): `packet_bytes` every `interval_ms`."""

    kind: Literal["cbr"] = setting(doc="cbr")
    packet_bytes: int = setting(check=positive, doc="bytes per packet")
    interval_ms: float = setting(check=positive, doc="time between packets (mean if poisson)")
    arrivals: Literal["periodic", "poisson"] = setting(
        "periodic", doc="periodic, or exponential gaps of the same mean (M/D/1 checks)"
    )


@dataclass(frozen=True, kw_only=True)
class OnOffFlow(FlowModel):
    """On/off (VoIP-like talk spurts): packets every `interval_ms` while on."""

    kind: Literal["onoff"] = setting(doc="onoff")
    packet_bytes: int = setting(check=positive, doc="bytes per packet")
    interval_ms: float = setting(check=positive, doc="time between packets while on")
    on_ms: float = setting(check=positive, doc="mean on period")
    off_ms: float = setting(check=positive, doc="mean off period")
    distribution: Distribution = setting("exponential", doc="of the on and off periods")
    shape: float = setting(1.5, check=_pareto_shape, doc="Pareto shape")


@dataclass(frozen=True, kw_only=True)
class VbrFlow(FlowModel):
    """Variable bit rate (video-like): a frame every 1/frame_rate s, split into packets."""

    kind: Literal["vbr"] = setting(doc="vbr")
    frame_rate: float = setting(check=positive, doc="frames per second")
    frame_bytes: int = setting(check=positive, doc="mean frame size")
    frame_cv: float = setting(
        0.5, check=non_negative, doc="frame size coefficient of variation (lognormal; 0: fixed)"
    )
    packet_bytes: int = setting(1400, check=positive, doc="largest packet; a frame's last is less")


@dataclass(frozen=True, kw_only=True)
class ElasticFlow(FlowModel):
    """What the TCP-carried kinds share."""

    packet_bytes: int = setting(1500, doc="bytes per full packet (40 of them TCP/IP headers)")
    window_packets: int = setting(64, check=positive, doc="receive window, packets")

    def validate(self) -> list[tuple[str, str]]:
        errors = super().validate()
        if self.packet_bytes <= TCP_HEADER_BYTES:
            errors.append(("packet_bytes", f"must be > {TCP_HEADER_BYTES} (TCP/IP headers)"))
        return errors


@dataclass(frozen=True, kw_only=True)
class BulkFlow(ElasticFlow):
    """Bulk transfer ("ftp"): as fast as TCP allows, optionally paced at a peak rate."""

    kind: Literal["bulk"] = setting(doc="bulk")
    size_bytes: ByteSize | None = setting(None, doc="payload to move (default: until stop_s)")
    peak_kbps: float | None = setting(None, check=positive, doc="peak data rate, kbit/s")


@dataclass(frozen=True, kw_only=True)
class ConsultFlow(ElasticFlow):
    """Clinical consults: requests of uniform size in [min, max], separated by think times."""

    kind: Literal["consult"] = setting(doc="consult")
    request_bytes_min: ByteSize = setting(ByteSize(10_000), doc="smallest request payload")
    request_bytes_max: ByteSize = setting(ByteSize(20_000), doc="largest request payload")
    think_ms: float = setting(5000.0, check=positive, doc="mean think time after a reply")
    think: Distribution = setting("exponential", doc="think time distribution")
    shape: float = setting(1.5, check=_pareto_shape, doc="Pareto shape")

    def validate(self) -> list[tuple[str, str]]:
        errors = super().validate()
        if self.request_bytes_min < 1:
            errors.append(("request_bytes_min", "must be >= 1"))
        if self.request_bytes_max < self.request_bytes_min:
            errors.append(("request_bytes_max", "must be >= request_bytes_min"))
        return errors


Flow = CbrFlow | OnOffFlow | VbrFlow | BulkFlow | ConsultFlow

FLOW_KINDS: dict[str, type[FlowModel]] = {
    "cbr": CbrFlow,
    "onoff": OnOffFlow,
    "vbr": VbrFlow,
    "bulk": BulkFlow,
    "consult": ConsultFlow,
}


@dataclass(frozen=True)
class Scenario:
    """Links, flows over them, how long to run and the random seed."""

    duration_s: float
    seed: int
    links: tuple[LinkModel, ...]
    flows: tuple[Flow, ...]

    def link(self, name: str) -> LinkModel:
        return next(link for link in self.links if link.name == name)

    def flow(self, name: str) -> Flow:
        return next(flow for flow in self.flows if flow.name == name)
