"""The `[dicom]` config section: our AE, association limits and timeouts, known remote nodes."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.schema import ae_title as valid_ae_title  # the field names would shadow it
from appliance.schema import (
    hostname_or_ip,
    ip_address,
    non_negative,
    port_range,
    positive,
    setting,
)

# PS3.8 D.1 puts no floor on Maximum Length Received (0 = unlimited), but a tiny PDU
# turns one study into millions of P-DATA-TF round trips, so we refuse below 4 KiB.
MIN_PDU = 4096
MAX_PDU = 2**32 - 1  # the field is 32 bits wide


def _max_pdu(value: int) -> str | None:
    if value == 0 or MIN_PDU <= value <= MAX_PDU:
        return None
    return f"must be 0 (unlimited) or {MIN_PDU}-{MAX_PDU}"


@dataclass(frozen=True)
class DicomNode:
    """A known remote DICOM node (C-MOVE destination, forwarding target)."""

    ae_title: str = setting(check=valid_ae_title, doc="the node's AE title")
    host: str = setting(check=hostname_or_ip, doc="host name or IP address of the node")
    port: int = setting(check=port_range, doc="the node's DICOM TCP port")


@dataclass(frozen=True)
class DicomConfig:
    """Our DICOM node: identity, who may associate, limits and timeouts, remote nodes."""

    ae_title: str = setting("DICOMESH", check=valid_ae_title, doc="our AE title (PS3.5 AE rules)")
    port: int = setting(11112, check=port_range, doc="TCP port of our DICOM listener")
    listen: str = setting(
        "0.0.0.0", check=ip_address, doc="address to bind the DICOM port to (IPv4/IPv6 literal)"
    )
    allowed_calling: list[str] = setting(
        default_factory=list, check=valid_ae_title, doc="calling AE titles accepted; empty = any"
    )
    strict_called_ae: bool = setting(
        True, doc="reject associations whose Called AE title is not ours"
    )
    max_pdu: int = setting(
        0, check=_max_pdu, doc=f"max PDU length we accept; 0 = unlimited, else {MIN_PDU}-2**32-1"
    )
    max_associations: int = setting(32, check=positive, doc="concurrent associations, >= 1")
    acse_timeout_s: float = setting(
        30.0, check=positive, doc="seconds to wait for association negotiation messages"
    )
    dimse_timeout_s: float = setting(
        120.0, check=positive, doc="seconds to wait for a DIMSE message"
    )
    network_timeout_s: float = setting(
        120.0, check=positive, doc="seconds without network traffic before an association aborts"
    )
    shutdown_grace_s: float = setting(
        10.0,
        check=non_negative,
        doc="on stop, seconds open associations get to finish before they are aborted",
    )
    nodes: list[DicomNode] = setting(
        default_factory=list, doc="known remote nodes (C-MOVE destinations, forwarding targets)"
    )

    def validate(self) -> list[tuple[str, str]]:
        """Cross-field errors as (relative key, message): duplicate and self-clashing AEs."""
        # AE titles compare without their non-significant spaces (PS3.5 Table 6.2-1).
        errors: list[tuple[str, str]] = []
        own = self.ae_title.strip(" ")
        seen: set[str] = set()
        for i, node in enumerate(self.nodes):
            title = node.ae_title.strip(" ")
            if title == own:
                errors.append((f"nodes[{i}].ae_title", f"AE title {title!r} is our own ae_title"))
            elif title in seen:
                errors.append((f"nodes[{i}].ae_title", f"duplicate AE title {title!r}"))
            seen.add(title)
        calling: set[str] = set()
        for i, raw in enumerate(self.allowed_calling):
            title = raw.strip(" ")
            if title in calling:
                errors.append((f"allowed_calling[{i}]", f"duplicate AE title {title!r}"))
            calling.add(title)
        return errors
