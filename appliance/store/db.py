"""The LMDB environment: named databases, map sizing and growth, space accounting, locking."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lmdb

from appliance.store.errors import StoreLocked

log = logging.getLogger(__name__)

SCHEMA_VERSION = b"1"
GiB = 1 << 30
# A 32-bit userland (old Raspberry Pi OS) has ~3 GiB of address space for everything; the map
# starts at 1 GiB there and grows on demand. On 64-bit the map reserves the whole filesystem up
# front: it costs only address space, and growth then only happens if the filesystem grows.
_MAP_START_32BIT = 1 * GiB
_MAP_MIN = 64 << 20


@dataclass(frozen=True)
class Tables:
    """Handles of the named databases (see records.py for value formats)."""

    chunks: lmdb._Database  # sha256(raw) -> stored bytes
    chunk_refs: lmdb._Database  # sha256(raw) -> <refcount u32><codec u8>
    manifests: lmdb._Database  # SOP Instance UID -> canonical manifest
    instances: lmdb._Database  # SOP Instance UID -> InstanceRecord
    series: lmdb._Database  # Series Instance UID -> SeriesRecord
    studies: lmdb._Database  # Study Instance UID -> StudyRecord
    patients: lmdb._Database  # patient key -> PatientRecord
    patient_studies: lmdb._Database  # patient key -> Study UIDs (dupsort)
    study_series: lmdb._Database  # Study UID -> Series UIDs (dupsort)
    series_instances: lmdb._Database  # Series UID -> SOP Instance UIDs (dupsort)
    usage: lmdb._Database  # Study UID -> UsageRecord
    meta: lmdb._Database  # schema version and bookkeeping
    # The mesh catalog (appliance/mesh/catalog.py): entries per (origin, kind, study), a log
    # by (origin, seq) for "what changed since", the version vector, and a study -> entry map.
    cat_entries: lmdb._Database  # origin \0 kind \0 study UID -> seq u64 + payload
    cat_log: lmdb._Database  # origin \0 seq u64 -> entry key
    cat_vv: lmdb._Database  # origin -> highest seq known
    cat_studies: lmdb._Database  # study UID -> origin \0 kind (dupsort)
    # Swarm downloads in progress (appliance/mesh/swarm): their state, and the chunks they pin
    # (counted in chunk_refs) so partial data is durable, servable and resumable.
    downloads: lmdb._Database  # study UID -> download record
    download_pins: lmdb._Database  # study UID -> chunk digests (dupsort)
    # The store-and-forward queue (appliance/forward): job id -> job record (JSON).
    fwd_jobs: lmdb._Database

    def all(self) -> tuple[lmdb._Database, ...]:
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)


_DUPSORT = {"patient_studies", "study_series", "series_instances", "cat_studies", "download_pins"}


class _ReadGate:
    """Shared access for read transactions, exclusive for remapping (mdb_env_set_mapsize
    must not run while any transaction of this process is open)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class Database:
    """One LMDB environment per gateway, opened with full sync (every commit is durable)."""

    def __init__(self, path: Path, *, map_size: int | None = None) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_dir(path)
        try:
            self.env = lmdb.open(
                str(path),
                map_size=map_size or _initial_map_size(path),
                max_dbs=len(Tables.__dataclass_fields__) + 1,
                # sync + metasync: the commit returns only after data and meta pages reached
                # the disk, which is what a C-STORE success promises.
                sync=True,
                metasync=True,
                # Many pynetdicom threads read concurrently; transactions are not tied to
                # threads (py-lmdb always opens with MDB_NOTLS).
                max_readers=256,
            )
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            # A kill -9 leaves reader slots of the dead process behind; they would pin old
            # pages and make the file grow forever.
            stale = self.env.reader_check()
            if stale:
                log.info("cleared %d stale LMDB reader slot(s)", stale)
            self.tables = Tables(
                **{
                    name: self.env.open_db(name.encode(), dupsort=name in _DUPSORT)
                    for name in Tables.__dataclass_fields__
                }
            )
            self._main = self.env.open_db()
            self.gate = _ReadGate()
            self._check_schema()
        except BaseException:
            self.close()  # a refused store stays unlocked: a retry must not see StoreLocked
            raise

    def _check_schema(self) -> None:
        with self.env.begin(write=True) as txn:
            found = txn.get(b"schema", db=self.tables.meta)
            if found is None:
                txn.put(b"schema", SCHEMA_VERSION, db=self.tables.meta)
            elif found != SCHEMA_VERSION:
                raise RuntimeError(
                    f"store at {self.path} has schema {found!r}, this firmware reads "
                    f"{SCHEMA_VERSION!r}"
                )

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A short read transaction (zero-copy buffers valid only inside the block)."""
        with self.gate.shared(), self.env.begin(buffers=True) as txn:
            yield txn

    @property
    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def grow(self) -> bool:
        """Enlarge the map after MDB_MAP_FULL; False when the filesystem allows no more."""
        current = self.map_size
        ceiling = _address_space_ceiling(_fs_total(self.path))
        target = min(max(current * 2, current + GiB), ceiling)
        if target <= current:
            return False
        with self.gate.exclusive():
            self.env.set_mapsize(target)
        log.info("store map grown from %d to %d MiB", current >> 20, target >> 20)
        return True

    def used_bytes(self, txn: lmdb.Transaction) -> int:
        """Bytes of live pages in all databases (what `store.max_bytes` limits)."""
        pages = 0
        psize = 4096
        for db in (*self.tables.all(), self._main):
            st = txn.stat(db)
            psize = st["psize"]
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return pages * psize

    def file_bytes(self) -> int:
        try:
            return (self.path / "data.mdb").stat().st_size
        except FileNotFoundError:
            return 0

    def disk_free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def close(self) -> None:
        """Close the environment and release the lock; repeat calls do nothing (the lock's
        descriptor number may already belong to another file)."""
        if self._lock_fd < 0:
            return
        self.env.close()
        os.close(self._lock_fd)
        self._lock_fd = -1


def _fs_total(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def _address_space_ceiling(fs_total: int) -> int:
    if sys.maxsize < 2**32:
        return min(fs_total, 2 * GiB)
    return max(fs_total, _MAP_MIN)


def _initial_map_size(path: Path) -> int:
    try:
        current = (path / "data.mdb").stat().st_size
    except FileNotFoundError:
        current = 0
    fs_total = _fs_total(path)
    start = fs_total if sys.maxsize >= 2**32 else min(fs_total, _MAP_START_32BIT)
    return max(start, current, _MAP_MIN)


def _lock_dir(path: Path) -> int:
    """Exclusive lock on the store directory: two gateways on one store would corrupt the
    single-writer assumptions (LMDB itself would allow it)."""
    fd = os.open(path / "gateway.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLocked(f"store {path} is in use by another process") from None
    return fd
