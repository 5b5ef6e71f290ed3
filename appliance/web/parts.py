"""What the web page uses of the running gateway (app.Gateway satisfies it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.dicom.scp import DicomNodeServer
    from appliance.mesh.node import MeshNode
    from appliance.store import Store


class GatewayParts(Protocol):
    """The subsystems as they run; any may be None (off, or failed to start)."""

    cfg: Config
    config_path: Path  # where settings changed on the page are written
    started_at: float  # time.time() at start
    store: Store | None
    mesh: MeshNode | None
    dicom: DicomNodeServer | None
    net: Any  # appliance.net.manager.NetworkManager | None (status() only)
    forwarder: Any  # appliance.forward.forwarder.Forwarder | None (set_destinations)
    evictor: Any  # appliance.evict.evictor.Evictor | None (apply, async_plan, last_report)
    updates: Any  # appliance.firmware.share.UpdatePuller | None (pulls from peers)
