"""Board detection and hardware facts, read from a root path (`/` on the device, a sample tree
in tests): which board (device-tree model, DMI), which NIC faces the LAN and which are uplinks,
the status LED, the hardware watchdog, where the store should live, temperatures.

Profiles are data (hw/*.toml): the code here only reads sysfs and applies them. Every read is
tolerant: a missing or odd file means "not present", never an exception (sysfs differs between
kernels and boards, and a missing fact must not stop the gateway).
"""

from __future__ import annotations

import copy
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.firmware import FirmwareError

# Where the profiles are: the venv's data files (pyproject data-files -> share/dicomesh/hw),
# else the source tree's hw/ (development, tests).
PROFILE_DIRS = (
    Path(sys.prefix) / "share" / "dicomesh" / "hw",
    Path(__file__).resolve().parents[2] / "hw",
)
GENERIC_ID = "x86_64"
ARPHRD_ETHER = 1  # linux/if_arp.h: /sys/class/net/X/type of Ethernet NICs


@dataclass(frozen=True)
class Profile:
    """One hw/*.toml file."""

    id: str
    name: str
    models: tuple[str, ...]
    dmi: bool
    lan_names: tuple[str, ...]
    lan_drivers: tuple[str, ...]
    leds: tuple[str, ...]
    watchdog: str
    watchdog_runtime_s: int
    store_prefer: tuple[str, ...]
    store_min_bytes: int
    warn_c: float
    critical_c: float
    defaults: dict[str, Any] = field(default_factory=dict)
    defaults_on_sd: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, data: dict[str, Any]) -> Profile:
        try:
            return cls(
                id=data["board"]["id"],
                name=data["board"]["name"],
                models=tuple(data["board"].get("models", ())),
                dmi=bool(data["board"].get("dmi", False)),
                lan_names=tuple(data["nic"].get("lan", ())),
                lan_drivers=tuple(data["nic"].get("lan_drivers", ())),
                leds=tuple(data["led"].get("status", ())),
                watchdog=data["watchdog"]["device"],
                watchdog_runtime_s=int(data["watchdog"]["runtime_s"]),
                store_prefer=tuple(data["store"]["prefer"]),
                store_min_bytes=int(data["store"].get("min_bytes", 0)),
                warn_c=float(data["thermal"]["warn_c"]),
                critical_c=float(data["thermal"]["critical_c"]),
                defaults=data.get("defaults", {}),
                defaults_on_sd=data.get("defaults_on_sd", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FirmwareError(f"board profile: missing or bad {exc}") from None


def load_profiles(directory: Path | None = None) -> dict[str, Profile]:
    """Every profile in `directory` (default: the first of PROFILE_DIRS that exists)."""
    if directory is None:
        directory = next((d for d in PROFILE_DIRS if d.is_dir()), PROFILE_DIRS[-1])
    profiles = {}
    for path in sorted(directory.glob("*.toml")):
        try:
            with path.open("rb") as f:
                profile = Profile.from_toml(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise FirmwareError(f"{path}: {exc}") from None
        except FirmwareError as exc:
            raise FirmwareError(f"{path}: {exc}") from None
        profiles[profile.id] = profile
    if not profiles:
        raise FirmwareError(f"no board profiles in {directory}")
    return profiles


def _read(path: Path) -> str | None:
    """A sysfs/procfs attribute as text (device-tree strings end in NUL), None if absent."""
    try:
        return path.read_bytes().rstrip(b"\0\n").decode(errors="replace").strip()
    except OSError:
        return None


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def device_tree_model(root: Path) -> str | None:
    for path in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        if (model := _read(_under(root, path))) is not None:
            return model
    return None


def dmi_info(root: Path) -> dict[str, str]:
    """The DMI identity fields that exist (sys_vendor, product_name, board_name, ...)."""
    base = _under(root, "sys/class/dmi/id")
    fields = ("sys_vendor", "product_name", "board_vendor", "board_name")
    return {name: value for name in fields if (value := _read(base / name))}


def detect_profile(root: Path, profiles: dict[str, Profile]) -> tuple[Profile | None, str]:
    """The matching profile and what identified it (model or DMI text); None if unknown."""
    model = device_tree_model(root)
    if model is not None:
        for profile in profiles.values():
            if any(model.startswith(prefix) for prefix in profile.models):
                return profile, model
        return None, model  # an ARM board we have no profile for
    dmi = dmi_info(root)
    if dmi:
        generic = next((p for p in profiles.values() if p.dmi), None)
        return generic, " ".join(dmi.get(k, "") for k in ("sys_vendor", "product_name")).strip()
    return None, "unknown"


# ---------------------------------------------------------------- NICs


@dataclass(frozen=True)
class Nic:
    """A physical network interface."""

    name: str
    bus: str  # "usb", "pci", "platform" (SoC), "other"
    driver: str | None
    wireless: bool
    mac: str | None


def _bus_of(device_path: str) -> str:
    if "/usb" in device_path:
        return "usb"  # USB Ethernet adapters hang under a host controller, itself on PCI
    if "/pci" in device_path:
        return "pci"
    if "/platform/" in device_path:
        return "platform"
    return "other"


def list_nics(root: Path) -> list[Nic]:
    """Physical Ethernet/Wi-Fi interfaces, by name. Virtual ones (lo, wg*, bridges, veth) have
    no `device` link in sysfs and are left out."""
    base = _under(root, "sys/class/net")
    nics = []
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        device = entry / "device"
        if not device.exists() or _read(entry / "type") != str(ARPHRD_ETHER):
            continue
        real = os.path.realpath(device)
        driver_link = device / "driver"
        driver = os.path.basename(os.path.realpath(driver_link)) if driver_link.exists() else None
        nics.append(
            Nic(
                name=entry.name,
                bus=_bus_of(real),
                driver=driver,
                wireless=(entry / "wireless").exists() or (entry / "phy80211").exists(),
                mac=_read(entry / "address"),
            )
        )
    return nics


def split_nics(nics: list[Nic], profile: Profile | None) -> tuple[Nic | None, list[Nic]]:
    """(the LAN NIC, the uplink candidates). The LAN is the board's onboard NIC (by name or
    driver in the profile, else the first onboard wired one); every other wired NIC, USB
    adapters included, is an uplink for one ADSL modem. Wi-Fi is never chosen."""
    wired = [n for n in nics if not n.wireless]
    lan = None
    if profile is not None:
        lan = next((n for n in wired if n.name in profile.lan_names), None) or next(
            (n for n in wired if n.driver in profile.lan_drivers), None
        )
    if lan is None:
        lan = next((n for n in wired if n.bus != "usb"), None) or next(iter(wired), None)
    return lan, [n for n in wired if n is not lan]


# ---------------------------------------------------------------- LED, watchdog, thermal


def status_led(root: Path, profile: Profile | None) -> Path | None:
    """The sysfs directory of the board's status LED, if it has one."""
    for name in profile.leds if profile else ():
        path = _under(root, f"sys/class/leds/{name}")
        if (path / "brightness").exists():
            return path
    return None


@dataclass(frozen=True)
class Watchdog:
    device: str  # /dev path
    identity: str | None
    runtime_s: int  # what systemd's RuntimeWatchdogSec should be


def hardware_watchdog(root: Path, profile: Profile | None) -> Watchdog | None:
    """The hardware watchdog systemd should drive (RuntimeWatchdogSec), if the board has one.
    systemd (PID 1) pings it, not the gateway: the gateway's own liveness is the service
    watchdog (WatchdogSec), so a hung kernel or PID 1 reboots the box, a hung gateway restarts."""
    names = [profile.watchdog] if profile else []
    base = _under(root, "sys/class/watchdog")
    names += sorted(p.name for p in base.iterdir()) if base.is_dir() else []
    for name in names:
        attrs = base / name
        if not attrs.is_dir():
            continue
        runtime = profile.watchdog_runtime_s if profile else 30
        max_timeout = _read(attrs / "max_timeout")
        if max_timeout and max_timeout.isdigit():
            runtime = min(runtime, max(1, int(max_timeout) - 1))
        return Watchdog(f"/dev/{name}", _read(attrs / "identity"), runtime)
    return None


@dataclass(frozen=True)
class ThermalZone:
    name: str
    type: str
    temp_c: float | None
    critical_c: float | None  # the kernel's critical trip point, if any


def thermal_zones(root: Path) -> list[ThermalZone]:
    base = _under(root, "sys/class/thermal")
    zones = []
    for zone in sorted(base.glob("thermal_zone*")) if base.is_dir() else []:
        temp = _read(zone / "temp")
        critical = None
        for trip_type in sorted(zone.glob("trip_point_*_type")):
            if _read(trip_type) == "critical":
                value = _read(zone / trip_type.name.replace("_type", "_temp"))
                if value and value.lstrip("-").isdigit():
                    critical = int(value) / 1000
        zones.append(
            ThermalZone(
                zone.name,
                _read(zone / "type") or "",
                int(temp) / 1000 if temp and temp.lstrip("-").isdigit() else None,
                critical,
            )
        )
    return zones


def thermal_state(zones: list[ThermalZone], profile: Profile | None) -> str:
    """ok | warm | critical: the hottest zone against the profile's limits (and the kernel's
    own critical trip, whichever is lower)."""
    worst = "ok"
    for zone in zones:
        if zone.temp_c is None:
            continue
        limits = [c for c in (profile and profile.critical_c, zone.critical_c) if c is not None]
        if limits and zone.temp_c >= min(limits):
            return "critical"
        if profile is not None and zone.temp_c >= profile.warn_c:
            worst = "warm"
    return worst


# ---------------------------------------------------------------- store placement


@dataclass(frozen=True)
class Disk:
    name: str
    kind: str  # usb | nvme | sata | mmc
    size_bytes: int
    removable: bool


def list_disks(root: Path) -> list[Disk]:
    """Whole disks from /sys/block (no loop, ram, zram, dm devices)."""
    base = _under(root, "sys/block")
    disks = []
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        name = entry.name
        if name.startswith(("loop", "ram", "zram", "dm-", "md", "sr")):
            continue
        if name.endswith(("boot0", "boot1", "rpmb")):  # eMMC boot/RPMB areas of an mmcblk
            continue
        real = os.path.realpath(entry / "device") if (entry / "device").exists() else ""
        if name.startswith("mmcblk"):
            kind = "mmc"
        elif name.startswith("nvme"):
            kind = "nvme"
        elif "/usb" in real:
            kind = "usb"
        elif name.startswith(("sd", "vd", "hd")):
            kind = "sata"
        else:
            continue
        size = _read(entry / "size")
        disks.append(
            Disk(
                name,
                kind,
                int(size) * 512 if size and size.isdigit() else 0,  # sysfs size: 512 B sectors
                _read(entry / "removable") == "1",
            )
        )
    return disks


def preferred_store_disk(disks: list[Disk], profile: Profile | None) -> Disk | None:
    """The disk the store should live on: the profile's order (USB SSD before SD card on a
    Pi), then the largest; disks below the profile's minimum size are skipped unless nothing
    else exists (a small SD card is better than no store)."""
    order = profile.store_prefer if profile else ("nvme", "sata", "usb", "mmc")
    minimum = profile.store_min_bytes if profile else 0

    def rank(disk: Disk) -> tuple[int, int, int]:
        kind = order.index(disk.kind) if disk.kind in order else len(order)
        return (disk.size_bytes < minimum, kind, -disk.size_bytes)

    return min(disks, key=rank, default=None)


# ---------------------------------------------------------------- the whole picture


@dataclass(frozen=True)
class Hardware:
    """What `detect` found."""

    profile: Profile | None
    identified_by: str
    lan: Nic | None
    uplinks: list[Nic]
    led: Path | None
    watchdog: Watchdog | None
    store_disk: Disk | None
    thermal: list[ThermalZone]

    @property
    def store_on_sd(self) -> bool:
        return self.store_disk is not None and self.store_disk.kind == "mmc"

    def config_defaults(self) -> dict[str, Any]:
        """Nested config tables for this board (to be merged *under* the config file)."""
        if self.profile is None:
            return {}
        out = copy.deepcopy(self.profile.defaults)
        if self.store_on_sd:
            merge_into(out, self.profile.defaults_on_sd)
        return out


def detect(root: Path = Path("/"), profiles: dict[str, Profile] | None = None) -> Hardware:
    """Everything above for the machine under `root`."""
    profiles = profiles if profiles is not None else load_profiles()
    profile, identified_by = detect_profile(root, profiles)
    lan, uplinks = split_nics(list_nics(root), profile)
    return Hardware(
        profile=profile,
        identified_by=identified_by,
        lan=lan,
        uplinks=uplinks,
        led=status_led(root, profile),
        watchdog=hardware_watchdog(root, profile),
        store_disk=preferred_store_disk(list_disks(root), profile),
        thermal=thermal_zones(root),
    )


def merge_into(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `top` into `base` (tables merged, other values replaced); returns `base`."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_into(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def merge_under(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The config file's `data` on top of the board `defaults` (the file wins everywhere)."""
    return merge_into(copy.deepcopy(defaults), data)
