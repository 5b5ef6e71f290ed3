"""QoS runs started from the page: a simulation (in a child process, qos_worker.py) or a
measurement toward a peer (appliance.qos.measure, asyncio on the loop), one at a time, the
last few kept with their results for the report."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_KEPT = 20
SIMULATE_TIMEOUT_S = 120.0  # a scenario that needs longer is run with the CLI
REPORT_TIMEOUT_S = 60.0


class QosError(Exception):
    """A run that cannot start or a worker that failed; `errors` name fields when known."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


@dataclass
class QosRun:
    id: str
    kind: str  # simulate | measure
    label: str
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    errors: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None

    @property
    def state(self) -> str:
        if self.finished_at is None:
            return "running"
        return "failed" if self.error else "done"

    def summary(self) -> dict[str, Any]:
        """The run without its per-packet samples: what the run list shows."""
        flows = {}
        for name, f in ((self.result or {}).get("flows") or {}).items():
            delay = f.get("delay_ms") or {}
            flows[name] = {
                "kind": f.get("kind"), "sent": f.get("sent"), "received": f.get("received"),
                "loss_ratio": f.get("loss_ratio"), "throughput_kbps": f.get("throughput_kbps"),
                "delay_mean_ms": delay.get("mean"), "delay_p95_ms": delay.get("p95"),
                "jitter_ms": f.get("jitter_ms"),
            }  # fmt: skip
        links = {
            name: {k: link.get(k) for k in ("capacity_kbps", "utilisation", "remaining_kbps")}
            for name, link in ((self.result or {}).get("links") or {}).items()
        }
        return {
            "id": self.id, "kind": self.kind, "label": self.label, "state": self.state,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "error": self.error, "errors": self.errors, "flows": flows, "links": links,
        }  # fmt: skip


async def run_worker(request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The worker's answer to `request`; killed (QosError) after `timeout_s`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "appliance.web.qos_worker",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(request).encode()), timeout_s)
    except TimeoutError:
        raise QosError(f"took longer than {timeout_s:.0f} s and was stopped") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await asyncio.shield(proc.wait())
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise QosError(f"worker failed ({proc.returncode}): {tail[0][:300]}")
    answer = json.loads(out)
    if not answer.get("ok"):
        raise QosError("invalid scenario", answer.get("errors"))
    return answer


class QosRuns:
    def __init__(self) -> None:
        self._runs: OrderedDict[str, QosRun] = OrderedDict()
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, kind: str, label: str, work: Callable[[], Awaitable[dict[str, Any]]]) -> QosRun:
        """Start `work()` (returning a result dict) as a run; QosError while one runs."""
        if self.busy:
            raise QosError("a QoS run is in progress; one at a time")
        run = QosRun(f"q{next(self._ids)}", kind, label)
        self._runs[run.id] = run
        while len(self._runs) > MAX_KEPT:
            self._runs.popitem(last=False)
        self._task = asyncio.create_task(self._run(run, work), name=f"qos-{run.id}")
        log.info("qos %s: %s %s started", run.id, kind, label)
        return run

    async def _run(self, run: QosRun, work: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        try:
            run.result = await work()
        except QosError as exc:
            run.error, run.errors = str(exc), exc.errors
        except TimeoutError:
            run.error = "no result in time (the peer or its responder stopped answering)"
        except asyncio.CancelledError:
            run.error = "stopped"
            raise
        except Exception as exc:  # e.g. MeasureError: shown on the page, the loop goes on
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            run.finished_at = time.time()
            log.info("qos %s: %s", run.id, run.error or "done")

    def get(self, run_id: str) -> QosRun | None:
        return self._runs.get(run_id)

    def runs(self) -> list[QosRun]:
        return list(self._runs.values())

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
