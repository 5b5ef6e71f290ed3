"""Network subsystem: uplinks with policy routing, health and upload shaping; WireGuard
tunnels (one per uplink); socket binding helpers for the mesh. See manager.py."""
