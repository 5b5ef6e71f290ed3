"""`dicomesh qos ...`: each command family registers its own subcommands.

Simulation commands (simulate, sweep, predict) live in `cli_sim.py`; real measurement and
reports (measure, report, compare) in `cli_real.py`. Each module exposes
`register(sub) -> dict[name, handler]` where a handler takes the parsed args and returns the
exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def add_parser(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    from appliance.qos import cli_real, cli_sim

    qos = sub.add_parser("qos", help="measure and simulate the network (QoS of services)")
    qos_sub = qos.add_subparsers(dest="qos_command", required=True)
    handlers: dict[str, Handler] = {}
    handlers.update(cli_sim.register(qos_sub))
    handlers.update(cli_real.register(qos_sub))
    return handlers


def run(handlers: dict[str, Handler], args: argparse.Namespace) -> int:
    return handlers[args.qos_command](args)
