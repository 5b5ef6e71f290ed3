"""QoS scenario files: TOML in, a validated Scenario out, every error reported with its key path.

    duration_s = 120
    seed = 1
    [[links]]
    name = "wan"
    capacity_kbps = 128          # 1 kbit = 1000 bit
    queue_packets = 50           # drop-tail; or queue_bytes (default 50 packets)
    delay_ms = 100
    loss = 0.0
    [[links]]
    name = "up"
    preset = "adsl-up"           # presets.py; keys given here override the preset's
    [[flows]]
    name = "ecg"
    kind = "cbr"                 # cbr | onoff | vbr | bulk | consult
    packet_bytes = 1000          # bytes the link transmits per packet
    interval_ms = 90
    path = ["wan"]

The keys of each flow kind are those of its model in models.py.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.config import ConfigError
from appliance.qos.models import FLOW_KINDS, LinkModel, Scenario
from appliance.qos.presets import link_preset, preset_names
from appliance.schema import load

_TOP_KEYS = ("duration_s", "seed", "links", "flows")
_QUEUE_KEYS = ("queue_packets", "queue_bytes")


class ScenarioError(ConfigError):
    """An invalid scenario; .errors lists every problem as "<key path>: <message>"."""


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario TOML file; raise ScenarioError listing every error."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ScenarioError([f"{path}: {exc.strerror or exc}"]) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError([f"{path}: {exc}"]) from exc
    return parse_scenario(data)


def parse_scenario(data: Mapping[str, Any]) -> Scenario:
    """Validate a scenario given as a TOML-like dict; raise ScenarioError listing every error."""
    errors: list[str] = []
    if not isinstance(data, Mapping):
        raise ScenarioError([f"(root): expected a table, got {type(data).__name__}"])
    for key in data:
        if key not in _TOP_KEYS:
            errors.append(f"{key}: unknown key{_hint(str(key), _TOP_KEYS)}")
    duration = _number(data, "duration_s", errors, required=True)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        errors.append(f"seed: expected an integer, got {seed!r}")
    raw_links, raw_flows = _tables(data, "links", errors), _tables(data, "flows", errors)
    links = [_link(raw, f"links[{i}]", errors) for i, raw in enumerate(raw_links)]
    flows = [_flow(raw, f"flows[{i}]", errors) for i, raw in enumerate(raw_flows)]
    # Names come from the raw tables, so a link with a bad value is still known by its name.
    link_names = _unique("links", raw_links, errors)
    _unique("flows", raw_flows, errors)
    for i, flow in enumerate(flows):
        if flow is None:
            continue
        for j, name in enumerate(flow.path):
            if name not in link_names:
                hint = _hint(name, link_names)
                errors.append(f"flows[{i}].path[{j}]: unknown link {name!r}{hint}")
        if duration is not None and flow.start_s >= duration:
            errors.append(f"flows[{i}].start_s: must be before duration_s ({duration:g})")
    if errors:
        raise ScenarioError(errors)
    assert duration is not None  # an error otherwise
    return Scenario(duration, seed, tuple(links), tuple(flows))  # type: ignore[arg-type]


def _hint(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _number(data: Mapping[str, Any], key: str, errors: list[str], required: bool) -> float | None:
    value = data.get(key)
    if value is None:
        if required:
            errors.append(f"{key}: required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        errors.append(f"{key}: expected a number > 0, got {value!r}")
        return None
    return float(value)


def _tables(data: Mapping[str, Any], key: str, errors: list[str]) -> list[Any]:
    value = data.get(key)
    if value is None or value == []:
        errors.append(f"{key}: required (at least one [[{key}]] table)")
        return []
    if not isinstance(value, list):
        errors.append(f"{key}: expected an array of tables ([[{key}]]), got {type(value).__name__}")
        return []
    return value


def _unique(section: str, tables: list[Any], errors: list[str]) -> list[str]:
    seen: list[str] = []
    for i, table in enumerate(tables):
        name = table.get("name") if isinstance(table, Mapping) else None
        if not isinstance(name, str):
            continue  # reported by the table's own validation
        if name in seen:
            errors.append(f"{section}[{i}].name: duplicate name {name!r}")
        seen.append(name)
    return seen


def _load(cls: type, raw: Any, path: str, errors: list[str]) -> Any:
    try:
        return load(cls, raw, path)
    except ConfigError as exc:
        errors.extend(exc.errors)
        return None


def _link(raw: Any, path: str, errors: list[str]) -> LinkModel | None:
    if not isinstance(raw, Mapping):
        errors.append(f"{path}: expected a table, got {type(raw).__name__}")
        return None
    name = raw.get("preset")
    if name is not None:
        preset = link_preset(name) if isinstance(name, str) else None
        if preset is None:
            errors.append(
                f"{path}.preset: unknown preset {name!r}{_hint(str(name), preset_names())}"
            )
            return None
        if any(key in raw for key in _QUEUE_KEYS):  # the user's queue replaces the preset's
            preset = {k: v for k, v in preset.items() if k not in _QUEUE_KEYS}
        raw = preset | dict(raw)
    return _load(LinkModel, raw, path, errors)


def _flow(raw: Any, path: str, errors: list[str]) -> Any:
    if not isinstance(raw, Mapping):
        errors.append(f"{path}: expected a table, got {type(raw).__name__}")
        return None
    kind = raw.get("kind")
    cls = FLOW_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        names = ", ".join(repr(k) for k in FLOW_KINDS)
        hint = _hint(kind, FLOW_KINDS) if isinstance(kind, str) else ""
        what = "required" if kind is None else f"expected one of {names}, got {kind!r}{hint}"
        errors.append(f"{path}.kind: {what}")
        return None
    return _load(cls, raw, path, errors)
