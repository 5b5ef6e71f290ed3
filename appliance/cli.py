"""The `dicomesh` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import ConfigError, load_config, render_toml

# Without a config file the gateway runs with built-in defaults and keeps its state here
# (relative to the working directory), so `make run` works for any user on a fresh checkout.
DEV_STATE_DIR = Path("var")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicomesh", description="dicomesh clinic gateway")
    parser.add_argument("--version", action="version", version=f"dicomesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT")
    run.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    run.add_argument("--state-dir", type=Path, help="override state_dir")
    run.add_argument("--dicom-port", type=int, help="override dicom.port")
    run.add_argument("--ae-title", help="override dicom.ae_title")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config file, print the effective one")
    check.add_argument("file", type=Path)

    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    return _config_check(args.file)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    state_dir = args.state_dir or (None if args.config else DEV_STATE_DIR)
    if state_dir is not None:
        overrides["state_dir"] = str(state_dir.resolve())
    if args.dicom_port is not None:
        overrides["dicom.port"] = args.dicom_port
    if args.ae_title is not None:
        overrides["dicom.ae_title"] = args.ae_title
    if args.log_level is not None:
        overrides["log.level"] = args.log_level
    return overrides


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"dicomesh: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    # Imported here so `config check` stays light (no pynetdicom, no LMDB).
    from appliance import app, logs

    logs.setup(cfg.log.level)
    return app.run(cfg)


def _config_check(path: Path) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_toml(cfg, mask_secrets=True))
    return 0
