"""The numbers that make routing state ours, and the desired state for a set of uplinks.

Uplink i (0-based, in config order) owns table TABLE_BASE+i and mark MARK_BASE+i. Its table
holds a default route through its own gateway (and the overlay network through its own
tunnel); rules send a packet there when it carries the uplink's mark (sockets bound by
`binding.py`, the tunnel's own UDP) or comes from one of its addresses. Unbound traffic
keeps following the main table.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.net.config import MAX_UPLINKS
from appliance.net.reconcile import Address, NetState, Route, Rule, Shaper

# Tables 253-255 are the kernel's (default, main, local); iproute2 names nothing above 255.
TABLE_BASE = 2100
# Rule priorities: after the local table's 0, long before main (32766) and default (32767),
# and above 999 so an operator's own early rules keep precedence.
PRIO_MARK_BASE = 1000  # fwmark -> uplink table: explicit choices win over source addresses
PRIO_SOURCE_BASE = 1100  # from the uplink's underlay address
PRIO_OVERLAY_BASE = 1200  # from the uplink tunnel's overlay address
PRIO_OVERLAY_DEFAULT = 1290  # unbound sockets to the overlay network: first usable tunnel
PRIO_FIRST, PRIO_LAST = PRIO_MARK_BASE, PRIO_OVERLAY_DEFAULT
# fwmarks: the low 16 bits only, so other users of the upper bits (e.g. a firewall's
# connection marks) keep theirs.
MARK_BASE = 0x4D10
MARK_MASK = 0xFFFF
# tc handle major number of our root qdiscs ("d1c0:").
QDISC_MAJOR = 0xD1C0
DEFAULT_ROUTE = "0.0.0.0/0"


def table_of(index: int) -> int:
    return TABLE_BASE + index


def mark_of(index: int) -> int:
    return MARK_BASE + index


def is_our_table(table: int) -> bool:
    return TABLE_BASE <= table < TABLE_BASE + MAX_UPLINKS


def is_our_priority(priority: int) -> bool:
    return PRIO_FIRST <= priority <= PRIO_LAST


def shaper_for(interface: str, rate_kbps: int, latency_ms: int) -> Shaper:
    """A tbf shaper at `rate_kbps` holding `latency_ms` of queue."""
    rate_bytes_s = rate_kbps * 1000 // 8
    # Bucket: a few full frames (tbf splits bigger GSO frames itself) or 2 ms at rate.
    burst = max(16_000, rate_bytes_s // 500)
    limit = rate_bytes_s * latency_ms // 1000 + burst
    return Shaper(interface, rate_bytes_s, limit, burst)


@dataclass(frozen=True)
class UplinkFacts:
    """One uplink as the planner needs it; None where not known yet (no address, no lease)."""

    index: int
    name: str
    interface: str
    source: str | None
    gateway: str | None
    shaper: Shaper | None = None
    tunnel: str | None = None  # its WireGuard interface, when up
    overlay_address: str | None = None


def desired_state(
    uplinks: list[UplinkFacts], overlay_network: str | None, overlay_default: int | None
) -> NetState:
    """Rules, routes, shapers and tunnel addresses for `uplinks`; `overlay_default` is the
    index of the uplink whose tunnel carries unbound traffic to the overlay (None: none)."""
    rules: set[Rule] = set()
    routes: set[Route] = set()
    shapers: set[Shaper] = set()
    addresses: set[Address] = set()
    for up in uplinks:
        table = table_of(up.index)
        rules.add(
            Rule(PRIO_MARK_BASE + up.index, table, fwmark=mark_of(up.index), fwmask=MARK_MASK)
        )
        if up.source is not None:
            rules.add(Rule(PRIO_SOURCE_BASE + up.index, table, src=up.source))
        if up.gateway is not None:
            routes.add(Route(table, DEFAULT_ROUTE, up.interface, up.gateway, up.source))
        if up.shaper is not None:
            shapers.add(up.shaper)
        if up.tunnel and up.overlay_address and overlay_network:
            addresses.add(Address(up.tunnel, up.overlay_address, 32))
            routes.add(Route(table, overlay_network, up.tunnel, None, up.overlay_address))
            rules.add(Rule(PRIO_OVERLAY_BASE + up.index, table, src=up.overlay_address))
    if overlay_network and overlay_default is not None:
        rules.add(Rule(PRIO_OVERLAY_DEFAULT, table_of(overlay_default), dst=overlay_network))
    return NetState(frozenset(rules), frozenset(routes), frozenset(shapers), frozenset(addresses))
