"""The LMDB chunk store: content-addressed chunks, instance manifests, study index, usage."""

from appliance.store.errors import CommitTimeout, CorruptData, StoreClosed, StoreError, StoreFull
from appliance.store.index import PutOutcome
from appliance.store.records import IncomingInstance, LevelAttrs, Manifest
from appliance.store.store import Store, StoreStats

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
