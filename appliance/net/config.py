"""The `[net]` config section: uplinks, their health probing and the WireGuard tunnels.

    [[net.uplinks]]
    name = "adsl1"
    interface = "eth1"
    gateway = "192.168.1.1"      # or "dhcp": taken from the default route a DHCP client set
    up_kbps = 800                # nominal, used until measured
    down_kbps = 3000
    [net.health]
    targets = []                 # empty: probe each uplink's own gateway
    interval_s = 2
    down_after = 3               # consecutive failures
    up_after = 5                 # consecutive successes
    [net.wireguard]
    enabled = true

An empty `uplinks` list (the default) leaves routing, shaping and tunnels off. IPv4 only.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from appliance.schema import in_range, port_range, positive, setting

MAX_UPLINKS = 16  # table ids, rule priorities and marks reserve this many slots (plan.py)
IFNAMSIZ = 15  # linux/if.h: 16 bytes including the NUL

_UPLINK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,14}$")
_IFNAME = re.compile(r"^[^\s/:]{1,15}$")
_PREFIX = re.compile(r"^[a-z][a-z0-9-]{0,11}$")


def uplink_name(value: str) -> str | None:
    """Check: 1-15 of a-z 0-9 '-' (used in key file names and status)."""
    return None if _UPLINK_NAME.match(value) else "must be 1-15 characters a-z, 0-9, '-'"


def interface_name(value: str) -> str | None:
    """Check: a Linux interface name (1-15 characters, no blanks, '/' or ':')."""
    return None if _IFNAME.match(value) else "must be a Linux interface name (1-15 characters)"


def ipv4(value: str) -> str | None:
    """Check: an IPv4 address literal."""
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return "must be an IPv4 address"
    return None


def gateway_address(value: str) -> str | None:
    """Check: an IPv4 next hop, or "dhcp"."""
    return None if value == "dhcp" else (ipv4(value) and 'must be an IPv4 address or "dhcp"')


def ipv4_network(value: str) -> str | None:
    """Check: an IPv4 network in CIDR notation."""
    try:
        ipaddress.IPv4Network(value)
    except ValueError:
        return "must be an IPv4 network like 10.90.0.0/16"
    return None


def probe_target(value: str) -> str | None:
    """Check: "a.b.c.d" (ICMP echo) or "a.b.c.d:port" (TCP connect)."""
    host, _, port = value.partition(":")
    if ipv4(host) is None and (not port or (port.isdigit() and 1 <= int(port) <= 65535)):
        return None
    return 'must be "a.b.c.d" (ping) or "a.b.c.d:port" (TCP connect)'


def interface_prefix(value: str) -> str | None:
    """Check: 1-12 of a-z 0-9 '-', starting with a letter (room for up to 3 digits)."""
    return None if _PREFIX.match(value) else "must be 1-12 characters a-z, 0-9, '-'"


@dataclass(frozen=True)
class ShapeConfig:
    """Upload shaping of one uplink (a tbf queue on its interface, ours instead of the modem's)."""

    enabled: bool = setting(False, doc="shape this uplink's upload")
    rate_kbps: int = setting(
        0,
        check=in_range(0, 10_000_000),
        doc="shaped rate in kbit/s; 0 = 95 % of up_kbps (just under the line)",
    )
    latency_ms: int = setting(
        200, check=in_range(10, 2000), doc="queue length in ms at the rate (ADSL-like buffer)"
    )


@dataclass(frozen=True)
class UplinkConfig:
    """One internet line of this site."""

    name: str = setting(check=uplink_name, doc="unique uplink name, e.g. adsl1")
    interface: str = setting(check=interface_name, doc="the interface the line's modem is on")
    gateway: str = setting(check=gateway_address, doc='next hop (IPv4), or "dhcp"')
    up_kbps: int = setting(check=in_range(1, 10_000_000), doc="nominal upload, kbit/s")
    down_kbps: int = setting(check=in_range(1, 10_000_000), doc="nominal download, kbit/s")
    source: str | None = setting(
        None, check=ipv4, doc="source address; default: the interface's first IPv4 address"
    )
    overlay_address: str | None = setting(
        None, check=ipv4, doc="this uplink tunnel's overlay (VPN) address; needed by WireGuard"
    )
    shape: ShapeConfig = setting(default_factory=ShapeConfig, doc="upload shaping")

    def shaped_kbps(self) -> int:
        """The tbf rate: configured, or 95 % of the nominal upload."""
        return self.shape.rate_kbps or max(1, self.up_kbps * 95 // 100)


@dataclass(frozen=True)
class HealthConfig:
    """How uplinks are probed, and when one counts as down, degraded or up again."""

    targets: list[str] = setting(
        default_factory=list,
        check=probe_target,
        doc='probe targets ("a.b.c.d" ping, "a.b.c.d:port" TCP); empty = each gateway',
    )
    interval_s: float = setting(2.0, check=positive, doc="seconds between probes of one uplink")
    timeout_s: float = setting(1.0, check=positive, doc="a probe unanswered this long failed")
    down_after: int = setting(3, check=in_range(1, 100), doc="consecutive failures -> down")
    up_after: int = setting(5, check=in_range(1, 100), doc="consecutive successes -> up")
    degraded_rtt_ms: float = setting(
        800.0, check=positive, doc="round trip above this counts as degraded"
    )
    degraded_loss: float = setting(
        0.2, check=in_range(0.0, 1.0), doc="share of lost probes in the window -> degraded"
    )
    window: int = setting(10, check=in_range(1, 1000), doc="probes the loss share is taken over")

    def validate(self) -> list[tuple[str, str]]:
        if self.timeout_s > self.interval_s:
            return [("timeout_s", "must be <= interval_s (one probe at a time per uplink)")]
        return []


@dataclass(frozen=True)
class WireGuardConfig:
    """One WireGuard interface per uplink, each with its own key, port and fwmark."""

    enabled: bool = setting(False, doc="bring up the WireGuard tunnels")
    listen_port: int = setting(
        51820, check=port_range, doc="UDP port of the first uplink's tunnel; uplink i uses +i"
    )
    backend: Literal["auto", "kernel", "userspace"] = setting(
        "auto", doc="auto: kernel module if present, else wireguard-go"
    )
    interface_prefix: str = setting(
        "dmwg", check=interface_prefix, doc="tunnel interface names: prefix + uplink index"
    )
    overlay_network: str = setting(
        "10.90.0.0/16", check=ipv4_network, doc="the mesh's overlay range, routed into tunnels"
    )
    keepalive_s: int = setting(
        25, check=in_range(0, 3600), doc="persistent keepalive (keeps NAT mappings open; 0 off)"
    )


@dataclass(frozen=True)
class NetConfig:
    """Uplinks with policy routing, health probing, upload shaping and WireGuard."""

    uplinks: list[UplinkConfig] = setting(
        default_factory=list, doc="internet lines (empty: routing and tunnels off)"
    )
    health: HealthConfig = setting(default_factory=HealthConfig, doc="uplink health probing")
    wireguard: WireGuardConfig = setting(default_factory=WireGuardConfig, doc="tunnels")
    reconcile_interval_s: float = setting(
        10.0, check=positive, doc="seconds between checks that routes, rules and tunnels are set"
    )

    def validate(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        if len(self.uplinks) > MAX_UPLINKS:
            errors.append(("uplinks", f"at most {MAX_UPLINKS} uplinks"))
        seen: dict[str, set[str]] = {}
        for i, up in enumerate(self.uplinks):
            for key in ("name", "interface", "source", "overlay_address"):
                value = getattr(up, key)
                if value is None:
                    continue
                if value in seen.setdefault(key, set()):
                    errors.append((f"uplinks[{i}].{key}", f"{value!r} used by another uplink"))
                seen[key].add(value)
        wg = self.wireguard
        if wg.enabled and self.uplinks:
            overlay = ipaddress.IPv4Network(wg.overlay_network)
            for i, up in enumerate(self.uplinks):
                if up.overlay_address is None:
                    errors.append((f"uplinks[{i}].overlay_address", "required with WireGuard"))
                elif ipaddress.IPv4Address(up.overlay_address) not in overlay:
                    errors.append(
                        (f"uplinks[{i}].overlay_address", f"must be inside {wg.overlay_network}")
                    )
            if len(wg.interface_prefix) + len(str(len(self.uplinks) - 1)) > IFNAMSIZ:
                errors.append(("wireguard.interface_prefix", "too long for interface names"))
            if wg.listen_port + len(self.uplinks) - 1 > 65535:
                errors.append(("wireguard.listen_port", "ports for all uplinks exceed 65535"))
        return errors
