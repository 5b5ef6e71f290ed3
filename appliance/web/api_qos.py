"""API: QoS from the page (`/api/qos/...`): simulate a posted scenario, measure the path
to an admitted peer, list the runs, and the HTML report comparing two of them
(appliance.qos: scenario, simulator, measure, report)."""

from __future__ import annotations

import asyncio
import tomllib
from typing import TYPE_CHECKING, Any

from aiohttp import web

from appliance.qos.flows import CbrFlow, FlowSpecError, ip_version, parse_flows, probe_payload
from appliance.qos.presets import preset_names
from appliance.qos.scenario import ScenarioError, parse_scenario
from appliance.web import status
from appliance.web.qos_runs import (
    REPORT_TIMEOUT_S,
    SIMULATE_TIMEOUT_S,
    QosError,
    run_worker,
)
from appliance.web.replies import body_of, error, reply

if TYPE_CHECKING:
    from appliance.web.api import Api

MAX_MEASURE_S = 60.0  # a longer campaign belongs to `dicomesh qos measure`
MEASURE_SLACK_S = 30.0  # loss timeout, record fetches and bulk flows after the sending time
# The report page embeds its plots as data: images and its own <style>; it runs no script.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


def _scenario_data(body: dict[str, Any]) -> dict[str, Any]:
    """The scenario as TOML-like data, from `toml` (text) or `scenario` (an object)."""
    text, data = body.get("toml"), body.get("scenario")
    if (text is None) == (data is None):
        raise QosError(
            "invalid scenario",
            ["toml: give the scenario as TOML text (or `scenario` as an object), one of the two"],
        )
    if text is not None:
        if not isinstance(text, str):
            raise QosError("invalid scenario", ["toml: must be a string"])
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise QosError("invalid scenario", [f"toml: {exc}"]) from None
    if not isinstance(data, dict):
        raise QosError("invalid scenario", ["scenario: must be an object"])
    return data


class QosRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/qos/runs", self.list)
        app.router.add_get("/api/qos/runs/{id}", self.get)
        app.router.add_post("/api/qos/simulate", self.simulate)
        app.router.add_post("/api/qos/measure", self.measure)
        app.router.add_get("/api/qos/report", self.report)

    async def list(self, request: web.Request) -> web.Response:
        runs = self.api.qos_runs
        return reply({"runs": [r.summary() for r in reversed(runs.runs())],
                      "busy": runs.busy, "presets": preset_names()})  # fmt: skip

    async def get(self, request: web.Request) -> web.Response:
        run = self.api.qos_runs.get(request.match_info["id"])
        if run is None:
            return error(404, f"no QoS run {request.match_info['id']!r}")
        return reply({**run.summary(), "result": run.result})

    def _start(self, kind: str, label: str, work: Any) -> web.Response:
        try:
            run = self.api.qos_runs.start(kind, label, work)
        except QosError as exc:
            return error(409, str(exc))
        return reply(run.summary(), 202)

    async def simulate(self, request: web.Request) -> web.Response:
        body = await body_of(request)
        try:
            data = _scenario_data(body)
            parse_scenario(data)  # every error now, with its key path; the worker re-checks
        except ScenarioError as exc:
            return error(400, "invalid scenario", errors=[f"scenario.{e}" for e in exc.errors])
        except QosError as exc:
            return error(400, str(exc), errors=exc.errors)
        samples = bool(body.get("samples", False))
        label = str(body.get("label") or "scenario")[:64]

        async def work() -> dict[str, Any]:
            answer = await run_worker({"op": "simulate", "scenario": data, "samples": samples},
                                      SIMULATE_TIMEOUT_S)  # fmt: skip
            return answer["result"]

        return self._start("simulate", label, work)

    async def measure(self, request: web.Request) -> web.Response:
        from appliance.qos.measure import measure

        body = await body_of(request)
        errors: list[str] = []
        listed = await self.api._executor(status.admitted, self.api.parts)
        name = body.get("peer")
        peer = next((p for p in listed if p.name == name), None)
        if peer is None:
            errors.append(f"peer: {name!r} is not an admitted peer")
        duration = body.get("duration_s", 10)
        if (
            isinstance(duration, bool)
            or not isinstance(duration, int | float)
            or not (0 < duration <= MAX_MEASURE_S)
        ):
            errors.append(f"duration_s: a number of seconds, 0 < duration_s <= {MAX_MEASURE_S:g}")
        cfg = self.api.parts.cfg
        port = body.get("port", cfg.qos.probe_port)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            errors.append("port: the peer's qos.probe_port, 1-65535")
        specs = body.get("flows", ["cbr:200:20"])
        flows: list[Any] = []
        if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
            errors.append('flows: a list like ["cbr:200:20", "bulk:5"]')
        else:
            try:
                flows = parse_flows(specs)
                # Sizes checked for the peer's IP version; with no valid peer, for IPv4 (the
                # smallest headers): a size too small there is too small for any path.
                version = ip_version(peer.addresses[0]) if peer is not None else 4
                for flow in flows:
                    if isinstance(flow, CbrFlow):
                        probe_payload(flow.packet_bytes, version)
            except FlowSpecError as exc:
                errors.append(f"flows: {exc}")
        if errors:
            return error(400, "invalid measurement", errors=errors)
        assert peer is not None
        address, bind = peer.addresses[0], cfg.mesh.address
        link = f"{cfg.mesh.name}->{peer.name}"

        async def work() -> dict[str, Any]:
            # The probes leave from our overlay address: the peer's responder admits us by it.
            return await asyncio.wait_for(
                measure(address, flows, duration_s=float(duration), port=port, bind=bind,
                        link=link),
                float(duration) + MEASURE_SLACK_S,
            )  # fmt: skip

        return self._start("measure", f"{peer.name} ({address})", work)

    async def report(self, request: web.Request) -> web.Response:
        """Two finished runs side by side (left - right), as the CLI's `qos report`."""
        runs = []
        for side in ("left", "right"):
            run = self.api.qos_runs.get(request.query.get(side, ""))
            if run is None or run.result is None:
                return error(400, f"{side}: the id of a finished QoS run")
            runs.append(run)
        left, right = runs
        # The report reads `links` as a table; results always have one, keep it safe.
        sides = [{**r.result, "links": r.result.get("links") or {}} for r in runs]  # type: ignore[union-attr]
        try:
            answer = await run_worker({
                "op": "report", "left": sides[0], "right": sides[1],
                "titles": [f"{left.id} {left.kind}", f"{right.id} {right.kind}"],
                "sources": [left.label, right.label],
            }, REPORT_TIMEOUT_S)  # fmt: skip
        except QosError as exc:
            return error(500, f"report: {exc}")
        response = web.Response(text=answer["html"], content_type="text/html")
        response.headers["Content-Security-Policy"] = REPORT_CSP
        return response
