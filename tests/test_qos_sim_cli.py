"""`dicomesh qos simulate | predict | sweep` as a user runs them, and the study prediction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.qos.predict import predict_study
from appliance.qos.sweep import keep_only, single_link, sweep_cbr, sweep_copies

SCENARIO = """\
duration_s = 30
seed = 1
[[links]]
name = "wan"
preset = "frame-relay-128"
[[flows]]
name = "ecg"
kind = "cbr"
packet_bytes = 1000
interval_ms = 90
path = ["wan"]
[[flows]]
name = "ftp"
kind = "bulk"
path = ["wan"]
start_s = 5
"""

FLOW_KEYS = {"sent", "received", "dropped", "loss_ratio", "throughput_kbps", "delay_ms",
             "jitter_ms"}  # fmt: skip
LINK_KEYS = {"capacity_kbps", "utilisation", "remaining_kbps"}


def dicomesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "qos", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO)
    return path


def test_simulate_json_has_the_contract_keys(scenario: Path) -> None:
    proc = dicomesh("simulate", str(scenario), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["flows"]) == {"ecg", "ftp"} and set(result["links"]) == {"wan"}
    for flow in result["flows"].values():
        assert set(flow) >= FLOW_KEYS
        assert set(flow["delay_ms"]) == {"mean", "p50", "p95", "max"}
        assert "samples" not in flow
    assert set(result["links"]["wan"]) >= LINK_KEYS
    assert result["links"]["wan"]["capacity_kbps"] == 128


def test_simulate_samples_are_send_time_and_delay_or_null(scenario: Path) -> None:
    result = json.loads(dicomesh("simulate", str(scenario), "--json", "--samples").stdout)
    ftp = result["flows"]["ftp"]
    assert len(ftp["samples"]) == ftp["sent"]
    lost = [s for s in ftp["samples"] if s[1] is None]
    assert len(lost) == ftp["dropped"] > 0
    assert all(len(s) == 2 and s[0] >= 5 for s in ftp["samples"])


def test_simulate_prints_tables_and_rejects_bad_scenarios(scenario: Path, tmp_path: Path) -> None:
    proc = dicomesh("simulate", str(scenario))
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[2].split()[:3] == ["flow", "kind", "sent"]
    assert any(line.startswith("wan ") for line in proc.stdout.splitlines())
    bad = tmp_path / "bad.toml"
    bad.write_text(SCENARIO.replace('path = ["wan"]', 'path = ["wna"]', 1))
    proc = dicomesh("simulate", str(bad))
    assert proc.returncode == 2
    assert "flows[0].path[0]: unknown link 'wna' (did you mean 'wan'?)" in proc.stderr


def test_predict_cli() -> None:
    proc = dicomesh("predict", "--study-mb", "100", "--holder", "800", "--holder", "adsl-up",
                    "--downlink", "3000", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["holders_kbps"] == [800, 800] and out["downlink_kbps"] == 3000
    assert out["seconds"] >= out["lower_bound_s"]
    assert dicomesh("predict", "--study-mb", "1", "--holder", "dsl").returncode == 2


def test_sweep_cli_marks_the_combinations_under_one_percent_loss() -> None:
    proc = dicomesh("sweep", "--link", "frame-relay-128", "--sizes", "500,1000",
                    "--intervals", "50,100", "--duration", "60")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("3 of 4 combination(s) keep loss under 1 %")


# -- prediction over the swarm scheduler --------------------------------------------------------


def test_a_study_from_several_holders_approaches_the_bottleneck_bound() -> None:
    one = predict_study(50_000_000, [800])
    four = predict_study(50_000_000, [800] * 4, downlink_kbps=3000)
    assert one.seconds == pytest.approx(one.lower_bound_s, rel=0.03)
    # 4 x 800 > 3000: the downlink is the bottleneck.
    assert four.lower_bound_s == pytest.approx(50e6 / (3000 * 125 * 0.917))
    assert four.lower_bound_s <= four.seconds < 1.05 * four.lower_bound_s
    assert sum(four.path_bytes.values()) == 50_000_000


def test_compression_shrinks_what_travels() -> None:
    raw = predict_study(20_000_000, [800, 800], latency_ms=50)
    packed = predict_study(20_000_000, [800, 800], latency_ms=50, compression=0.5)
    assert packed.wire_bytes == 10_000_000
    assert packed.seconds == pytest.approx(raw.seconds / 2, rel=0.05)


def test_a_slow_holder_serves_its_share() -> None:
    p = predict_study(40_000_000, [2000, 500])
    shares = [b / p.wire_bytes for b in p.path_bytes.values()]
    assert shares[0] == pytest.approx(0.8, abs=0.05)


# -- sweeps -------------------------------------------------------------------------------------


def test_cbr_sweep_rows() -> None:
    scenario = keep_only(single_link("frame-relay-128", duration_s=120), "cbr")
    rows = sweep_cbr(scenario, "cbr", [1000], [50, 90])
    overload, fine = rows
    assert (overload["ok"], fine["ok"]) == (False, True)
    assert fine["remaining_kbps"] == pytest.approx(128 - 8000 / 90, abs=0.1)
    assert overload["loss_ratio"] == pytest.approx(0.2, abs=0.03)


def test_copies_sweep_shares_the_line() -> None:
    scenario = keep_only(single_link("512", duration_s=120), "bulk")
    rows = sweep_copies(scenario, "bulk", [1, 3])
    assert [r["copies"] for r in rows] == [1, 3]
    for row in rows:
        assert row["total_kbps"] == pytest.approx(512 * 1460 / 1500, rel=0.02)
    assert rows[1]["per_copy_mean_kbps"] == pytest.approx(rows[0]["total_kbps"] / 3, rel=0.02)
    with pytest.raises(ValueError, match="no flow 'x'"):
        sweep_copies(scenario, "x", [1])
