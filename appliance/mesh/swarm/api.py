"""The swarm scheduler's vocabulary: its tuning, the actions it emits, the progress it reports.

All frozen values, shared by the core, its asyncio adapter (download.py) and the simulator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.mesh.swarm.paths import PathState

if TYPE_CHECKING:
    from appliance.mesh.config import MeshConfig


@dataclass(frozen=True, slots=True)
class Request:
    """Fetch `chunks` over `path` as one batch; the response streams them in this order.

    With `span` = (start, end) the request is for those bytes of its single chunk only (a
    piece of a chunk split at the end of a download; see core.py, "Tail"). Pieces cannot be
    verified alone: the adapter assembles them and reports on_assembled."""

    id: int
    path: str
    chunks: tuple[bytes, ...]
    span: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    """Abort request `id` on `path`; its undelivered chunks are done or re-queued already."""

    id: int
    path: str


@dataclass(frozen=True, slots=True)
class PeerCutOff:
    """`peer` sent `strikes` corrupt chunks: none of its paths is used before `until`."""

    peer: str
    until: float
    strikes: int


Action = Request | Cancel | PeerCutOff


@dataclass(frozen=True)
class SwarmConfig:
    """Swarm tuning. Defaults fit ADSL paths (~100 KB/s up) and 512 KiB chunks."""

    queue_seconds: float = 2.0  # outstanding bytes per path, in seconds of its measured rate
    stall_timeout_s: float = 2.0  # silent this long with requests outstanding: stalled
    initial_rate: float = 100_000.0  # bytes/s assumed before measuring: an 800 kbit/s uplink
    rate_window_s: float = 0.5  # busy time per rate sample
    max_batch_chunks: int = 16  # chunks per Request at most
    endgame_max_copies: int = 2  # requests that may carry one chunk at once in the endgame
    endgame_min_gain_s: float = 0.25  # a duplicate must be expected this much sooner
    piece_bytes: int = 64 * 1024  # tail split unit (0: never split a chunk)
    bad_chunk_limit: int = 3  # corrupt chunks from one peer before it is cut off
    ban_s: float = 600.0  # how long a cut-off peer stays cut off
    path_retry_s: float = 1.0  # first backoff of a failed or stalled path; doubles per failure
    path_retry_max_s: float = 60.0
    seed: int = 0  # tie-breaking order and backoff jitter

    def __post_init__(self) -> None:
        positive = ("queue_seconds", "stall_timeout_s", "initial_rate", "rate_window_s")
        positive += ("path_retry_s", "path_retry_max_s")
        counts = ("max_batch_chunks", "endgame_max_copies", "bad_chunk_limit")
        bad = [n for n in positive if not getattr(self, n) > 0]
        bad += [n for n in counts if getattr(self, n) < 1]
        bad += [n for n in ("endgame_min_gain_s", "ban_s", "piece_bytes") if getattr(self, n) < 0]
        if bad:
            raise ValueError(f"SwarmConfig: out of range: {', '.join(bad)}")

    @classmethod
    def from_mesh(cls, mesh: MeshConfig, **overrides: Any) -> SwarmConfig:
        """The knobs of the `[mesh]` config section, plus `overrides`."""
        knobs = {
            "queue_seconds": mesh.queue_seconds,
            "stall_timeout_s": mesh.stall_timeout_s,
            "bad_chunk_limit": mesh.bad_chunk_limit,
            "ban_s": mesh.ban_s,
        }
        return cls(**(knobs | overrides))


@dataclass(frozen=True, slots=True)
class PathStatus:
    """One path as the scheduler sees it (for progress pages and the QoS reports)."""

    peer: str
    state: PathState
    rate: float  # measured bytes/s while busy (initial_rate until measured)
    queued_bytes: int  # requested and not yet received
    requests: int
    delivered_bytes: int  # chunks this path delivered first
    retry_at: float | None  # when a backing-off path is tried again


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of one download; byte and chunk counts include chunks held at the start."""

    bytes_total: int
    bytes_done: int
    chunks_total: int
    chunks_done: int
    paths: Mapping[str, PathStatus]
    peer_bytes: Mapping[str, int]  # useful bytes delivered per peer
    eta_s: float | None  # remaining bytes / rate of the busy paths; None: no usable path
    endgame: bool
    cut_off: Mapping[str, float]  # peer -> end of its cut-off
    duplicate_bytes: int  # whole chunks received again after they were done
    corrupt_bytes: int
