"""The thin pyroute2 adapter: observe our routing state, apply reconcile operations.

One IPRoute socket per namespace (None = the gateway's own), kept open by its owner and used
from one dedicated thread: pyroute2's AsyncIPRoute cannot run on uvloop (no AF_NETLINK
datagram endpoints there), and a netlink socket must not be shared between threads. The
async methods are the facade the event loop uses. Every operation is idempotent at this
level too: "already there" on add and "already gone" on delete count as done (errors are
branched on errno, not on text).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.net import plan
from appliance.net.errors import NetError
from appliance.net.reconcile import (
    AddAddress,
    Address,
    AddRule,
    DelAddress,
    DelRoute,
    DelRule,
    DelShaper,
    Observed,
    Op,
    ReplaceRoute,
    ReplaceShaper,
    Route,
    Rule,
    Shaper,
    describe,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

TC_H_ROOT = 0xFFFFFFFF
IFF_UP = 0x1  # linux/if.h
MAIN_TABLE = 254
_DONE_ALREADY = {
    AddRule: {errno.EEXIST},
    AddAddress: {errno.EEXIST},
    DelRule: {errno.ENOENT},
    DelRoute: {errno.ESRCH, errno.ENOENT},
    DelShaper: {errno.ENOENT, errno.EINVAL},
    DelAddress: {errno.EADDRNOTAVAIL, errno.ENODEV},
}


class Netlink:
    """Routing state of one network namespace through pyroute2."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: IPRoute | None = None
        self._thread: ThreadPoolExecutor | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            raise NetError("netlink socket is not open")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def open(self) -> Netlink:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="netlink")

        def connect() -> None:
            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()

        try:
            await self._call(connect)
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self._thread is None:
            return
        if self._ipr is not None:
            await self._call(self._ipr.close)
            self._ipr = None
        self._thread.shutdown(wait=False)
        self._thread = None

    async def __aenter__(self) -> Netlink:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            raise NetError("netlink socket is not open")
        return self._ipr

    # ------------------------------------------------------------------------ facade

    async def links(self) -> dict[str, int]:
        """Interface name -> index."""
        return await self._call(self._links)

    async def ipv4_addresses(self, ifname: str) -> list[str]:
        """The IPv4 addresses on `ifname`, primary first; [] if it does not exist."""
        return await self._call(self._ipv4_addresses, ifname)

    async def dhcp_gateway(self, ifname: str) -> str | None:
        """The next hop of the main table's default route out of `ifname` (as a DHCP client
        installs it), or None while there is none."""
        return await self._call(self._dhcp_gateway, ifname)

    async def is_up(self, ifname: str) -> bool:
        """Whether `ifname` exists and is administratively up."""
        return await self._call(self._is_up, ifname)

    async def set_up(self, ifname: str) -> None:
        await self._call(self._set_up, ifname)

    async def observe(self, tunnels: Iterable[str] = ()) -> Observed:
        """Our rules, routes and shapers, and the addresses on the tunnel interfaces given."""
        return await self._call(self._observe, list(tunnels))

    async def apply(self, ops: Iterable[Op]) -> int:
        """Apply `ops` in order; return how many failed (each logged; the rest still run)."""
        return await self._call(self._apply_all, list(ops))

    # ------------------------------------------------------------------------ netlink thread

    def _links(self) -> dict[str, int]:
        return {link.get("ifname"): link["index"] for link in self.ipr.link("dump")}

    def _ipv4_addresses(self, ifname: str) -> list[str]:
        index = self._links().get(ifname)
        if index is None:
            return []
        dump = self.ipr.addr("dump", family=socket.AF_INET, index=index)
        return [a.get("address") for a in dump if a["index"] == index]

    def _dhcp_gateway(self, ifname: str) -> str | None:
        index = self._links().get(ifname)
        if index is None:
            return None
        for r in self.ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE):
            if r["dst_len"] == 0 and r.get("oif") == index and r.get("gateway"):
                return str(r.get("gateway"))
        return None

    def _is_up(self, ifname: str) -> bool:
        for link in self.ipr.link("dump"):
            if link.get("ifname") == ifname:
                return bool(link["flags"] & IFF_UP)
        return False

    def _set_up(self, ifname: str) -> None:
        index = self._links().get(ifname)
        if index is None:
            raise NetError(f"no interface {ifname}")
        self.ipr.link("set", index=index, state="up")

    def _observe(self, tunnels: list[str]) -> Observed:
        links = self._links()
        names = {index: name for name, index in links.items()}
        rules = frozenset(_our_rules(self.ipr.rule("dump", family=socket.AF_INET)))
        routes: set[Route] = set()
        for r in self.ipr.route("dump", family=socket.AF_INET):
            table = r.get("table")
            if table is None or not plan.is_our_table(table) or r.get("oif") not in names:
                continue
            dst = f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}"
            routes.add(Route(table, dst, names[r.get("oif")], r.get("gateway"), r.get("prefsrc")))
        shapers: set[Shaper] = set()
        foreign: set[str] = set()
        for q in self.ipr.tc("dump"):
            if q["parent"] != TC_H_ROOT or q["index"] not in names:
                continue
            name = names[q["index"]]
            if q["handle"] >> 16 == plan.QDISC_MAJOR and q.get("kind") == "tbf":
                parms = q.get_nested("TCA_OPTIONS", "TCA_TBF_PARMS")
                shapers.add(Shaper(name, parms["rate"], parms["limit"]))
            elif q["handle"] != 0:  # handle 0: the kernel's default root qdisc
                foreign.add(name)
        addresses: set[Address] = set()
        for tunnel in tunnels:
            if tunnel not in links:
                continue
            for a in self.ipr.addr("dump", family=socket.AF_INET, index=links[tunnel]):
                if a["index"] == links[tunnel]:
                    addresses.add(Address(tunnel, a.get("address"), a["prefixlen"]))
        return Observed(
            rules, frozenset(routes), frozenset(shapers), frozenset(addresses), frozenset(foreign)
        )

    def _apply_all(self, ops: list[Op]) -> int:
        failed = 0
        links = self._links()
        for op in ops:
            try:
                self._apply(op, links)
                log.info("net: %s", describe(op))
            except NetlinkError as exc:
                if exc.code in _DONE_ALREADY.get(type(op), ()):
                    continue
                failed += 1
                log.warning("net: %s failed: %s", describe(op), exc)
            except KeyError as exc:  # an interface named by the op does not exist (any more)
                failed += 1
                log.warning("net: %s failed: no interface %s", describe(op), exc)
        return failed

    def _apply(self, op: Op, links: dict[str, int]) -> None:
        ipr = self.ipr
        match op:
            case AddRule(rule) | DelRule(rule):
                ipr.rule("add" if isinstance(op, AddRule) else "del", **_rule_args(rule))
            case ReplaceRoute(route):
                ipr.route("replace", **_route_args(route), oif=links[route.oif])
            case DelRoute(route):
                ipr.route("del", **_route_args(route))
            case ReplaceShaper(shaper):
                ipr.tc(
                    "replace",
                    "tbf",
                    index=links[shaper.interface],
                    handle=plan.QDISC_MAJOR << 16,
                    rate=f"{shaper.rate_bytes_s * 8}bit",
                    burst=shaper.burst_bytes,
                    limit=shaper.limit_bytes,
                )
            case DelShaper(shaper):
                index = links[shaper.interface]
                ipr.tc("del", index=index, handle=plan.QDISC_MAJOR << 16, parent=TC_H_ROOT)
            case AddAddress(a) | DelAddress(a):
                command = "add" if isinstance(op, AddAddress) else "del"
                ipr.addr(
                    command, index=links[a.interface], address=a.address, prefixlen=a.prefixlen
                )


