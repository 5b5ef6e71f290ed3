"""The `[evict]` config section: when the store is a cache, what may go and in which order."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.schema import ByteSize, non_negative, positive, setting
from appliance.store.config import StoreConfig


@dataclass(frozen=True)
class EvictConfig:
    """Cache limits, usage scoring and safety rules of study eviction."""

    enabled: bool = setting(False, doc="evict studies periodically and when limits are near")
    dry_run: bool = setting(False, doc="only log what would be evicted and why")
    max_bytes: ByteSize = setting(
        ByteSize(0),
        doc="evict when the store holds more than this (keep it under [store] max_bytes); "
        "0 = no byte limit",
    )
    min_free_bytes: ByteSize = setting(
        ByteSize("2 GiB"),
        doc="evict when less than this is free on disk, counting the store's reusable pages "
        "(keep it over [store] min_free_bytes); 0 = no free-space limit",
    )
    slack_bytes: ByteSize = setting(
        ByteSize("1 GiB"),
        doc="once evicting, free this much beyond the limit (one run per many new studies)",
    )
    max_idle_days: float = setting(
        0.0,
        check=non_negative,
        doc="evict studies neither retrieved nor stored to for this long; 0 = off",
    )
    min_idle_s: float = setting(
        3600.0,
        check=non_negative,
        doc="never evict a study retrieved or stored to in the last this many seconds",
    )
    half_life_days: float = setting(
        7.0,
        check=positive,
        doc="usage score = (1 + retrievals) * 0.5 ** (days since last use / half_life_days); "
        "the lowest score goes first",
    )
    min_holders: int = setting(
        1,
        check=positive,
        doc="other gateways holding a study complete needed to evict it, "
        "unless the central PACS holds it",
    )
    interval_s: float = setting(600.0, check=positive, doc="period of the eviction check")
    check_after_store_s: float = setting(
        30.0,
        check=positive,
        doc="after new data, check the limits again at most this often",
    )


def check_limits(evict: EvictConfig, store: StoreConfig) -> list[tuple[str, str]]:
    """Eviction limits that the store's hard limits would pre-empt (new instances refused
    before eviction starts), as (key from the root, message); for the root Config's validate."""
    if not evict.enabled:
        return []
    errors = []
    if store.max_bytes and (not evict.max_bytes or evict.max_bytes >= store.max_bytes):
        errors.append(("evict.max_bytes", "must be > 0 and below store.max_bytes"))
    if store.min_free_bytes and evict.min_free_bytes <= store.min_free_bytes:
        errors.append(("evict.min_free_bytes", "must be above store.min_free_bytes"))
    return errors
