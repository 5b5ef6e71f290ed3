"""The A/B slot layout under a root (production: /opt/dicomesh):

    slots/a/  slots/b/     two complete installations (each a venv, or a plain tree)
    current -> slots/a     what systemd starts (ExecStart=/opt/dicomesh/current/bin/dicomesh)
    pending.json           written before a switch, removed once the new slot proved healthy

`current` is switched with rename(2) over a fresh symlink, which is atomic: a power cut
leaves the old or the new target, never none. `pending.json` lets the next boot finish an
interrupted update by rolling back (`recover`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from appliance.firmware import FirmwareError

SLOTS = ("a", "b")
CURRENT = "current"
PENDING = "pending.json"
SLOT_MANIFEST = ".dicomesh-manifest.json"  # the signed manifest the slot was installed from


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def current(self) -> Path:
        return self.root / CURRENT

    def slot(self, name: str) -> Path:
        return self.root / "slots" / name

    def active(self) -> str | None:
        """The slot `current` points to; None before the first install."""
        try:
            target = os.readlink(self.current)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FirmwareError(f"{self.current}: {exc}") from None
        name = Path(target).name
        if name not in SLOTS:
            raise FirmwareError(f"{self.current} points to {target}, not to a slot")
        return name

    def inactive(self) -> str:
        active = self.active()
        return "b" if active == "a" else "a"

    def switch(self, name: str) -> None:
        """Point `current` at slot `name`, atomically and durably."""
        if name not in SLOTS or not self.slot(name).is_dir():
            raise FirmwareError(f"slot {name!r} is not installed")
        tmp = self.root / f".{CURRENT}.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("slots") / name)  # relative: the root may be mounted elsewhere
        os.replace(tmp, self.current)
        fsync_dir(self.root)

    def replace_slot(self, name: str, staging: Path) -> None:
        """Make `staging` (same filesystem) the content of the inactive slot `name`."""
        # Rename first, then delete: a crash leaves a stray directory, never half a slot.
        self.clear_slot(name)
        os.replace(staging, self.slot(name))
        fsync_dir(self.slot(name).parent)

    def clear_slot(self, name: str) -> None:
        """Remove the inactive slot `name` (before a venv is built in its place)."""
        if name == self.active():
            raise FirmwareError(f"slot {name} is running; refusing to remove it")
        target = self.slot(name)
        if target.exists():
            trash = target.with_name(f".{name}.old{os.getpid()}")
            os.replace(target, trash)
            shutil.rmtree(trash)
            fsync_dir(target.parent)

    # -- pending marker

    def mark_pending(self, new: str, previous: str | None, version: str) -> None:
        data = {"slot": new, "previous": previous, "version": version}
        tmp = self.root / f".{PENDING}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.root / PENDING)
        fsync_dir(self.root)

    def pending(self) -> dict[str, str | None] | None:
        try:
            return json.loads((self.root / PENDING).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise FirmwareError(f"{self.root / PENDING}: {exc}") from None

    def clear_pending(self) -> None:
        (self.root / PENDING).unlink(missing_ok=True)
        fsync_dir(self.root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
