"""The gateway's side of an update: receive a bundle (admin page upload or a peer), check its
signature at once for a quick answer, and hand it to dicomesh-update.service by linking it
to `updates/incoming.bundle` (the path unit fires on that name; the link makes it appear
complete or not at all, and never replaces one already there). The gateway never installs:
its own code is read-only to it. Once installed, the updater keeps the bundle as
`updates/installed.bundle`, which the gateway shares with its peers (firmware/share.py).

Blocking (file writes, hashing): call from an executor, never on the event loop.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from appliance.firmware import FirmwareError
from appliance.firmware.bundle import BundleError, extract, load_public_key

UPDATES_DIR = "updates"
INCOMING = "incoming.bundle"
INSTALLED = "installed.bundle"  # kept by `dicomesh-update install --keep` (the unit passes it)
RESULT = "last-result.json"
MAX_BUNDLE_BYTES = 1024**3  # a wheelhouse is ~100 MB; an upload past this is refused


def receive(
    state_dir: Path,
    chunks: Iterable[bytes],
    key_path: Path,
    accept: Callable[[str], None] | None = None,
) -> str:
    """Store the bundle from `chunks`, verify it, queue it for installation; its version.
    `accept(version)` may refuse the verified bundle by raising before it is queued.
    Raises BundleError (bad/too large bundle) or FirmwareError (one already queued)."""
    updates = state_dir / UPDATES_DIR
    updates.mkdir(mode=0o750, parents=True, exist_ok=True)
    if (updates / INCOMING).exists():
        raise FirmwareError("an update is already being installed")
    # A name of its own: an upload and a pull from a peer may be received at the same time.
    fd, name = tempfile.mkstemp(prefix=f".{INCOMING}.", suffix=".part", dir=updates)
    part = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                size += len(chunk)
                if size > MAX_BUNDLE_BYTES:
                    raise BundleError(f"bundle larger than {MAX_BUNDLE_BYTES} bytes")
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        version = verify(part, key_path)
        if accept is not None:
            accept(version)
        try:
            os.link(part, updates / INCOMING)  # unlike rename, never replaces a queued one
        except FileExistsError:
            raise FirmwareError("an update is already being installed") from None
    finally:
        part.unlink(missing_ok=True)
    return version


def verify(bundle: Path, key_path: Path) -> str:
    """Full check (signature, every file's hash) into a scratch directory; the version."""
    scratch = Path(tempfile.mkdtemp(prefix="dicomesh-bundle-", dir=bundle.parent))
    try:
        with bundle.open("rb") as f:
            return extract(f, load_public_key(key_path), scratch / "payload").version
    finally:
        shutil.rmtree(scratch)


def last_result(state_dir: Path) -> dict[str, Any] | None:
    """What dicomesh-update.service wrote about the last install (for the admin page)."""
    try:
        return json.loads((state_dir / UPDATES_DIR / RESULT).read_text())
    except (OSError, ValueError):
        return None
