"""The `[forward]` config section: routing rules, quiet period, retry schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.mesh.config import peer_name
from appliance.schema import positive, setting

# Destination syntax in rules: "AE" or "dicom:AE" (a [[dicom.nodes]] entry), "peer:NAME" (an
# admitted mesh gateway asked to fetch the study), "central" (the central PACS, via a replica).
DICOM, PEER, CENTRAL = "dicom", "peer", "central"


def destination_kind(destination: str) -> tuple[str, str]:
    """(kind, target) of a rule destination: ("dicom", AE), ("peer", name), ("central", "")."""
    d = destination.strip()
    if d == CENTRAL:
        return CENTRAL, ""
    kind, sep, target = d.partition(":")
    if sep and kind in (DICOM, PEER):
        return kind, target.strip()
    return DICOM, d


@dataclass(frozen=True)
class ForwardRule:
    """Send what matches to `destinations`: known DICOM nodes, admitted peer gateways, the
    central PACS."""

    name: str = setting(doc="rule name, shown with its jobs")
    destinations: list[str] = setting(
        doc='"AE" (or "dicom:AE") of [[dicom.nodes]], "peer:NAME" (an admitted gateway '
        'fetches the study), "central" (the central PACS, through a replica)'
    )
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
    accept_push: bool = setting(
        True,
        doc="admitted peers may ask this gateway to fetch a study they forward to it (and, "
        "on gateways talking to the central PACS, to store it there)",
    )
    push_poll_s: float = setting(
        2.0, check=positive, doc="seconds between progress questions to a peer destination"
    )
    push_stall_s: float = setting(
        120.0,
        check=positive,
        doc="a peer destination reporting no progress this long fails the try (retried)",
    )
    push_timeout_s: float = setting(
        21600.0, check=positive, doc="longest one try to a peer destination may take"
    )

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
            for j, dest in enumerate(rule.destinations):
                kind, target = destination_kind(dest)
                problem = peer_name(target) if kind == PEER else None
                if kind == DICOM and not target:
                    problem = "empty destination"
                if problem:
                    errors.append((f"rules[{i}].destinations[{j}]", f"{dest!r}: {problem}"))
            for j, item in enumerate(rule.attributes):
                if "=" not in item or not item.partition("=")[0].strip():
                    errors.append((f"rules[{i}].attributes[{j}]", 'expected "Keyword=value"'))
        if self.backoff_max_s < self.backoff_base_s:
            errors.append(("backoff_max_s", "must be >= backoff_base_s"))
        return errors


def check_destinations(
    forward: ForwardConfig,
    node_titles: list[str],
    *,
    mesh_enabled: bool = True,
    central_enabled: bool = False,
) -> list[tuple[str, str]]:
    """Rule destinations this gateway cannot reach, as (key from the root, message); for the
    root Config's validate (it sees `[forward]`, `[dicom] nodes`, `[mesh]` and `[central]`).
    Peer names are not checked against the registry: admissions change while running."""
    known = {t.strip() for t in node_titles}
    errors: list[tuple[str, str]] = []
    for i, rule in enumerate(forward.rules):
        for j, d in enumerate(rule.destinations):
            key = f"forward.rules[{i}].destinations[{j}]"
            kind, target = destination_kind(d)
            if kind == DICOM and target not in known:
                errors.append((key, f"{target!r} is not in [[dicom.nodes]]"))
            elif kind != DICOM and not mesh_enabled:
                errors.append((key, f"{d!r} needs [mesh] enabled"))
            elif kind == CENTRAL and not central_enabled:
                errors.append((key, '"central" needs [central] enabled'))
    return errors
