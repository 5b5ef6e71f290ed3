"""`dicomesh net ...`: this gateway's tunnel keys and the live state of its uplinks.

dicomesh net keys     # public key per uplink tunnel (made on first use), and the
                      # `dicomesh peer add` line other sites run to admit this one
dicomesh net status   # uplinks, health, tunnels, as the running gateway sees them
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.config import Config, ConfigError

Handler = Callable[[argparse.Namespace], int]
# How the root CLI resolves a config from --config/--state-dir (passed in: no import cycle).
LoadConfig = Callable[[argparse.Namespace], Config]


def add_parser(sub: argparse._SubParsersAction, load_config: LoadConfig) -> dict[str, Handler]:
    net = sub.add_parser("net", help="uplinks and WireGuard tunnels of this gateway")
    net.add_argument("--config", type=Path, help="TOML config file")
    net.add_argument("--state-dir", type=Path, help="override state_dir")
    net_sub = net.add_subparsers(dest="net_command", required=True)
    net_sub.add_parser("keys", help="show (and on first use make) the tunnels' public keys")
    status = net_sub.add_parser("status", help="uplinks and tunnels of the running gateway")
    status.add_argument("--json", action="store_true", help="print the raw status")

    def keys(args: argparse.Namespace) -> int:
        return _keys(load_config(args))

    def status_(args: argparse.Namespace) -> int:
        return _status(load_config(args), args.json)

    return {"keys": keys, "status": status_}


def run(handlers: dict[str, Handler], args: argparse.Namespace) -> int:
    try:
        return handlers[args.net_command](args)
    except ConfigError as exc:
        print(f"dicomesh: invalid configuration:\n{exc}", file=sys.stderr)
        return 2


def _keys(cfg: Config) -> int:
    from appliance.net.errors import NetError
    from appliance.net.keys import load_or_create

    net = cfg.net
    if not net.uplinks:
        print("no uplinks configured ([[net.uplinks]]): no tunnels, no keys", file=sys.stderr)
        return 1
    flags = []
    try:
        for i, up in enumerate(net.uplinks):
            pair = load_or_create(Path(cfg.state_dir), up.name)
            endpoint = f"{up.source or '<public address of ' + up.interface + '>'}"
            endpoint += f":{net.wireguard.listen_port + i}"
            print(f"{up.name}\t{pair.public_b64}\t{up.overlay_address or '-'}\t{endpoint}")
            flags.append(f"--key {pair.public_b64} --address {up.overlay_address or '?'}")
            flags.append(f"--endpoint {endpoint}")
    except (OSError, NetError) as exc:
        print(f"dicomesh: {exc}", file=sys.stderr)
        return 1
    print("\nadmit this gateway elsewhere with:")
    print(f"  dicomesh peer add {cfg.mesh.name} --role {cfg.mesh.role} " + " ".join(flags))
    return 0


def _status(cfg: Config, raw: bool) -> int:
    from appliance.control_client import stream_lines

    try:
        answer = next(iter(stream_lines(Path(cfg.state_dir), "/net/status", {})), None)
    except (OSError, RuntimeError) as exc:
        print(f"dicomesh: cannot reach the running gateway's network: {exc}", file=sys.stderr)
        return 1
    if answer is None:
        print("dicomesh: empty answer from the gateway", file=sys.stderr)
        return 1
    if raw:
        print(json.dumps(answer, indent=2))
        return 0
    wg = answer.get("wireguard") or {}
    print(f"WireGuard: {'on, ' + str(wg.get('backend')) if wg.get('enabled') else 'off'}")
    for up in answer.get("uplinks", []):
        rtt = f"{up['rtt_ms']} ms" if up.get("rtt_ms") is not None else "-"
        print(
            f"{up['name']:<10} {up['state']:<9} {up['interface']:<10} src {up['source']} "
            f"via {up['gateway']}  rtt {rtt}  loss {up.get('loss')}  "
            f"table {up['table']} mark {up['fwmark']:#x}"
        )
        if tunnel := up.get("tunnel"):
            print(
                f"  tunnel {tunnel['interface']} {tunnel['overlay_address']} "
                f"port {tunnel['listen_port']} key {tunnel['public_key']} "
                f"peers {tunnel['peers_with_handshake']}/{tunnel['peers']} with handshake"
            )
    return 0
