"""The QoS work the page asks for, in a child process: a simulation or a report's plots can
keep a core busy for seconds, which must not take the GIL from the DICOM node and the loop,
and must be stoppable (the parent kills the child at its time limit or at shutdown).

    python -m appliance.web.qos_worker  < {"op": "simulate", "scenario": {...}, "samples": b}
                                        < {"op": "report", "left": {...}, "right": {...},
                                           "titles": [a, b], "sources": [a, b]}

Answers one JSON object on stdout: {"ok": true, "result"|"html": ...} or {"ok": false,
"errors": [...]}.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

NICENESS = 10  # below the gateway's own threads when the box is busy


def handle(request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "simulate":
        from appliance.qos.scenario import ScenarioError, parse_scenario
        from appliance.qos.simulator import simulate

        try:
            scenario = parse_scenario(request.get("scenario"))
        except ScenarioError as exc:
            return {"ok": False, "errors": exc.errors}
        return {"ok": True, "result": simulate(scenario, samples=bool(request.get("samples")))}
    if op == "report":
        from appliance.qos.report import render_html

        html = render_html(
            request["left"], request["right"], titles=tuple(request["titles"]),
            sources=tuple(request["sources"]),
        )  # fmt: skip
        return {"ok": True, "html": html}
    return {"ok": False, "errors": [f"op: unknown {op!r}"]}


def main() -> int:
    os.nice(NICENESS)
    answer = handle(json.load(sys.stdin))
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
