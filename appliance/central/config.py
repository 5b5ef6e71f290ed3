"""The `[central]` config section: the central PACS, and which gateways talk to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.mesh.config import peer_name
from appliance.schema import ae_title as valid_ae_title  # the field names would shadow it
from appliance.schema import hostname_or_ip, port_range, positive, setting


def _origin(value: str) -> str | None:
    return None if value == "" else peer_name(value)


@dataclass(frozen=True)
class CentralConfig:
    """The central PACS: replicas (`roles`) query and retrieve from it directly, the other
    gateways through the replicas over the mesh."""

    enabled: bool = setting(
        False, doc="use the central PACS (on replicas: talk to it; elsewhere: via replicas)"
    )
    ae_title: str = setting("PACS", check=valid_ae_title, doc="the central PACS's AE title")
    host: str = setting("127.0.0.1", check=hostname_or_ip, doc="its host name or IP address")
    port: int = setting(104, check=port_range, doc="its DICOM TCP port")
    roles: list[Literal["clinic", "replica"]] = setting(
        default_factory=lambda: ["replica"],
        doc="gateway roles ([mesh] role) that talk to the central PACS directly",
    )
    move_destination: str = setting(
        "",
        check=lambda v: None if v == "" else valid_ae_title(v),
        doc="AE title the PACS knows this gateway's DICOM node by, as C-MOVE destination "
        "(empty: [dicom] ae_title)",
    )
    catalog_origin: str = setting(
        "",
        check=_origin,
        doc='catalog origin for what the central PACS holds (empty: "pacs-" + [mesh] name)',
    )
    connect_timeout_s: float = setting(
        5.0, check=positive, doc="seconds to connect and associate with the central PACS"
    )
    find_timeout_s: float = setting(
        10.0, check=positive, doc="seconds a whole C-FIND at the central PACS may take"
    )
    relay_timeout_s: float = setting(
        4.0,
        check=positive,
        doc="seconds a C-FIND here waits for the replicas' central answers (local results "
        "are returned regardless)",
    )
    max_matches: int = setting(1000, check=positive, doc="central C-FIND matches used at most")
    move_batch: int = setting(
        64, check=positive, doc="SOP Instance UIDs per image-level C-MOVE from the central PACS"
    )
    move_timeout_s: float = setting(
        120.0, check=positive, doc="seconds to wait for each C-MOVE response of the central PACS"
    )
    stall_s: float = setting(
        30.0,
        check=positive,
        doc="a central retrieval with no new instance for this long is re-asked of the "
        "replicas still answering",
    )
    fill_complete: bool = setting(
        True,
        doc="after its share of a study, a replica swarms the rest from the other replicas",
    )

    def talks_directly(self, role: str) -> bool:
        """Whether a gateway of `role` queries and retrieves at the central PACS itself."""
        return self.enabled and role in self.roles

    def origin(self, mesh_name: str) -> str:
        """The catalog origin this replica publishes the central PACS's holdings under."""
        return self.catalog_origin or f"pacs-{mesh_name}"[:32].rstrip("-")


def check_mesh(central: CentralConfig, mesh_enabled: bool) -> list[tuple[str, str]]:
    """[central] needs the mesh (its broker and relay run on it), as (key from the root,
    message); for the root Config's validate."""
    if central.enabled and not mesh_enabled:
        return [("central.enabled", "needs [mesh] enabled (the broker runs over the mesh)")]
    return []
