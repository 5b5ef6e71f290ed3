"""QoS scenario files (appliance.qos.scenario): the contract, presets, all errors at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from appliance.config import ConfigError
from appliance.qos.models import BulkFlow, CbrFlow, LinkModel
from appliance.qos.presets import LINK_PRESETS
from appliance.qos.scenario import ScenarioError, load_scenario, parse_scenario

CONTRACT = """\
duration_s = 120
seed = 1
[[links]]
name = "wan"
capacity_kbps = 128          # 1 kbit = 1000 bit
queue_packets = 50           # drop-tail; or queue_bytes
delay_ms = 100
loss = 0.0
[[flows]]
name = "ecg"
kind = "cbr"                 # cbr | onoff | vbr | bulk | consult
packet_bytes = 1000          # bytes the link transmits per packet
interval_ms = 90
path = ["wan"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(data: dict) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    assert isinstance(info.value, ConfigError)
    return info.value.errors


def test_the_issue_example_loads(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, CONTRACT))
    assert (scenario.duration_s, scenario.seed) == (120.0, 1)
    assert scenario.links == (
        LinkModel(name="wan", capacity_kbps=128.0, queue_packets=50, delay_ms=100.0, loss=0.0),
    )
    assert scenario.flows == (
        CbrFlow(name="ecg", kind="cbr", packet_bytes=1000, interval_ms=90.0, path=["wan"]),
    )


def test_a_preset_fills_in_what_the_link_does_not_set() -> None:
    data = {
        "duration_s": 10,
        "links": [
            {"name": "up", "preset": "adsl-up"},
            {"name": "fr", "preset": "frame-relay-256", "delay_ms": 30, "queue_bytes": "64 kB"},
        ],
        "flows": [{"name": "s", "kind": "bulk", "path": ["up", "fr"], "size_bytes": "1 MB"}],
    }
    s = parse_scenario(data)
    up, fr = s.links
    assert (up.capacity_kbps, up.delay_ms, up.queue_packets) == (800.0, 20.0, 50)
    assert (fr.capacity_kbps, fr.delay_ms) == (256.0, 30.0)
    assert (fr.queue_packets, fr.queue_bytes) == (None, 64_000)  # the user's queue replaces it
    assert s.flows[0] == BulkFlow(name="s", kind="bulk", path=["up", "fr"], size_bytes=1_000_000)


def test_the_presets_of_the_issue_exist() -> None:
    rates = {name: p["capacity_kbps"] for name, p in LINK_PRESETS.items()}
    assert rates["adsl-down"] == 3000 and rates["adsl-up"] == 800
    assert [rates[f"frame-relay-{r}"] for r in (128, 256, 512)] == [128, 256, 512]
    assert {"lan", "umts-up", "umts-down", "4g-up", "4g-down"} <= set(rates)


def test_every_error_is_reported_with_its_key_path() -> None:
    data = {
        "duraton_s": 10,
        "seed": "one",
        "links": [
            {"name": "wan", "capacity_kbps": -1, "queue_packets": 5, "queue_bytes": 100},
            {"name": "up", "preset": "adsl-upp"},
            {"name": "wan", "capacity_kbps": 100, "los": 0.1},
        ],
        "flows": [
            {"name": "ecg", "kind": "cbr", "packet_bytes": 100, "path": ["wna"]},
            {"name": "v", "kind": "vidio", "path": ["wan"]},
            {"name": "b", "kind": "bulk", "path": [], "packet_bytes": 40},
            {"name": "c", "kind": "consult", "path": ["wan"], "request_bytes_max": 5000},
            {"name": "o", "kind": "onoff", "packet_bytes": 240, "interval_ms": 20, "on_ms": 1,
             "off_ms": 1, "shape": 1.0, "path": ["wan"]},
        ],
    }  # fmt: skip
    assert errors_of(data) == [
        "duraton_s: unknown key (did you mean 'duration_s'?)",
        "duration_s: required",
        "seed: expected an integer, got 'one'",
        "links[0].capacity_kbps: must be > 0",
        "links[1].preset: unknown preset 'adsl-upp' (did you mean 'adsl-up'?)",
        "links[2].los: unknown key (did you mean 'loss'?)",
        "flows[0].interval_ms: required",
        "flows[1].kind: expected one of 'cbr', 'onoff', 'vbr', 'bulk', 'consult', got 'vidio'",
        "flows[2].path: must name at least one link",
        "flows[2].packet_bytes: must be > 40 (TCP/IP headers)",
        "flows[3].request_bytes_max: must be >= request_bytes_min",
        "flows[4].shape: must be > 1 (the Pareto mean is infinite otherwise)",
        "links[2].name: duplicate name 'wan'",
    ]


def test_cross_references_are_checked_once_the_parts_load() -> None:
    data = {
        "duration_s": 10,
        "links": [
            {"name": "wan", "capacity_kbps": 128, "queue_packets": 5, "queue_bytes": 100},
            {"name": "lan", "capacity_kbps": 1000},
            {"name": "lan", "capacity_kbps": 1000},
        ],
        "flows": [
            {"name": "a", "kind": "cbr", "packet_bytes": 100, "interval_ms": 20,
             "path": ["lan", "wna"], "start_s": 12},
            {"name": "a", "kind": "bulk", "path": ["lan"], "stop_s": 0},
        ],
    }  # fmt: skip
    assert errors_of(data) == [
        "links[0].queue_bytes: set queue_packets or queue_bytes, not both",
        "flows[1].stop_s: must be > 0",
        "links[2].name: duplicate name 'lan'",
        "flows[1].name: duplicate name 'a'",
        "flows[0].path[1]: unknown link 'wna' (did you mean 'wan'?)",
        "flows[0].start_s: must be before duration_s (10)",
    ]


def test_missing_sections_and_bad_files(tmp_path: Path) -> None:
    assert errors_of({"duration_s": 1}) == [
        "links: required (at least one [[links]] table)",
        "flows: required (at least one [[flows]] table)",
    ]
    assert errors_of({"duration_s": 1, "links": "wan", "flows": [3]}) == [
        "links: expected an array of tables ([[links]]), got str",
        "flows[0]: expected a table, got int",
    ]
    with pytest.raises(ScenarioError, match=r"scenario\.toml: Invalid value"):
        load_scenario(write(tmp_path, "duration_s = \n"))
    with pytest.raises(ScenarioError, match="No such file"):
        load_scenario(tmp_path / "missing.toml")
