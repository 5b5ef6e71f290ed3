"""What the mesh needs from the network subsystem: which uplinks to spread paths over, when
that changes, how to bind a connection to one, and where to listen.

Structural types only, so the mesh does not import appliance.net (app.py passes the
NetworkManager in; `appliance.net.manager.NetworkManager` and `appliance.net.binding` fit).
Without a MeshNetwork the mesh works as on a single line: one path per peer, every socket
bound to `[mesh] address`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class UplinkBinding(Protocol):
    """Where to bind a socket so that it leaves through one uplink (net/binding.py)."""

    @property
    def uplink(self) -> str: ...

    @property
    def source(self) -> str: ...


class UplinkChange(Protocol):
    """An uplink's health changed (net/manager.py UplinkChange)."""

    @property
    def uplink(self) -> str: ...

    @property
    def usable(self) -> bool: ...


class UplinkSource(Protocol):
    """The uplinks as the network subsystem reports them (NetworkManager)."""

    def bindings(self, usable_only: bool = True) -> Sequence[Any]:
        """UplinkBinding-like objects, config order (usable ones only by default)."""
        ...

    def subscribe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call `callback(UplinkChange)` on the loop at every health change."""
        ...


# (binding, max connections) -> an aiohttp connector whose connections all use that uplink.
ConnectorFactory = Callable[[Any, int], Any]


@dataclass(frozen=True)
class MeshNetwork:
    """The network as the mesh uses it: one swarm path per (peer, usable uplink), and with
    WireGuard on, a server reachable through the tunnels only."""

    uplinks: UplinkSource
    connector: ConnectorFactory
    # With WireGuard: the tunnels' overlay addresses plus loopback (local tools); empty:
    # `[mesh] address` as without a network subsystem.
    listen: tuple[str, ...] = ()
    # With WireGuard: requests from outside this network (plain underlay) are refused.
    overlay_network: str | None = None

    def usable(self) -> list[UplinkBinding]:
        """The uplinks to use now, config order."""
        return list(self.uplinks.bindings())

    def binding(self, uplink: str) -> tuple[int, UplinkBinding] | None:
        """The uplink's position in the configuration (stable while it is down) and its
        binding, usable or not; None while its address is not known."""
        for i, b in enumerate(self.uplinks.bindings(usable_only=False)):
            if b.uplink == uplink:
                return i, b
        return None
