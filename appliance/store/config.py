"""The `[store]` config section: space limits, chunk codec, durable-commit timeout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.schema import ByteSize, positive, setting


@dataclass(frozen=True)
class StoreConfig:
    """How much the store may hold and how it writes."""

    max_bytes: ByteSize = setting(
        ByteSize(0), doc="cap on live data (chunks + index); 0 = no limit besides the disk"
    )
    min_free_bytes: ByteSize = setting(
        ByteSize("256 MiB"),
        doc="refuse new instances when the filesystem would drop below this free space",
    )
    compression: Literal["off", "zstd"] = setting(
        "off", doc='chunk storage codec; "off" keeps ingest at line rate (see store docs)'
    )
    commit_timeout_s: float = setting(
        60.0,
        check=positive,
        doc='seconds a C-STORE waits for its durable commit before answering "out of resources"',
    )
