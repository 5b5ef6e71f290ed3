"""`dicomesh evict`: the running gateway's cache eviction (over the control socket).

dicomesh evict            # dry run: what would be evicted now and why, what stays and why
dicomesh evict --now      # evict now (whatever `[evict] enabled` says), then show the result
dicomesh evict --json     # the same as one JSON object
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.config import Config, ConfigError

LoadConfig = Callable[[argparse.Namespace], Config]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evict", help="cache eviction of the running gateway (dry run by default)")
    p.add_argument("--config", type=Path, help="TOML config file (for state_dir)")
    p.add_argument("--state-dir", type=Path, help="override state_dir")
    p.add_argument("--now", action="store_true", help="evict now instead of a dry run")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace, load_config: LoadConfig) -> int:
    from appliance.control_client import stream_lines

    try:
        state_dir = Path(load_config(args).state_dir)
    except ConfigError as exc:
        print(f"dicomesh: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    route = "/evict/run" if args.now else "/evict/plan"
    try:
        answer = next(iter(stream_lines(state_dir, route, {})))
    except RuntimeError as exc:
        print(f"dicomesh: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dicomesh: cannot reach the running gateway: {exc}", file=sys.stderr)
        return 1
    text = answer.pop("text", "")
    print(json.dumps(answer) if args.json else text)
    return 0
