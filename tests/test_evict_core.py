"""The eviction policy's I/O-free core (appliance.evict.core): usage score, protection rules,
pressure with slack, the idle-age rule, ordering and the text form of a plan.

Contract (issue 7, replica cache): evict by a usage score (recency and frequency) when over
max bytes or under min free disk, or when unused for long; only studies retrievable elsewhere
(central PACS or N other complete holders); studies acquired here never before the central
PACS or another site confirmed them.
"""

from __future__ import annotations

import pytest

from appliance.evict.config import EvictConfig, check_limits
from appliance.evict.core import (
    DAY,
    Policy,
    Space,
    StudyFacts,
    format_plan,
    plan,
    plan_json,
    protection,
    score,
)
from appliance.schema import ByteSize, load
from appliance.store.config import StoreConfig

NOW = 1_700_000_000.0
MB = 1 << 20
ROOMY = Space(used_bytes=10 * MB, available_bytes=100 * MB)


def study(
    uid: str,
    *,
    days_ago: float = 10.0,
    count: int = 0,
    size: int = MB,
    holders: tuple[str, ...] = ("site-a",),
    **kw: object,
) -> StudyFacts:
    """A study last used `days_ago` days before NOW (stored then, retrieved `count` times)."""
    when = NOW - days_ago * DAY
    return StudyFacts(
        uid=uid,
        bytes=size,
        last_access=when if count else 0.0,
        access_count=count,
        last_stored=when,
        holders=holders,
        **kw,  # type: ignore[arg-type]
    )


def test_score_weighs_frequency_by_recency() -> None:
    half_life = 7 * DAY
    often_long_ago = study("a", days_ago=30, count=10)
    once_yesterday = study("b", days_ago=1, count=1)
    never_old = study("c", days_ago=30)
    assert score(once_yesterday, NOW, half_life) > score(often_long_ago, NOW, half_life)
    assert score(often_long_ago, NOW, half_life) > score(never_old, NOW, half_life)
    # One half-life halves the score; each retrieval adds one unit.
    assert score(study("d", days_ago=7, count=1), NOW, half_life) == pytest.approx(1.0)
    assert score(study("e", days_ago=0, count=3), NOW, half_life) == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("facts", "policy", "expected"),
    [
        (study("s", busy="swarm download in progress"), Policy(), "swarm download"),
        (study("s", days_ago=0.01), Policy(min_idle_s=3600), "used 14 min ago"),
        (study("s", holders=()), Policy(), "not retrievable elsewhere: 0 other"),
        (study("s", holders=("a",)), Policy(min_holders=2), "1 other complete holder(s) of 2"),
        (study("s", holders=(), locally_acquired=True), Policy(), "acquired here"),
        (study("s", holders=("a",), locally_acquired=True), Policy(min_holders=2), "1 other"),
        # Evictable:
        (study("s", holders=("a",)), Policy(), None),
        (study("s", holders=("a", "b")), Policy(min_holders=2), None),
        (study("s", holders=(), in_central=True), Policy(min_holders=3), None),
        (study("s", holders=(), in_central=True, locally_acquired=True), Policy(), None),
        (study("s", holders=("a",), locally_acquired=True), Policy(), None),
    ],
)
def test_protection_rules(facts: StudyFacts, policy: Policy, expected: str | None) -> None:
    why = protection(facts, policy, NOW)
    if expected is None:
        assert why is None
    else:
        assert why is not None and expected in why


def test_within_limits_nothing_goes() -> None:
    p = plan([study("a"), study("b")], Policy(max_bytes=50 * MB), ROOMY, NOW)
    assert p.victims == () and p.need_bytes == 0 and p.pressure == ()
    assert [d.uid for d in p.kept] == ["a", "b"]
    assert all(d.reason.startswith("not needed") for d in p.kept)


