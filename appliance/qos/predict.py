"""How long a study takes over the mesh: the real swarm scheduler driven by simulated paths.

`predict_study` runs appliance.mesh.swarm's Scheduler (the code the gateway downloads with)
against appliance.mesh.swarm.sim's network: one path per holder at its uplink rate, all
sharing the downloader's downlink by processor sharing, with a one-way latency per path.

- Rates are line rates in kbit/s; `efficiency` turns them into payload rates (default 0.917:
  TCP goodput through WireGuard over a shaped line, measured in the lab, LAB.md).
- `compression` is the ratio compressed/raw of the chunks on the wire (zstd on the mesh):
  the study travels as study_bytes x compression.
- The lower bound printed with it is the study over the smaller of the holders' summed
  uplinks and the downlink; the scheduler's ramp-up, round trips and endgame add to it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from appliance.mesh.swarm import Scheduler, SwarmConfig
from appliance.mesh.swarm.sim import SimPath, SimPeer, Simulation
from appliance.store.chunking import CHUNK_BYTES

# Goodput over line rate through WireGuard (LAB.md: 0.917 R; 0.957 R for bare TCP).
WIREGUARD_EFFICIENCY = 0.917


@dataclass(frozen=True)
class Prediction:
    """The simulated download of one study."""

    study_bytes: int
    wire_bytes: int  # after compression
    seconds: float  # until the last chunk arrived
    lower_bound_s: float  # wire bytes over the bottleneck (holders' sum or downlink)
    path_bytes: dict[str, int]  # useful bytes delivered per holder path
    chunks: int
    steps: int  # simulation steps (for speed reports)

    def as_dict(self) -> dict[str, object]:
        return {
            "study_bytes": self.study_bytes,
            "wire_bytes": self.wire_bytes,
            "seconds": self.seconds,
            "lower_bound_s": self.lower_bound_s,
            "efficiency_vs_bound": self.lower_bound_s / self.seconds if self.seconds else 1.0,
            "mean_kbps": 8 * self.study_bytes / self.seconds / 1000 if self.seconds else None,
            "path_bytes": self.path_bytes,
            "chunks": self.chunks,
        }


def predict_study(
    study_bytes: int,
    holders_kbps: list[float],
    downlink_kbps: float = math.inf,
    *,
    compression: float = 1.0,
    latency_ms: float = 20.0,
    efficiency: float = WIREGUARD_EFFICIENCY,
    chunk_bytes: int = CHUNK_BYTES,
    config: SwarmConfig | None = None,
) -> Prediction:
    """Simulate fetching `study_bytes` from holders with these uplinks into this downlink."""
    if study_bytes <= 0 or not holders_kbps or min(holders_kbps) <= 0:
        raise ValueError("need a positive study size and at least one holder with a rate > 0")
    if not 0 < compression <= 1 or downlink_kbps <= 0 or not 0 < efficiency <= 1:
        raise ValueError("compression and efficiency must be in (0, 1], downlink > 0")
    wire = max(1, round(study_bytes * compression))
    size = max(1, round(chunk_bytes * compression))
    count, last = divmod(wire, size)
    sizes = [size] * count + ([last] if last else [])
    chunks = {hashlib.sha256(b"chunk%d" % i).digest(): s for i, s in enumerate(sizes)}
    paths = [
        SimPath(f"holder{i}", f"holder{i}", kbps * 125, latency=latency_ms / 1000)
        for i, kbps in enumerate(holders_kbps)
    ]
    peers = [SimPeer(p.peer) for p in paths]
    scheduler = Scheduler(chunks, config=config)
    downlink = downlink_kbps * 125 if math.isfinite(downlink_kbps) else math.inf
    sim = Simulation(scheduler, chunks, paths, peers, downlink=downlink, efficiency=efficiency)
    if not sim.run():
        raise RuntimeError("the simulated download did not complete")
    assert sim.finished_at is not None
    bottleneck = min(sum(holders_kbps), downlink_kbps) * 125 * efficiency
    progress = scheduler.progress(sim.now)
    return Prediction(
        study_bytes=study_bytes,
        wire_bytes=wire,
        seconds=sim.finished_at,
        lower_bound_s=wire / bottleneck,
        path_bytes={name: s.delivered_bytes for name, s in progress.paths.items()},
        chunks=len(sizes),
        steps=sim.steps,
    )
