"""The eviction policy's I/O-free core: study facts, limits and the time in; an ordered plan
with a reason per study out.

Rules, in the order they are applied to each study:
1. Busy (a swarm download or forwarding job in progress): kept.
2. Used (retrieved or stored to) less than `min_idle_s` ago: kept.
3. Retrievable elsewhere, or kept: the central PACS holds it, or at least `min_holders` other
   gateways hold it complete. A study acquired at this gateway (arrived by C-STORE from a
   modality, not fetched) additionally needs the central PACS or one other site to hold it,
   whatever `min_holders` says: that copy is what a success status promised to keep.
   Only holders whose name sorts before this gateway's count: two gateways never both evict
   because each relies on the other's copy (no coordination needed; the first-named holder
   of a study never evicts it on the mesh's word, so a copy always stays).
4. Among the evictable: those unused for `max_idle_days` go (when set); then, while the
   store is over `max_bytes` or under `min_free_bytes` free, the lowest usage score goes
   first until `slack_bytes` beyond the limit are freed.

Usage score: (1 + access_count) * 0.5 ** (idle / half_life), idle = now - last use (last
retrieval or last store). It weighs frequency by recency: a study retrieved 10 times a month
ago (half-life 7 days: 11 * 0.05 = 0.56) goes before one retrieved once yesterday (1.8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.evict.config import EvictConfig

DAY = 86400.0


@dataclass(frozen=True)
class StudyFacts:
    """What the policy knows about one locally held study."""

    uid: str
    bytes: int  # the study's instance bytes (chunks shared with other studies included)
    last_access: float  # last retrieval (0: never)
    access_count: int
    last_stored: float  # last instance stored
    locally_acquired: bool = False  # some instance came from a modality, not fetched
    in_central: bool = False  # the central PACS holds it
    holders: tuple[str, ...] = ()  # other gateways holding (at least) our copy complete
    busy: str = ""  # why it must not be touched now ("" = free)

    @property
    def last_used(self) -> float:
        return max(self.last_access, self.last_stored)


@dataclass(frozen=True)
class Policy:
    """The limits and weights of `EvictConfig`, in seconds and bytes."""

    max_bytes: int = 0  # 0 = no byte limit
    min_free_bytes: int = 0  # 0 = no free-space limit
    slack_bytes: int = 0
    max_idle_s: float = 0.0  # 0 = off
    min_idle_s: float = 0.0
    half_life_s: float = 7 * DAY
    min_holders: int = 1
    own: str = ""  # this gateway's catalog name ("": every holder counts; tests)

    @classmethod
    def from_config(cls, cfg: EvictConfig, own: str = "") -> Policy:
        return cls(
            own=own,
            max_bytes=int(cfg.max_bytes),
            min_free_bytes=int(cfg.min_free_bytes),
            slack_bytes=int(cfg.slack_bytes),
            max_idle_s=cfg.max_idle_days * DAY,
            min_idle_s=cfg.min_idle_s,
            half_life_s=cfg.half_life_days * DAY,
            min_holders=cfg.min_holders,
        )


@dataclass(frozen=True)
class Space:
    """The store's room: live bytes, and what new data can still use (free disk plus pages
    the store freed and reuses before the file grows)."""

    used_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Decision:
    """One study's fate in a plan, with the reason shown to the administrator."""

    uid: str
    bytes: int
    score: float
    reason: str


@dataclass(frozen=True)
class Plan:
    """What to evict, in order, and why; what stays and why (protected studies first)."""

    now: float
    space: Space
    need_bytes: int  # bytes to free to get back under the limits with slack (0: none)
    pressure: tuple[str, ...]  # which limits are crossed
    victims: tuple[Decision, ...]
    kept: tuple[Decision, ...] = field(default=())

    @property
    def freed_bytes(self) -> int:
        """Estimated: chunks a victim shares with a kept study are not freed."""
        return sum(v.bytes for v in self.victims)

    @property
    def shortfall_bytes(self) -> int:
        """Bytes still needed after the victims: no more study may go."""
        return max(0, self.need_bytes - self.freed_bytes)


def score(f: StudyFacts, now: float, half_life_s: float) -> float:
    """Recency-weighted frequency: higher is more worth keeping."""
    idle = max(0.0, now - f.last_used)
    return (1 + f.access_count) * 0.5 ** (idle / half_life_s)


def protection(f: StudyFacts, policy: Policy, now: float) -> str | None:
    """Why a study may not be evicted now, or None when it may."""
    if f.busy:
        return f.busy
    idle = now - f.last_used
    if idle < policy.min_idle_s:
        return f"used {_ago(idle)} ago (less than {_ago(policy.min_idle_s)})"
    holders = relied_on(f.holders, policy.own)
    if f.locally_acquired and not (f.in_central or holders):
        return "acquired here, not yet confirmed at the central PACS or another site" + (
            _not_counted(f.holders, holders, policy.own)
        )
    if not f.in_central and len(holders) < policy.min_holders:
        return (
            f"not retrievable elsewhere: {len(holders)} other complete holder(s) of "
            f"{policy.min_holders} needed, not in the central PACS"
        ) + _not_counted(f.holders, holders, policy.own)
    return None


