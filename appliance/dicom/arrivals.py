"""The order in which a retrieval's instances can be sent: those held here at once, then
those coming from the mesh, each as soon as its swarm download committed it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from appliance.dicom.retrieve import Item


class Download(Protocol):
    """What a retrieval needs to know of a swarm download (thread side)."""

    instances_done: list[str]
    finished: bool
    error: str | None

    def wait_change(self, seen: int, timeout: float) -> int: ...


@dataclass(frozen=True)
class Failed:
    """An instance that will not arrive (its download ended without it)."""

    item: Item


WAIT = object()  # nothing ready yet (call again; check for cancellation meanwhile)
END = object()  # every instance has been handed out


class Arrivals:
    """Hands out a retrieval's instances in the order they become available."""

    def __init__(
        self, local: list[Item], remote: list[Item], downloads: list[Download], poll_s: float = 0.5
    ) -> None:
        self._local = deque(local)
        self._pending = {item.uid: item for item in remote}
        self._downloads = downloads
        self._seen = [0] * len(downloads)  # instances_done already looked at, per download
        self._versions = [0] * len(downloads)
        self._failed: deque[Item] = deque()
        self._poll_s = poll_s

    def next(self, *, block: bool) -> Item | Failed | object:
        """The next Item or Failed, WAIT when nothing is ready (after up to `poll_s` when
        blocking), END when done."""
        if self._local:
            return self._local.popleft()
        while True:
            ready = self._collect()
            if ready is not None:
                return ready
            if self._failed:
                return Failed(self._failed.popleft())
            if not self._pending:
                return END
            if all(d.finished for d in self._downloads):
                self._failed.extend(self._pending.values())
                self._pending.clear()
                continue
            if not block:
                return WAIT
            waiting = next(i for i, d in enumerate(self._downloads) if not d.finished)
            version = self._downloads[waiting].wait_change(self._versions[waiting], self._poll_s)
            if version == self._versions[waiting]:
                return WAIT
            self._versions[waiting] = version

    def _collect(self) -> Item | None:
        for i, download in enumerate(self._downloads):
            done = download.instances_done
            while self._seen[i] < len(done):
                uid = done[self._seen[i]]
                self._seen[i] += 1
                item = self._pending.pop(uid, None)
                if item is not None:
                    return item
        return None
