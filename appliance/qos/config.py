"""The `[qos]` config section: the probe responder that peers measure this gateway against."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from appliance.schema import ip_address, port_range, setting

DEFAULT_PROBE_PORT = 7481  # next to the mesh's 7480


def specific_address(value: str) -> str | None:
    """Check: an IP address literal that is not the wildcard (0.0.0.0, ::)."""
    error = ip_address(value)
    if error is None and ipaddress.ip_address(value).is_unspecified:
        return "must be one address of this gateway, not the wildcard"
    return error


@dataclass(frozen=True)
class QosConfig:
    """The QoS probe responder (UDP probes and TCP bulk sink, admitted peers only)."""

    enabled: bool = setting(True, doc="answer QoS probes from admitted peers")
    probe_port: int = setting(
        DEFAULT_PROBE_PORT,
        check=port_range,
        doc="UDP (probes) and TCP (bulk throughput) port of the responder",
    )
    lan_addresses: list[str] = setting(
        default_factory=list,
        check=specific_address,
        doc="LAN addresses to answer on besides mesh.address",
    )
