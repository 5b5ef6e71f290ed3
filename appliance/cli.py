"""The `dicomesh` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import appliance
from appliance.config import ConfigError, load_config, render_toml

# Without a config file the gateway runs with built-in defaults and keeps its state here
# (relative to the working directory), so `make run` works for any user on a fresh checkout.
DEV_STATE_DIR = Path("var")
CONFIG_IN_STATE_DIR = "dicomesh.toml"  # same name as appliance.app's (cli must stay light)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicomesh", description="dicomesh clinic gateway")
    parser.add_argument("--version", action="version", version=f"dicomesh {appliance.__version__}")
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

    peer = sub.add_parser("peer", help="admit, list or revoke mesh peers")
    peer.add_argument("--config", type=Path, help="TOML config file (for state_dir)")
    peer.add_argument("--state-dir", type=Path, help="override state_dir")
    peer_sub = peer.add_subparsers(dest="peer_command", required=True)
    add = peer_sub.add_parser("add", help="admit a gateway")
    add.add_argument("name")
    add.add_argument(
        "--key",
        action="append",
        required=True,
        help="its WireGuard public key (base64); repeat once per uplink tunnel",
    )
    add.add_argument(
        "--address", action="append", required=True, help="overlay address (one per --key)"
    )
    add.add_argument(
        "--endpoint", action="append", help="its WireGuard endpoint host:port (one per --key)"
    )
    add.add_argument("--role", choices=["clinic", "replica"], default="clinic")
    add.add_argument("--port", type=int, help="its mesh HTTP port (default 7480)")
    add.add_argument(
        "--admin",
        action="store_true",
        help="it may open this gateway's admin page over the VPN (remote administration)",
    )
    peer_sub.add_parser("list", help="list admitted gateways")
    remove = peer_sub.add_parser("remove", help="revoke a gateway")
    remove.add_argument("name")

    fetch = sub.add_parser(
        "fetch", help="pull a study from the mesh (or, with [central], the central PACS) here"
    )
    fetch.add_argument("study", help="Study Instance UID")
    fetch.add_argument("--config", type=Path, help="TOML config file (for state_dir)")
    fetch.add_argument("--state-dir", type=Path, help="override state_dir")

    from appliance.qos import cli as qos_cli

    qos_handlers = qos_cli.add_parser(sub)

    from appliance.net import cli as net_cli

    net_handlers = net_cli.add_parser(sub, lambda a: load_config(a.config, _overrides(a)))

    from appliance.forward import cli as forward_cli

    forward_cli.add_parser(sub)

    from appliance.evict import cli as evict_cli

    evict_cli.add_parser(sub)

    from appliance.firmware import pull_cli

    pull_cli.add_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "forward":
        return forward_cli.run(args, lambda a: load_config(a.config, _overrides(a)))
    if args.command == "evict":
        return evict_cli.run(args, lambda a: load_config(a.config, _overrides(a)))
    if args.command == "update":
        return pull_cli.run(args, _state_dir)
    if args.command == "qos":
        return qos_cli.run(qos_handlers, args)
    if args.command == "net":
        return net_cli.run(net_handlers, args)
    if args.command == "run":
        return _run(args)
    if args.command == "peer":
        return _peer(args)
    if args.command == "fetch":
        return _fetch(args)
    return _config_check(args.file)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    state_dir = args.state_dir or (None if args.config else DEV_STATE_DIR)
    if state_dir is not None:
        overrides["state_dir"] = str(state_dir.resolve())
    for flag, key in (
        ("dicom_port", "dicom.port"),
        ("ae_title", "dicom.ae_title"),
        ("log_level", "log.level"),
    ):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    return overrides


def _run(args: argparse.Namespace) -> int:
    # Without --config, the settings the admin page wrote into the state directory (if any)
    # are the config file: so `make run` keeps what was set on the page across restarts.
    path = args.config
    if path is None:
        in_state = Path(load_config(None, _overrides(args)).state_dir) / CONFIG_IN_STATE_DIR
        path = in_state if in_state.exists() else None
    hardware = _detect_board()
    defaults = hardware.config_defaults() if hardware is not None else None
    try:
        cfg = load_config(path, _overrides(args), defaults)
    except ConfigError as exc:
        print(f"dicomesh: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    # Imported here so `config check` stays light (no pynetdicom, no LMDB).
    from appliance import app, logs

    logs.setup(cfg.log.level)
    return app.run(
        cfg,
        config_path=args.config or Path(cfg.state_dir) / CONFIG_IN_STATE_DIR,
        hardware=hardware,
    )


def _detect_board() -> Any:
    """This machine's board profile and LED (appliance.firmware.board.Hardware), or None.
    DICOMESH_HW_ROOT points detection at another root (a sample /sys tree in tests)."""
    import os

    from appliance.firmware import FirmwareError, board

    try:
        return board.detect(Path(os.environ.get("DICOMESH_HW_ROOT", "/")))
    except FirmwareError as exc:
        print(f"dicomesh: board profiles unusable, running without: {exc}", file=sys.stderr)
        return None


def _config_check(path: Path) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_toml(cfg, mask_secrets=True))
    return 0


def _state_dir(args: argparse.Namespace) -> Path:
    """The state directory the way `run` would resolve it."""
    return Path(load_config(args.config, _overrides(args)).state_dir)


def _peer(args: argparse.Namespace) -> int:
    from appliance.mesh import peers

    try:
        path = _state_dir(args) / peers.PEERS_FILE
        if args.peer_command == "add":
            peer = peers.peer_from_args(
                name=args.name,
                public_key=args.key[0],
                tunnel_keys=args.key[1:] or None,
                addresses=args.address,
                endpoints=args.endpoint,
                role=args.role,
                port=args.port,
                admin=args.admin or None,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            peers.add_peer(path, peer)
            admin = ", admin" if peer.admin else ""
            print(f"admitted {peer.name} ({', '.join(peer.addresses)}, {peer.role}{admin})")
        elif args.peer_command == "remove":
            if not peers.remove_peer(path, args.name):
                print(f"dicomesh: no peer called {args.name!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.name}")
        else:
            for p in peers.read_peers(path):
                admin = "\tadmin" if p.admin else ""
                print(
                    f"{p.name}\t{p.role}\t{','.join(p.addresses)}:{p.port}\t{p.public_key}{admin}"
                )
    except ConfigError as exc:
        print(f"dicomesh: {exc}", file=sys.stderr)
        return 2
    return 0


def _fetch(args: argparse.Namespace) -> int:
    """Ask the running gateway to fetch a study; draw its progress until it is done."""
    from appliance.control_client import stream_lines

    try:
        state_dir = _state_dir(args)
    except ConfigError as exc:
        print(f"dicomesh: {exc}", file=sys.stderr)
        return 2
    last: dict = {}
    try:
        for line in stream_lines(state_dir, "/fetch", {"study": args.study}):
            last = line
            _draw(line)
    except (OSError, RuntimeError) as exc:
        print(f"\ndicomesh: cannot reach the running gateway: {exc}", file=sys.stderr)
        return 1
    print()
    if last.get("error"):
        print(f"dicomesh: fetch failed: {last['error']}", file=sys.stderr)
        return 1
    return 0


def _draw(line: dict) -> None:
    total = line.get("bytes_total") or 0
    done = line.get("bytes_done") or 0
    share = done / total if total else (1.0 if line.get("finished") else 0.0)
    bar = "#" * int(share * 30)
    eta = line.get("eta_s")
    eta_text = f"ETA {eta:5.0f} s" if eta is not None and not line.get("finished") else ""
    peers = " ".join(f"{name}:{b / 1e6:.1f}MB" for name, b in (line.get("peers") or {}).items())
    sys.stdout.write(
        f"\r[{bar:<30}] {share * 100:5.1f}%  {done / 1e6:8.1f}/{total / 1e6:.1f} MB  "
        f"{line.get('instances_done', 0)}/{line.get('instances_total', 0)} instances  "
        f"{eta_text}  {peers}"
    )
    sys.stdout.flush()