def _our_rules(dump: Iterable[Any]) -> Iterator[Rule]:
    for r in dump:
        priority = r.get("priority") or 0
        if not plan.is_our_priority(priority):
            continue
        yield Rule(
            priority,
            r.get("table") or r["table"],
            src=r.get("src") if r["src_len"] else None,
            fwmark=r.get("fwmark"),
            fwmask=r.get("fwmask") if r.get("fwmark") is not None else None,
            dst=f"{r.get('dst')}/{r['dst_len']}" if r["dst_len"] else None,
        )


def _rule_args(rule: Rule) -> dict[str, object]:
    args: dict[str, object] = {
        "family": socket.AF_INET,
        "priority": rule.priority,
        "table": rule.table,
    }
    if rule.src:
        args.update(src=rule.src, src_len=32)
    if rule.dst:
        dst, _, length = rule.dst.partition("/")
        args.update(dst=dst, dst_len=int(length))
    if rule.fwmark is not None:
        mask = rule.fwmask if rule.fwmask is not None else 0xFFFFFFFF
        args.update(fwmark=rule.fwmark, fwmask=mask)
    return args


def _route_args(route: Route) -> dict[str, object]:
    dst, _, length = route.dst.partition("/")
    args: dict[str, object] = {
        "family": socket.AF_INET,
        "table": route.table,
        "dst": dst,
        "dst_len": int(length),
    }
    if route.gateway:
        args["gateway"] = route.gateway
    if route.prefsrc:
        args["prefsrc"] = route.prefsrc
    return args
