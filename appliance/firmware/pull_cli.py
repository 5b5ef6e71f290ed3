"""`dicomesh update pull PEER [--force]`: the running gateway pulls the update bundle an
admitted peer offers (appliance/firmware/share.py), verifies it and queues it for
dicomesh-update.service. Exit codes: 0 queued, 1 refused or failed, 2 bad configuration.

Stdlib only at import (a short-lived command): the work is done by the gateway, reached
over its control socket."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    update = sub.add_parser("update", help="firmware updates from peers")
    update.add_argument("--config", type=Path, help="TOML config file (for state_dir)")
    update.add_argument("--state-dir", type=Path, help="override state_dir")
    update_sub = update.add_subparsers(dest="update_command", required=True)
    pull = update_sub.add_parser(
        "pull", help="fetch the signed bundle an admitted peer runs, if newer, and queue it"
    )
    pull.add_argument("peer", help="the peer's name (as in `dicomesh peer list`)")
    pull.add_argument("--force", action="store_true", help="also take an older or the same version")


def run(args: argparse.Namespace, state_dir: Callable[[argparse.Namespace], Path]) -> int:
    from appliance.config import ConfigError
    from appliance.control_client import stream_lines

    try:
        where = state_dir(args)
    except ConfigError as exc:
        print(f"dicomesh: {exc}", file=sys.stderr)
        return 2
    last: dict = {}
    try:
        for line in stream_lines(where, "/update/pull", {"peer": args.peer, "force": args.force}):
            last = line
            size = line.get("size") or 0
            share = f"{100 * line['received'] / size:5.1f}%" if size else ""
            sys.stdout.write(
                f"\r{line['peer']}: version {line['version']}  "
                f"{line['received'] / 1e6:8.1f} MB {share}"
            )
            sys.stdout.flush()
    except RuntimeError as exc:
        print(f"\ndicomesh: update pull refused: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"\ndicomesh: cannot reach the running gateway: {exc}", file=sys.stderr)
        return 1
    print()
    if last.get("error") or not last.get("queued"):
        print(f"dicomesh: update pull failed: {last.get('error')}", file=sys.stderr)
        return 1
    print(f"version {last['version']} verified and queued for installation")
    return 0
