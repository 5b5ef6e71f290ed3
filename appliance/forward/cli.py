"""`dicomesh forward ...`: the running gateway's forwarding queue (over the control socket).

dicomesh forward list [--state failed]   # jobs: id, state, destination (kind:target), tries,
                                         # next try, last reason
dicomesh forward retry|hold|release|cancel JOB_ID
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from appliance.config import Config, ConfigError

LoadConfig = Callable[[argparse.Namespace], Config]
STATES = ("waiting", "queued", "running", "held", "done", "failed", "cancelled")
ACTIONS = ("retry", "hold", "release", "cancel")  # same as appliance.forward.control


def add_parser(sub: argparse._SubParsersAction) -> None:
    fwd = sub.add_parser("forward", help="the store-and-forward queue of the running gateway")
    fwd.add_argument("--config", type=Path, help="TOML config file (for state_dir)")
    fwd.add_argument("--state-dir", type=Path, help="override state_dir")
    fwd_sub = fwd.add_subparsers(dest="forward_command", required=True)
    lst = fwd_sub.add_parser("list", help="list forwarding jobs")
    lst.add_argument("--state", choices=STATES, help="only jobs in this state")
    lst.add_argument("--json", action="store_true", help="one JSON object per job")
    for name in ACTIONS:
        p = fwd_sub.add_parser(name, help=f"{name} a job")
        p.add_argument("job", help="job id as `forward list` shows it")


def run(args: argparse.Namespace, load_config: LoadConfig) -> int:
    from appliance.control_client import stream_lines

    try:
        state_dir = Path(load_config(args).state_dir)
    except ConfigError as exc:
        print(f"dicomesh: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    try:
        if args.forward_command == "list":
            answer = next(iter(stream_lines(state_dir, "/forward/jobs", {"state": args.state})))
            for job in answer["jobs"]:
                print(json.dumps(job) if args.json else _row(job))
            return 0
        body = {"action": args.forward_command, "id": args.job}
        answer = next(iter(stream_lines(state_dir, "/forward/action", body)))
        job = answer["job"]
        print(f"{job['id']}: {job['state']}")
        return 0
    except RuntimeError as exc:
        print(f"dicomesh: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dicomesh: cannot reach the running gateway: {exc}", file=sys.stderr)
        return 1


def _row(job: dict) -> str:
    wait = job["not_before"] - time.time()
    due = f"in {wait:.0f} s" if job["state"] in ("queued", "waiting") and wait > 0 else "-"
    kind = job.get("kind", "dicom")
    target = job.get("target", job.get("destination", ""))
    to = f"{kind}:{target}" if target else kind  # dicom:WS1, peer:replica-1, central
    return "\t".join(
        [job["id"], job["state"], to, f"tries={job['tries']}", due, job.get("reason") or ""]
    )
