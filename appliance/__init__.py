"""dicomesh: clinic gateway firmware (DICOM node, study mesh, network evaluation)."""

from __future__ import annotations

from functools import cache


@cache
def _version() -> str:
    # importlib.metadata costs ~30 ms at import: looked up only when someone asks, so that
    # short-lived commands (`dicomesh fetch`, `peer list`) start fast.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dicomesh")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0.0.0+source"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'appliance' has no attribute {name!r}")
