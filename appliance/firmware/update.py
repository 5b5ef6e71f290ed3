"""Installing a signed bundle into the inactive A/B slot, with a health bound and rollback.

    verify + extract into staging     (bad signature/truncated/tampered: rejected, no change)
    staging -> inactive slot          (the running slot is never written)
    pending.json, switch `current`    (atomic symlink rename)
    activate (restart the service), then the health command must pass `passes` times in a
    row within `timeout_s`            -> installed, pending.json removed
    otherwise: switch back, activate  -> rolled_back (the old version runs again)

Blocking by design: it runs in its own process (dicomesh-update.service), never on the
gateway's loop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.fileutil import atomic_write, locked
from appliance.firmware import FirmwareError
from appliance.firmware.bundle import BundleError, Manifest, extract
from appliance.firmware.slots import SLOT_MANIFEST, Layout

log = logging.getLogger(__name__)

# Production defaults (systemd): `systemctl restart` returns once the new gateway sent
# READY=1 (Type=notify) or failed; `is-active` passing several times in a row then shows it
# also survives its first seconds (a crash right after READY, a watchdog kill).
ACTIVATE = ("systemctl", "restart", "dicomesh.service")
HEALTH = ("systemctl", "is-active", "--quiet", "dicomesh.service")


@dataclass(frozen=True)
class HealthCheck:
    """How a freshly switched slot proves itself. `{slot}` in a command is the slot path."""

    activate: tuple[str, ...] = ACTIVATE
    command: tuple[str, ...] = HEALTH
    timeout_s: float = 120.0  # the bound: healthy within this, or rolled back
    interval_s: float = 2.0
    passes: int = 3  # consecutive passes needed
    command_timeout_s: float = 30.0


@dataclass
class UpdateResult:
    outcome: str  # installed | rolled_back | rejected | failed
    version: str | None = None
    slot: str | None = None  # the slot running afterwards
    previous: str | None = None
    error: str | None = None
    seconds: float = 0.0
    health_runs: int = field(default=0)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode() + b"\n"


def _run(cmd: tuple[str, ...], slot: Path, timeout: float) -> bool:
    argv = [part.replace("{slot}", str(slot)) for part in cmd]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("update: %s: %s", argv[0], exc)
        return False
    if proc.returncode != 0:
        log.info("update: %s exited %d: %s", argv[0], proc.returncode, proc.stderr[-500:])
    return proc.returncode == 0


def wait_healthy(check: HealthCheck, slot: Path) -> tuple[bool, int]:
    """Activate `slot`, then poll the health command within the bound; (healthy, runs)."""
    deadline = time.monotonic() + check.timeout_s
    if check.activate and not _run(check.activate, slot, check.timeout_s):
        return False, 0
    passes = runs = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, runs
        runs += 1
        passes = (
            passes + 1 if _run(check.command, slot, min(check.command_timeout_s, remaining)) else 0
        )
        if passes >= check.passes:
            return True, runs
        time.sleep(max(0.0, min(check.interval_s, deadline - time.monotonic())))


class Updater:
    """Installs bundles under `root` (see slots.py), one at a time (a lock file)."""

    def __init__(self, root: Path, public_key: Ed25519PublicKey, health: HealthCheck) -> None:
        self.layout = Layout(root)
        self.public_key = public_key
        self.health = health

    def install(self, bundle: Path) -> UpdateResult:
        started = time.monotonic()
        (self.layout.root / "slots").mkdir(parents=True, exist_ok=True)
        with locked(self.layout.root / ".update.lock"):
            result = self._install(bundle)
        result.seconds = round(time.monotonic() - started, 2)
        return result

    def _install(self, bundle: Path) -> UpdateResult:
        active = self.layout.active()
        target = self.layout.inactive()
        staging = self.layout.root / "slots" / f".staging{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with bundle.open("rb") as f:
                manifest = extract(f, self.public_key, staging)
            self._place(manifest, staging, target)
        except (BundleError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            error = str(exc) if isinstance(exc, BundleError) else f"cannot read/install: {exc}"
            log.error("update rejected, %s keeps running: %s", active or "nothing", error)
            return UpdateResult("rejected", slot=active, previous=active, error=error)
        except FirmwareError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            return UpdateResult("rejected", slot=active, previous=active, error=str(exc))

        log.info("update %s installed in slot %s; switching", manifest.version, target)
        self.layout.mark_pending(target, active, manifest.version)
        self.layout.switch(target)
        healthy, runs = wait_healthy(self.health, self.layout.slot(target))
        if healthy:
            self.layout.clear_pending()
            log.info("update %s healthy in slot %s", manifest.version, target)
            return UpdateResult("installed", manifest.version, target, active, health_runs=runs)
        error = f"version {manifest.version} not healthy within {self.health.timeout_s:g} s"
        if active is None:
            self.layout.clear_pending()
            return UpdateResult("failed", manifest.version, target, None, error, health_runs=runs)
        log.error("update: %s; rolling back to slot %s", error, active)
        self.rollback_to(active)
        return UpdateResult(
            "rolled_back", manifest.version, active, active, error, health_runs=runs
        )

    def _place(self, manifest: Manifest, staging: Path, target: str) -> None:
        """Move verified content into the inactive slot (a venv built there for wheels)."""
        (staging / SLOT_MANIFEST).write_bytes(manifest.raw)
        if manifest.kind == "tree":
            self.layout.replace_slot(target, staging)
            return
        # Wheels: a venv holds absolute paths (shebangs), so it is built at its final place
        # from the verified wheelhouse in staging (offline: --no-index).
        slot = self.layout.slot(target)
        self.layout.clear_slot(target)
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(slot)], check=True, capture_output=True
            )
            subprocess.run(
                [str(slot / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index",
                 "--find-links", str(staging / "wheels"), "dicomesh"],
                check=True, capture_output=True, timeout=1800,
            )  # fmt: skip
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(slot, ignore_errors=True)
            stderr = (getattr(exc, "stderr", None) or b"").decode(errors="replace")
            raise FirmwareError(f"venv install failed: {stderr[-300:]}") from None
        os.replace(staging / SLOT_MANIFEST, slot / SLOT_MANIFEST)
        shutil.rmtree(staging)

    def rollback_to(self, slot: str) -> None:
        self.layout.switch(slot)
        self.layout.clear_pending()
        if self.health.activate:
            _run(self.health.activate, self.layout.slot(slot), self.health.timeout_s)


def recover(root: Path) -> str | None:
    """At boot: an update interrupted before it proved healthy is rolled back (without
    activation: the service has not started yet). Returns the slot switched back to."""
    layout = Layout(root)
    pending = layout.pending()
    if pending is None:
        return None
    previous = pending.get("previous")
    if previous:
        layout.switch(previous)
    layout.clear_pending()
    log.warning("update %s was interrupted; back on slot %s", pending.get("version"), previous)
    return previous


def write_result(path: Path, result: UpdateResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, result.to_json(), mode=0o644)
