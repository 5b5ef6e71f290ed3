"""The root config: one TOML file, one table per subsystem, loaded and validated at once.

Keys (each subsystem owns its section's schema; see `schema.describe(Config)` for all):

    state_dir = "/var/lib/dicomesh"
    [dicom]
    ae_title = "DICOMESH"        # 1-16 chars, PS3.5 AE rules
    port = 11112
    allowed_calling = []         # empty = accept any calling AE title
    [[dicom.nodes]]              # known remote nodes (C-MOVE destinations, forwarding targets)
    ae_title = "WS1"
    host = "127.0.0.1"
    port = 11113
    [store]
    max_bytes = 0                # 0 = no limit besides the disk
    [central]                    # the central PACS (replicas talk to it, clinics via them)
    enabled = true
    ae_title = "PACS"
    host = "10.0.0.5"
    port = 104
    [[forward.rules]]            # store-and-forward: what arrives by C-STORE and matches
    name = "ct-to-ws1"
    destinations = ["WS1"]       # [[dicom.nodes]] AE titles, "peer:NAME", "central"
    modality = ["CT"]

Overrides (e.g. from the command line) use dotted keys ("dicom.port") and are merged over
the file before validation, so they are checked like everything else.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w

from appliance.central.config import CentralConfig, check_mesh
from appliance.dicom.config import DicomConfig
from appliance.evict.config import EvictConfig, check_limits
from appliance.forward.config import ForwardConfig, check_destinations
from appliance.mesh.config import MeshConfig
from appliance.net.config import NetConfig
from appliance.qos.config import QosConfig
from appliance.schema import ConfigError, absolute_path, dump, load, setting
from appliance.store.config import StoreConfig
from appliance.web.config import WebConfig

__all__ = ["Config", "ConfigError", "LogConfig", "load_config", "render_toml"]


@dataclass(frozen=True)
class LogConfig:
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = setting("info", doc="lowest level logged")


@dataclass(frozen=True)
class Config:
    """The whole appliance configuration."""

    state_dir: Path = setting(
        Path("/var/lib/dicomesh"), check=absolute_path, doc="where all persistent state lives"
    )
    log: LogConfig = setting(default_factory=LogConfig, doc="logging")
    dicom: DicomConfig = setting(default_factory=DicomConfig, doc="the DICOM node")
    store: StoreConfig = setting(default_factory=StoreConfig, doc="the chunk store")
    mesh: MeshConfig = setting(default_factory=MeshConfig, doc="the study mesh")
    net: NetConfig = setting(default_factory=NetConfig, doc="uplinks, routing and WireGuard")
    qos: QosConfig = setting(default_factory=QosConfig, doc="the QoS probe responder")
    web: WebConfig = setting(default_factory=WebConfig, doc="the local admin page")
    forward: ForwardConfig = setting(
        default_factory=ForwardConfig, doc="store-and-forward rules and retry schedule"
    )
    evict: EvictConfig = setting(default_factory=EvictConfig, doc="cache eviction (replicas)")
    central: CentralConfig = setting(
        default_factory=CentralConfig, doc="the central PACS and who talks to it"
    )

    def validate(self) -> list[tuple[str, str]]:
        """Rules across sections: forwarding destinations must be reachable (known DICOM
        nodes; the mesh for peers; [central] for the central PACS); the
        eviction limits must fit the store's; the central PACS is reached over the mesh."""
        return (
            check_destinations(
                self.forward,
                [n.ae_title for n in self.dicom.nodes],
                mesh_enabled=self.mesh.enabled,
                central_enabled=self.central.enabled,
            )
            + check_limits(self.evict, self.store)
            + check_mesh(self.central, self.mesh.enabled)
        )


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Merge dotted-key overrides into `data` in place (list items are not addressable)."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        table = data
        for part in parents:
            child = table.get(part)
            if not isinstance(child, dict):
                # A scalar in the way is replaced; validation then names the real problem.
                child = table[part] = {}
            table = child
        if isinstance(value, Mapping) and isinstance(table.get(leaf), dict):
            _apply_overrides(table[leaf], value)
        else:
            table[leaf] = copy.deepcopy(value)  # later overrides must not edit the caller's


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Config:
    """Load `path` (None = built-in defaults) with `overrides` on top; raise ConfigError.
    `defaults` (the board profile's nested tables) lie under the file: the file wins."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError([f"{path}: {exc.strerror or exc}"]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path}: {exc}"]) from exc
    if defaults:
        base = copy.deepcopy(dict(defaults))
        _apply_overrides(base, data)
        data = base
    _apply_overrides(data, overrides or {})
    return load(Config, data)


def render_toml(cfg: Config, *, mask_secrets: bool = True) -> str:
    """`cfg` as TOML text that `load_config` reads back to an equal Config (unless masked)."""
    return tomli_w.dumps(dump(cfg, mask_secrets=mask_secrets))
