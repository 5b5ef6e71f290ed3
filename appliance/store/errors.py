"""Errors raised by the store; callers map them to DICOM statuses."""


class StoreError(Exception):
    """Base class for store failures."""


class StoreFull(StoreError):
    """No room for the data: quota, disk reserve or LMDB map exhausted (DICOM 0xA700)."""


class StoreClosed(StoreError):
    """The store is shutting down or closed; nothing was written."""


class CommitTimeout(StoreError):
    """The durable commit did not finish in time; it may still land (re-sending is idempotent)."""


class CorruptData(StoreError):
    """Stored bytes do not match their recorded hash (media error); the instance is not served."""


class StoreLocked(StoreError):
    """Another process holds this state directory."""
