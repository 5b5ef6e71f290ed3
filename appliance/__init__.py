"""dicomesh: clinic gateway firmware (DICOM node, study mesh, network evaluation)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dicomesh")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"
