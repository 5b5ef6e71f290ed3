"""Errors of the mesh package."""


class MeshError(Exception):
    """Base class for mesh failures."""


class PeerInputError(MeshError):
    """A peer sent something malformed or oversized; it is dropped and counted."""
