"""Logging policy: one stream handler, levels per library, never a patient attribute."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup(level: str) -> None:
    """Configure the root logger for the daemon (journald adds timestamps itself)."""
    handler = logging.StreamHandler(sys.stderr)
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt if under_journald else "%(asctime)s " + fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs C-FIND identifiers and dataset dumps (patient names, IDs, birth dates)
    # at INFO and DEBUG; its warnings and errors carry none. Keep it at WARNING whatever our
    # own level is.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom warns per odd element of what modalities send; we store the bytes as received.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
