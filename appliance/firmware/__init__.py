"""The appliance around the gateway: first boot, board profiles (hw/), status LED, signed A/B
firmware updates. Nothing here runs on the gateway's event loop: these are short blocking
steps called at start (board, LED) or by their own systemd units (first boot, update)."""

from __future__ import annotations


class FirmwareError(Exception):
    """A firmware step that cannot be done; str() is safe to show to the administrator."""
