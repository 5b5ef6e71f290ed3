"""The swarm downloader: pull one study's chunks from every peer that holds them at once.

- core.py     the I/O-free Scheduler (rarest first, per-path queues sized in seconds of the
              measured rate, endgame, stall and corruption handling): events and the current
              time in, Request/Cancel/PeerCutOff actions out. Its contract is documented there.
- api.py      the values it exchanges: SwarmConfig, actions, Progress.
- pool.py     chunk bookkeeping and the per-peer rarest-first heaps.
- paths.py    a path's health state machine (a table) and its rate meter.
- sim.py      a discrete-event simulated network driving a Scheduler (tests, QoS simulator).
- download.py the asyncio adapter: real fetches, durable chunks, instances as they complete.
"""

from appliance.mesh.swarm.core import (
    Action,
    Cancel,
    PathStatus,
    PeerCutOff,
    Progress,
    Request,
    Scheduler,
    SwarmConfig,
)
from appliance.mesh.swarm.paths import PathState

__all__ = [
    "Action",
    "Cancel",
    "PathState",
    "PathStatus",
    "PeerCutOff",
    "Progress",
    "Request",
    "Scheduler",
    "SwarmConfig",
]