def relied_on(holders: tuple[str, ...], own: str) -> tuple[str, ...]:
    """The holders this gateway may count on: those named before it (see the module doc)."""
    return tuple(h for h in holders if not own or h < own)


def _not_counted(holders: tuple[str, ...], counted: tuple[str, ...], own: str) -> str:
    skipped = [h for h in holders if h not in counted]
    if not skipped:
        return ""
    return f" ({', '.join(skipped)} not counted: named after {own}, may evict at the same time)"


def pressure(space: Space, policy: Policy) -> tuple[tuple[str, ...], int]:
    """The crossed limits and the bytes to free (with slack) to get back under them."""
    crossed: list[str] = []
    need = 0
    if policy.max_bytes and space.used_bytes > policy.max_bytes:
        crossed.append(f"store holds {_size(space.used_bytes)} > max {_size(policy.max_bytes)}")
        need = max(need, space.used_bytes - policy.max_bytes + policy.slack_bytes)
    if policy.min_free_bytes and space.available_bytes < policy.min_free_bytes:
        crossed.append(f"{_size(space.available_bytes)} free < min {_size(policy.min_free_bytes)}")
        need = max(need, policy.min_free_bytes - space.available_bytes + policy.slack_bytes)
    return tuple(crossed), need


def plan(facts: Iterable[StudyFacts], policy: Policy, space: Space, now: float) -> Plan:
    """The ordered eviction plan (see the module docstring for the rules)."""
    crossed, need = pressure(space, policy)
    protected: list[Decision] = []
    idle_victims: list[Decision] = []
    candidates: list[tuple[tuple[float, float, int, str], Decision]] = []
    for f in facts:
        s = score(f, now, policy.half_life_s)
        why_not = protection(f, policy, now)
        if why_not is not None:
            protected.append(Decision(f.uid, f.bytes, s, why_not))
            continue
        where = _where(f)
        idle = now - f.last_used
        if policy.max_idle_s and idle >= policy.max_idle_s:
            idle_victims.append(Decision(f.uid, f.bytes, s, f"unused for {_ago(idle)}; {where}"))
            continue
        reason = f"score {s:.3g} ({_usage(f, now)}); {where}"
        # Lowest score first; ties: least recently used, then the bigger (frees more).
        candidates.append(((s, f.last_used, -f.bytes, f.uid), Decision(f.uid, f.bytes, s, reason)))

    idle_victims.sort(key=lambda d: (d.score, d.uid))
    victims = list(idle_victims)
    freed = sum(d.bytes for d in victims)
    kept = []
    for _, d in sorted(candidates, key=lambda c: c[0]):
        if freed < need:
            victims.append(replace(d, reason=f"{'; '.join(crossed)}: {d.reason}"))
            freed += d.bytes
        else:
            kept.append(replace(d, reason=f"not needed: {d.reason}"))
    protected.sort(key=lambda d: d.uid)
    return Plan(now, space, need, crossed, tuple(victims), tuple(protected + kept))


def format_plan(p: Plan, *, dry_run: bool = True) -> str:
    """The plan as text for `dicomesh evict` and the log: one line per study."""
    verb = "would evict" if dry_run else "evicting"
    lines = [
        f"store: {_size(p.space.used_bytes)} used, {_size(p.space.available_bytes)} available"
        + (f"; over limits: {'; '.join(p.pressure)}" if p.pressure else "; within limits"),
        f"{verb} {len(p.victims)} stud{'y' if len(p.victims) == 1 else 'ies'}, "
        f"~{_size(p.freed_bytes)}"
        + (f" (need {_size(p.need_bytes)})" if p.need_bytes else "")
        + (f"; {_size(p.shortfall_bytes)} short: nothing else may go" if p.shortfall_bytes else ""),
    ]
    lines += [f"  evict {d.uid}  {_size(d.bytes)}  {d.reason}" for d in p.victims]
    lines += [f"  keep  {d.uid}  {_size(d.bytes)}  {d.reason}" for d in p.kept]
    return "\n".join(lines)


def plan_json(p: Plan) -> dict[str, Any]:
    """The plan as JSON (the control socket's answer)."""

    def rows(ds: tuple[Decision, ...]) -> list[dict[str, Any]]:
        return [
            {"study": d.uid, "bytes": d.bytes, "score": d.score, "reason": d.reason} for d in ds
        ]

    return {
        "now": p.now,
        "used_bytes": p.space.used_bytes,
        "available_bytes": p.space.available_bytes,
        "pressure": list(p.pressure),
        "need_bytes": p.need_bytes,
        "freed_bytes": p.freed_bytes,
        "shortfall_bytes": p.shortfall_bytes,
        "victims": rows(p.victims),
        "kept": rows(p.kept),
    }


def _where(f: StudyFacts) -> str:
    places = (["central PACS"] if f.in_central else []) + list(f.holders)
    return "held by " + ", ".join(places)


def _usage(f: StudyFacts, now: float) -> str:
    used = f"last used {_ago(now - f.last_used)} ago"
    return f"{f.access_count} retrieval(s), {used}"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / DAY:.1f} d"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
