"""The `[web]` config section: the local admin page (addresses, sessions, login throttle,
metrics access, zeroconf)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from appliance.schema import (
    absolute_path,
    ip_address,
    non_negative,
    port_range,
    positive,
    setting,
)

DEFAULT_PORT = 8080
# In `listen`: the IPv4 addresses of the board's LAN NIC (hw/*.toml, appliance/firmware/
# board.py), looked up when the page starts and followed while it runs (DHCP).
LAN = "lan"


def specific_address(value: str) -> str | None:
    """Check: one address of this gateway, not the wildcard. The page must never listen on
    an uplink, and a wildcard bind would include every uplink's address."""
    error = ip_address(value)
    if error is None and ipaddress.ip_address(value).is_unspecified:
        return "must be one LAN, loopback or overlay address, not the wildcard (never an uplink)"
    return error


def listen_address(value: str) -> str | None:
    """Check: a specific address (see above), or "lan"."""
    return None if value == LAN else specific_address(value)


def ip_network(value: str) -> str | None:
    """Check: an IPv4/IPv6 network in CIDR notation (a bare address is a /32 or /128)."""
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return "must be a network like 192.168.1.0/24 or an address"
    return None


@dataclass(frozen=True)
class WebConfig:
    """The local admin page and its JSON API."""

    enabled: bool = setting(True, doc="serve the admin page and its API")
    listen: list[str] = setting(
        default_factory=lambda: ["127.0.0.1"],
        check=listen_address,
        doc="addresses to serve on: loopback, LAN and overlay addresses only, never an "
        "uplink's; \"lan\" = the addresses of the board's LAN NIC",
    )
    port: int = setting(DEFAULT_PORT, check=port_range, doc="TCP port of the page (HTTP)")
    session_ttl_s: float = setting(
        12 * 3600.0, check=positive, doc="a login session ends this long after login"
    )
    session_idle_s: float = setting(
        1800.0, check=positive, doc="a session unused this long ends earlier"
    )
    cookie_secure: bool = setting(
        False, doc="mark the session cookie Secure (only behind an HTTPS reverse proxy)"
    )
    login_free_attempts: int = setting(
        3, check=non_negative, doc="failed logins per source address before delays start"
    )
    login_backoff_s: float = setting(
        1.0, check=positive, doc="first lockout after the free attempts; doubles per failure"
    )
    login_max_backoff_s: float = setting(
        900.0, check=positive, doc="longest lockout of a source address"
    )
    metrics_allow: list[str] = setting(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        check=ip_network,
        doc="sources that may scrape /metrics without a session (admin peers always may)",
    )
    events_interval_s: float = setting(
        1.0, check=positive, doc="how often the page's live stream (/api/events) pushes status"
    )
    log_lines: int = setting(2000, check=positive, doc="recent log lines kept for the page")
    update_key: Path = setting(
        Path("/etc/dicomesh/update.pub"),
        check=absolute_path,
        doc="Ed25519 public key (PEM) update bundles must be signed with (baked into the image)",
    )
    zeroconf: bool = setting(
        True, doc="advertise _dicom._tcp, _http._tcp, _dicomesh._tcp and browse for gateways"
    )
    zeroconf_addresses: list[str] = setting(
        default_factory=list,
        check=specific_address,
        doc="LAN addresses to announce on; empty = the non-loopback `listen` addresses",
    )

    def validate(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        if self.enabled and not self.listen:
            errors.append(("listen", "at least one address when the page is enabled"))
        if self.session_idle_s > self.session_ttl_s:
            errors.append(("session_idle_s", "must not exceed session_ttl_s"))
        return errors

    def announce_addresses(self, listening: list[str] | None = None) -> list[str]:
        """Where zeroconf speaks: the configured addresses, else the LAN ones we listen on
        (`listening`: `listen` with "lan" resolved; default `listen` without it)."""
        if self.zeroconf_addresses:
            return list(self.zeroconf_addresses)
        found = listening if listening is not None else [a for a in self.listen if a != LAN]
        return [a for a in found if not ipaddress.ip_address(a).is_loopback]
