"""The `[forward]` config section: routing rules, quiet period, retry schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.schema import positive, setting


@dataclass(frozen=True)
class ForwardRule:
    """Send what matches to `destinations` (AE titles of `[dicom] nodes`)."""

    name: str = setting(doc="rule name, shown with its jobs")
    destinations: list[str] = setting(doc="AE titles of known DICOM nodes to send to")
    level: Literal["instance", "study"] = setting(
        "instance", doc='"instance": each instance at once; "study": the study once stable'
    )
    calling_ae: list[str] = setting(
        default_factory=list, doc="match these calling AE titles (empty = any)"
    )
    modality: list[str] = setting(default_factory=list, doc="match these modalities (empty = any)")
    attributes: list[str] = setting(
        default_factory=list, doc='match indexed attributes exactly, "Keyword=value" each'
    )


@dataclass(frozen=True)
class ForwardConfig:
    """Rules and the retry schedule of the forwarding queue."""

    rules: list[ForwardRule] = setting(default_factory=list, doc="routing rules, all applied")
    quiet_period_s: float = setting(
        60.0, check=positive, doc="a study is stable after this many seconds without new instances"
    )
    max_tries: int = setting(10, check=positive, doc='tries before a job is "failed"')
    backoff_base_s: float = setting(5.0, check=positive, doc="delay after the first failure")
    backoff_max_s: float = setting(3600.0, check=positive, doc="cap on the retry delay")
    poll_s: float = setting(1.0, check=positive, doc="worker wake-up interval when idle")

    def validate(self) -> list[tuple[str, str]]:
        """Cross-field errors as (relative key, message): duplicate rule names (job ids are
        keyed by rule name), bad attribute criteria, backoff cap below its base."""
        errors: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                errors.append((f"rules[{i}].name", f"duplicate rule name {rule.name!r}"))
            seen.add(rule.name)
            if "\x1f" in rule.name:
                errors.append((f"rules[{i}].name", "control characters are not allowed"))
            for j, item in enumerate(rule.attributes):
                if "=" not in item or not item.partition("=")[0].strip():
                    errors.append((f"rules[{i}].attributes[{j}]", 'expected "Keyword=value"'))
        if self.backoff_max_s < self.backoff_base_s:
            errors.append(("backoff_max_s", "must be >= backoff_base_s"))
        return errors


def check_destinations(forward: ForwardConfig, node_titles: list[str]) -> list[tuple[str, str]]:
    """Rule destinations that are not known nodes, as (key from the root, message); for the
    root Config's validate (it sees both `[forward]` and `[dicom] nodes`)."""
    known = {t.strip() for t in node_titles}
    return [
        (f"forward.rules[{i}].destinations[{j}]", f"{d!r} is not in [[dicom.nodes]]")
        for i, rule in enumerate(forward.rules)
        for j, d in enumerate(rule.destinations)
        if d.strip() not in known
    ]