def test_over_max_bytes_lowest_score_goes_first_until_slack_freed() -> None:
    facts = [
        study("hot", days_ago=1, count=10),
        study("cold", days_ago=40),
        study("warm", days_ago=5, count=2),
        study("cool", days_ago=20, count=1),
        study("orphan", days_ago=90, holders=()),  # lowest score, but nowhere else
    ]
    space = Space(used_bytes=10 * MB, available_bytes=100 * MB)
    p = plan(facts, Policy(max_bytes=9 * MB, slack_bytes=MB // 2), space, NOW)
    assert p.need_bytes == MB + MB // 2
    assert [v.uid for v in p.victims] == ["cold", "cool"]
    assert p.freed_bytes == 2 * MB and p.shortfall_bytes == 0
    assert "max 9.0 MiB" in p.victims[0].reason and "held by site-a" in p.victims[0].reason
    kept = {d.uid: d.reason for d in p.kept}
    assert kept["orphan"].startswith("not retrievable elsewhere")
    assert kept["hot"].startswith("not needed")
    # Protected studies are listed first.
    assert p.kept[0].uid == "orphan"


def test_ties_go_biggest_first_then_by_uid() -> None:
    a = StudyFacts("a", MB, 0.0, 0, NOW - 10 * DAY, holders=("x",))
    b = StudyFacts("b", 2 * MB, 0.0, 0, NOW - 10 * DAY, holders=("x",))
    c = StudyFacts("c", MB, 0.0, 0, NOW - 10 * DAY, holders=("x",))
    space = Space(used_bytes=10 * MB, available_bytes=100 * MB)
    p = plan([a, b, c], Policy(max_bytes=10 * MB - 1), space, NOW)
    assert [v.uid for v in p.victims] == ["b"]
    p = plan([a, b, c], Policy(max_bytes=6 * MB), space, NOW)
    assert [v.uid for v in p.victims] == ["b", "a", "c"]


def test_low_free_disk_counts_too() -> None:
    space = Space(used_bytes=10 * MB, available_bytes=3 * MB)
    p = plan([study("a"), study("b", days_ago=1)], Policy(min_free_bytes=4 * MB), space, NOW)
    assert p.need_bytes == MB
    assert [v.uid for v in p.victims] == ["a"]
    assert "3.0 MiB free < min 4.0 MiB" in p.victims[0].reason


def test_unused_for_long_goes_without_pressure() -> None:
    facts = [study("old", days_ago=100), study("new", days_ago=2), study("old-only-here",
             days_ago=100, holders=())]  # fmt: skip
    p = plan(facts, Policy(max_idle_s=60 * DAY), ROOMY, NOW)
    assert [v.uid for v in p.victims] == ["old"]
    assert p.victims[0].reason.startswith("unused for 100.0 d")


def test_two_holders_never_both_evict_on_each_others_word() -> None:
    """Each of two gateways holding the only two copies sees the other as a holder: only the
    one named after the other may rely on it, so one copy always stays."""
    space = Space(used_bytes=10 * MB, available_bytes=100 * MB)
    tight = dict(max_bytes=5 * MB)
    first = plan([study("s", holders=("rep-b",))], Policy(own="rep-a", **tight), space, NOW)
    second = plan([study("s", holders=("rep-a",))], Policy(own="rep-b", **tight), space, NOW)
    assert [v.uid for v in first.victims] == []
    assert "rep-b not counted: named after rep-a" in first.kept[0].reason
    assert [v.uid for v in second.victims] == ["s"]
    # Central confirmation needs no such care: both may go.
    central = study("s", holders=("rep-b",), in_central=True)
    assert [v.uid for v in plan([central], Policy(own="rep-a", **tight), space, NOW).victims]


def test_nothing_evictable_leaves_a_shortfall() -> None:
    space = Space(used_bytes=10 * MB, available_bytes=100 * MB)
    p = plan([study("a", holders=())], Policy(max_bytes=5 * MB), space, NOW)
    assert p.victims == () and p.shortfall_bytes == 5 * MB
    text = format_plan(p)
    assert "5.0 MiB short: nothing else may go" in text
    assert "keep  a" in text


def test_text_and_json_forms() -> None:
    space = Space(used_bytes=10 * MB, available_bytes=100 * MB)
    p = plan([study("a"), study("b", holders=())], Policy(max_bytes=9 * MB), space, NOW)
    text = format_plan(p)
    assert text.splitlines()[1].startswith("would evict 1 study, ~1.0 MiB (need 1.0 MiB)")
    assert "  evict a  1.0 MiB  store holds 10.0 MiB > max 9.0 MiB: score" in text
    assert format_plan(p, dry_run=False).splitlines()[1].startswith("evicting 1 study")
    js = plan_json(p)
    assert [v["study"] for v in js["victims"]] == ["a"]
    assert js["kept"][0]["study"] == "b" and js["need_bytes"] == MB


def test_config_section_loads_and_maps_to_policy() -> None:
    cfg = load(
        EvictConfig,
        {"enabled": True, "max_bytes": "200 GiB", "max_idle_days": 30, "min_holders": 2},
    )
    policy = Policy.from_config(cfg)
    assert policy.max_bytes == ByteSize("200 GiB")
    assert policy.max_idle_s == 30 * DAY and policy.min_holders == 2
    assert policy.half_life_s == 7 * DAY
    with pytest.raises(ValueError, match="min_holders"):
        load(EvictConfig, {"min_holders": 0})


def test_limits_must_come_before_the_stores_hard_limits() -> None:
    store = StoreConfig(max_bytes=ByteSize("100 GiB"), min_free_bytes=ByteSize("1 GiB"))
    ok = EvictConfig(enabled=True, max_bytes=ByteSize("90 GiB"), min_free_bytes=ByteSize("2 GiB"))
    assert check_limits(ok, store) == []
    bad = EvictConfig(enabled=True, max_bytes=ByteSize(0), min_free_bytes=ByteSize("1 GiB"))
    assert [k for k, _ in check_limits(bad, store)] == ["evict.max_bytes", "evict.min_free_bytes"]
    assert check_limits(EvictConfig(enabled=False), store) == []
