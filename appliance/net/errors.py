"""Errors of the net package."""


class NetError(Exception):
    """Base class for network setup failures (routing, tunnels, probing)."""
