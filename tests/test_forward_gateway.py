"""Store-and-forward through the whole gateway: storescu (DCMTK) sends to a running gateway
whose `[forward]` rule targets a pynetdicom C-STORE SCP; the CLI lists and steers the queue;
a kill -9 with jobs pending loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from dcmtk import storescu
from forward_kit import destination, received, wait_until
from gateway import DICOMESH, REPO, Gateway
from procs import free_port
from studygen import SeriesInfo

N = 4


def forward_cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DICOMESH, "forward", "--config", str(gw.config_path), *args],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def jobs(gw: Gateway) -> list[dict]:
    out = forward_cli(gw, "list", "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_forwarding_survives_a_down_destination_and_a_kill9(
    gateway_factory: Callable[..., Gateway], ct_series: SeriesInfo, tmp_path: Path
) -> None:
    port = free_port()
    out = tmp_path / "rx"
    gw = gateway_factory(
        dicom={"nodes": [{"ae_title": "DEST", "host": "127.0.0.1", "port": port}]},
        forward={
            "rules": [{"name": "ct", "destinations": ["DEST"], "modality": ["CT"]}],
            "backoff_base_s": 0.2, "backoff_max_s": 0.8, "poll_s": 0.1, "max_tries": 1000,
        },
    )  # fmt: skip
    files = ct_series.paths[:N]
    sent = storescu(gw.host, gw.port, gw.ae_title, files)
    assert sent.returncode == 0 and [s for _p, s in sent.results] == [0] * N

    # Destination down: every job is retried with the reason recorded, none is dropped.
    wait_until(lambda: all(j["tries"] >= 2 for j in jobs(gw)) and len(jobs(gw)) == N, 30,
               "jobs retried")  # fmt: skip
    listed = jobs(gw)
    assert {j["sop_instance_uid"] for j in listed} == set(ct_series.sop_uids[:N])
    assert all("connection refused" in j["reason"] for j in listed)
    assert all(j["state"] in ("queued", "running") for j in listed)

    held = listed[0]["id"]
    for _ in range(50):  # a running try refuses "hold" (409): ask again between tries
        hold = forward_cli(gw, "hold", held)
        if hold.returncode == 0 or "when running" not in hold.stderr:
            break
    assert hold.returncode == 0 and hold.stdout.strip() == f"{held}: held", hold.stderr
    bad = forward_cli(gw, "release", "no/such/job")
    assert bad.returncode == 1 and "no job" in bad.stderr

    gw.kill9()  # jobs pending, one held: all must survive in the store
    gw.start()
    with destination(port, out):
        others = set(ct_series.sop_uids[:N]) - {listed[0]["sop_instance_uid"]}
        wait_until(lambda: set(received(out)) == others, 30, "unheld jobs forwarded")
        by_id = {j["id"]: j["state"] for j in jobs(gw)}
        assert by_id.pop(held) == "held"
        assert set(by_id.values()) == {"done"}
        assert forward_cli(gw, "release", held).returncode == 0
        wait_until(lambda: set(received(out)) == set(ct_series.sop_uids[:N]), 30, "released")
    assert sorted(received(out)) == sorted(ct_series.sop_uids[:N])  # each exactly once
    done = forward_cli(gw, "list", "--state", "done")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == N
