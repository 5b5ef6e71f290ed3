"""The LMDB chunk store: content-addressed chunks, instance manifests, study index, usage.

The public names are loaded on first use: the config loader imports `appliance.store.config`
alone, and short-lived commands should not pay for LMDB and the writer machinery."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CommitTimeout": "errors",
    "CorruptData": "errors",
    "StoreClosed": "errors",
    "StoreError": "errors",
    "StoreFull": "errors",
    "PutOutcome": "index",
    "IncomingInstance": "records",
    "LevelAttrs": "records",
    "Manifest": "records",
    "Store": "store",
    "StoreStats": "store",
}

__all__ = [
    "CommitTimeout",
    "CorruptData",
    "IncomingInstance",
    "LevelAttrs",
    "Manifest",
    "PutOutcome",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreFull",
    "StoreStats",
]

if TYPE_CHECKING:
    from appliance.store.errors import (
        CommitTimeout,
        CorruptData,
        StoreClosed,
        StoreError,
        StoreFull,
    )
    from appliance.store.index import PutOutcome
    from appliance.store.records import IncomingInstance, LevelAttrs, Manifest
    from appliance.store.store import Store, StoreStats


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'appliance.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"appliance.store.{module}"), name)
    globals()[name] = value
    return value
