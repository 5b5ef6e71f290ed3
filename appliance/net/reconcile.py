"""The I/O-free reconcile core: desired state vs observed state -> netlink operations.

What is ours is recognised by number, never remembered: rules whose priority lies in our
range, routes in our tables, root qdiscs with our handle, addresses on our tunnel interfaces
(plan.py owns the numbers). So a restarted gateway finds and cleans what an earlier run left,
and nothing another program set up is ever touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Rule:
    """An `ip rule`: from `src`, or with fwmark `fwmark`/`fwmask`, or to `dst`, lookup `table`."""

    priority: int
    table: int
    src: str | None = None  # host address (/32)
    fwmark: int | None = None
    fwmask: int | None = None
    dst: str | None = None  # network "a.b.c.d/n"


@dataclass(frozen=True, order=True)
class Route:
    """A route in one of our tables; (table, dst) is its identity."""

    table: int
    dst: str  # "a.b.c.d/n"; "0.0.0.0/0" for the default route
    oif: str  # interface name
    gateway: str | None = None
    prefsrc: str | None = None  # source address chosen for unbound sockets using this route

    @property
    def key(self) -> tuple[int, str]:
        return (self.table, self.dst)


@dataclass(frozen=True, order=True)
class Shaper:
    """A tbf root qdisc with our handle on `interface` (egress = upload).

    Compared by what the kernel reports back exactly (rate in bytes/s, queue limit in
    bytes); the bucket size follows from the rate (plan.py) and is not read back.
    """

    interface: str
    rate_bytes_s: int
    limit_bytes: int
    burst_bytes: int = field(default=0, compare=False)


@dataclass(frozen=True, order=True)
class Address:
    """An address on one of our tunnel interfaces."""

    interface: str
    address: str
    prefixlen: int


@dataclass(frozen=True)
class NetState:
    """Our part of the network configuration (desired, or as observed)."""

    rules: frozenset[Rule] = frozenset()
    routes: frozenset[Route] = frozenset()
    shapers: frozenset[Shaper] = frozenset()
    addresses: frozenset[Address] = frozenset()


@dataclass(frozen=True)
class Observed(NetState):
    """Observed state, plus facts the diff needs about things that are not ours."""

    # Interfaces carrying a root qdisc that is not ours: shaping them would replace it.
    foreign_root_qdisc: frozenset[str] = field(default_factory=frozenset)


# ----------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class AddRule:
    rule: Rule


@dataclass(frozen=True)
class DelRule:
    rule: Rule


@dataclass(frozen=True)
class ReplaceRoute:
    route: Route


@dataclass(frozen=True)
class DelRoute:
    route: Route


@dataclass(frozen=True)
class ReplaceShaper:
    shaper: Shaper


@dataclass(frozen=True)
class DelShaper:
    shaper: Shaper


@dataclass(frozen=True)
class AddAddress:
    address: Address


@dataclass(frozen=True)
class DelAddress:
    address: Address


Op = (
    AddRule
    | DelRule
    | ReplaceRoute
    | DelRoute
    | ReplaceShaper
    | DelShaper
    | AddAddress
    | DelAddress
)


def diff(desired: NetState, observed: Observed) -> list[Op]:
    """Operations turning `observed` into `desired`; empty when they already agree.

    Order matters for a consistent kernel state at every step: addresses first (a route's
    prefsrc must exist), then routes, then rules pointing at them; removals of stale rules
    come before removals of the routes they point at.
    """
    ops: list[Op] = []
    ops += [AddAddress(a) for a in sorted(desired.addresses - observed.addresses)]
    ops += _routes(desired.routes, observed.routes)
    ops += [AddRule(r) for r in sorted(desired.rules - observed.rules)]
    ops += [DelRule(r) for r in sorted(observed.rules - desired.rules)]
    ops += [
        DelRoute(r) for r in sorted(observed.routes) if r.key not in {d.key for d in desired.routes}
    ]
    ops += _shapers(desired.shapers, observed)
    ops += [DelAddress(a) for a in sorted(observed.addresses - desired.addresses)]
    return ops


def teardown(observed: Observed) -> list[Op]:
    """Operations removing everything of ours that is observed (shutdown)."""
    return diff(NetState(), observed)


def _routes(desired: Iterable[Route], observed: Iterable[Route]) -> list[Op]:
    have = {r.key: r for r in observed}
    return [ReplaceRoute(r) for r in sorted(desired) if have.get(r.key) != r]


def _shapers(desired: frozenset[Shaper], observed: Observed) -> list[Op]:
    have = {s.interface: s for s in observed.shapers}
    want = {s.interface: s for s in desired}
    ops: list[Op] = []
    for name, shaper in sorted(want.items()):
        # Never replace another program's root qdisc: the operator set it up on purpose.
        if have.get(name) != shaper and name not in observed.foreign_root_qdisc:
            ops.append(ReplaceShaper(shaper))
    ops += [DelShaper(s) for name, s in sorted(have.items()) if name not in want]
    return ops


def describe(op: Op) -> str:
    """One log line for an operation (iproute2-like, for humans)."""
    match op:
        case AddRule(rule) | DelRule(rule):
            verb = "add" if isinstance(op, AddRule) else "del"
            return f"rule {verb} {_rule(rule)}"
        case ReplaceRoute(route) | DelRoute(route):
            verb = "replace" if isinstance(op, ReplaceRoute) else "del"
            return f"route {verb} {_route(route)}"
        case ReplaceShaper(shaper):
            return f"qdisc replace {_shaper(shaper)}"
        case DelShaper(shaper):
            return f"qdisc del dev {shaper.interface} root"
        case AddAddress(address) | DelAddress(address):
            verb = "add" if isinstance(op, AddAddress) else "del"
            return f"addr {verb} {address.address}/{address.prefixlen} dev {address.interface}"
    raise TypeError(op)


def _rule(r: Rule) -> str:
    parts = [f"pref {r.priority}"]
    if r.src:
        parts.append(f"from {r.src}")
    if r.dst:
        parts.append(f"to {r.dst}")
    if r.fwmark is not None:
        parts.append(f"fwmark {r.fwmark:#x}/{(r.fwmask or 0xFFFFFFFF):#x}")
    return " ".join([*parts, f"lookup {r.table}"])


def _route(r: Route) -> str:
    via = f" via {r.gateway}" if r.gateway else ""
    src = f" src {r.prefsrc}" if r.prefsrc else ""
    return f"{r.dst}{via} dev {r.oif}{src} table {r.table}"


def _shaper(s: Shaper) -> str:
    rate = f"rate {s.rate_bytes_s * 8}bit burst {s.burst_bytes} limit {s.limit_bytes}"
    return f"dev {s.interface} root tbf {rate}"
