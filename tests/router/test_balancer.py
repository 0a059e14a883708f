"""The balancing decision over hand-built replica states (no I/O, explicit clock and rng)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.balancer import (
    FRESH_S,
    STALE_S,
    LeastBusy,
    RequestInfo,
    RoundRobin,
    freshness,
    load_score,
    make_policy,
    policy_names,
)
from router.errors import ConfigError
from router.state import ReplicaState

NOW = 1000.0
REQ = RequestInfo(model="m")


def replica(
    url: str = "http://a:1",
    *,
    in_flight: int = 0,
    ours_at_scrape: int = 0,
    running: float = 0.0,
    waiting: float = 0.0,
    kv: float = 0.0,
    capacity: float = 1.0,
    age: float | None = 0.5,
) -> ReplicaState:
    """A healthy replica; ``age`` is seconds since the last scrape (None: never scraped)."""
    return ReplicaState(
        url=url,
        healthy=True,
        in_flight=in_flight,
        in_flight_at_scrape=ours_at_scrape,
        running=running,
        waiting=waiting,
        kv_cache_usage=kv,
        capacity=capacity,
        scraped_at=0.0 if age is None else NOW - age,
    )


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        pytest.param(replica(), 0.0, id="idle"),
        pytest.param(replica(in_flight=3), 3.0, id="in-flight-only"),
        pytest.param(replica(running=4), 4.0, id="engine-running-from-other-clients"),
        # our 2 in-flight are the engine's 2 running: not counted twice
        pytest.param(replica(in_flight=2, ours_at_scrape=2, running=2), 2.0, id="no-double-count"),
        # sent since the last scrape: the engine does not know about them yet
        pytest.param(
            replica(in_flight=5, ours_at_scrape=2, running=2), 5.0, id="in-flight-ahead-of-scrape"
        ),
        # ours finished since the scrape: the stale engine count must not hold a floor
        pytest.param(
            replica(in_flight=0, ours_at_scrape=3, running=3), 0.0, id="finished-since-scrape"
        ),
        # 3 of ours + 2 from another router
        pytest.param(replica(in_flight=3, ours_at_scrape=3, running=5), 5.0, id="ours-plus-others"),
        # a request in transit at scrape time is not in the engine yet: no negative load
        pytest.param(
            replica(in_flight=1, ours_at_scrape=1, running=0), 1.0, id="in-transit-clamped"
        ),
        # busy = 2 + 1, plus 1 extra for the queued one
        pytest.param(replica(running=2, waiting=1), 4.0, id="waiting-weighs-double"),
        pytest.param(replica(running=2, kv=0.8), 2.0, id="kv-at-knee-no-penalty"),
        pytest.param(replica(running=2, kv=0.9), 3.0, id="kv-half-way-past-knee"),
        pytest.param(replica(running=2, kv=1.0), 4.0, id="kv-full-doubles"),
        pytest.param(replica(running=4, capacity=2.0), 2.0, id="capacity-normalises"),
        pytest.param(replica(in_flight=1, running=9, age=STALE_S + 1), 1.0, id="stale-ignored"),
        pytest.param(replica(in_flight=1, running=9, kv=1.0, age=STALE_S), 1.0, id="stale-kv"),
        pytest.param(replica(in_flight=1, running=9, age=None), 1.0, id="never-scraped"),
        pytest.param(
            replica(running=6, age=(FRESH_S + STALE_S) / 2), 3.0, id="half-stale-half-weight"
        ),
        pytest.param(replica(running=3, capacity=0.0), 3.0, id="zero-capacity-treated-as-1"),
    ],
)
def test_load_score(state: ReplicaState, expected: float) -> None:
    assert load_score(state, NOW) == pytest.approx(expected)


def test_freshness_fades_linearly_between_fresh_and_stale() -> None:
    ages = [0.0, FRESH_S, (FRESH_S + STALE_S) / 2, STALE_S, STALE_S * 10]
    weights = [freshness(replica(age=a), NOW) for a in ages]
    assert weights == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])


@pytest.mark.parametrize(
    ("replicas", "winner"),
    [
        pytest.param(
            [replica("http://a:1", in_flight=3), replica("http://b:1", in_flight=1)],
            "http://b:1",
            id="fewer-in-flight",
        ),
        pytest.param(
            [replica("http://a:1", running=1, waiting=3), replica("http://b:1", running=3)],
            "http://b:1",
            id="queue-worse-than-running",
        ),
        pytest.param(
            [
                replica("http://a:1", running=4),
                replica("http://b:1", running=6, capacity=2.0),
            ],
            "http://b:1",
            id="bigger-replica-takes-more",
        ),
        pytest.param(
            [replica("http://a:1", running=3, kv=0.99), replica("http://b:1", running=4)],
            "http://b:1",
            id="near-full-kv-avoided",
        ),
        pytest.param(
            [
                replica("http://a:1", in_flight=1, running=20, age=STALE_S * 2),
                replica("http://b:1", in_flight=2, ours_at_scrape=2, running=2),
            ],
            "http://a:1",
            id="stale-gauges-ignored",
        ),
        pytest.param(
            [
                # a fast replica that finished its requests since the scrape ...
                replica("http://fast:1", in_flight=0, ours_at_scrape=2, running=2),
                # ... beats a slow one still working on them
                replica("http://slow:1", in_flight=2, ours_at_scrape=2, running=2),
            ],
            "http://fast:1",
            id="fresher-own-count-wins",
        ),
        pytest.param(
            [
                replica("http://a:1", in_flight=1, ours_at_scrape=1, running=6),
                replica("http://b:1", in_flight=2, ours_at_scrape=2, running=2),
            ],
            "http://b:1",
            id="other-clients-load-counts",
        ),
    ],
)
def test_least_busy_picks_lowest_score(replicas: list[ReplicaState], winner: str) -> None:
    policy = LeastBusy(random.Random(0), clock=lambda: NOW)
    for _ in range(20):  # deterministic whatever the rng does: no ties here
        assert policy.pick(replicas, REQ).url == winner


def test_least_busy_breaks_ties_uniformly_at_random() -> None:
    tied = [replica(f"http://r{i}:1", in_flight=1) for i in range(4)]
    busier = replica("http://busy:1", in_flight=2)
    policy = LeastBusy(random.Random(1234), clock=lambda: NOW)
    counts = Counter(policy.pick([*tied, busier], REQ).url for _ in range(4000))
    assert set(counts) == {r.url for r in tied}
    # each tied replica gets about a quarter (binomial sd ~ 27; 150 is > 5 sd)
    for url in counts:
        assert abs(counts[url] - 1000) < 150, counts


def test_least_busy_single_candidate() -> None:
    only = replica(in_flight=50)
    assert LeastBusy(random.Random(0)).pick([only], REQ) is only


def test_pick_rejects_empty_candidates() -> None:
    with pytest.raises(ValueError):
        LeastBusy().pick([], REQ)
    with pytest.raises(ValueError):
        RoundRobin().pick([], REQ)


def test_round_robin_cycles_in_url_order() -> None:
    replicas = [replica("http://c:1"), replica("http://a:1"), replica("http://b:1")]
    policy = RoundRobin()
    picks = [policy.pick(replicas, REQ).url for _ in range(7)]
    assert picks == [
        "http://a:1",
        "http://b:1",
        "http://c:1",
        "http://a:1",
        "http://b:1",
        "http://c:1",
        "http://a:1",
    ]


def test_round_robin_survives_membership_changes() -> None:
    a, b, c = replica("http://a:1"), replica("http://b:1"), replica("http://c:1")
    policy = RoundRobin()
    assert policy.pick([a, b, c], REQ) is a
    assert policy.pick([a, b, c], REQ) is b
    # b's successor c left: wrap to a rather than repeat b
    assert policy.pick([a, b], REQ) is a
    # a new replica after the last one gets its turn
    d = replica("http://d:1")
    assert policy.pick([a, b, d], REQ) is b
    assert policy.pick([a, b, d], REQ) is d


def test_round_robin_ignores_load() -> None:
    replicas = [replica("http://a:1", in_flight=100), replica("http://b:1")]
    policy = RoundRobin()
    assert [policy.pick(replicas, REQ).url for _ in range(2)] == ["http://a:1", "http://b:1"]


@pytest.mark.parametrize("name", ["least-busy", "round-robin"])
def test_make_policy_known_names(name: str) -> None:
    assert make_policy(name, random.Random(0)).name == name
    assert name in policy_names()


def test_make_policy_unknown_name_names_the_flag_and_choices() -> None:
    with pytest.raises(ConfigError) as err:
        make_policy("fastest")
    message = str(err.value)
    assert "--policy" in message
    assert "'fastest'" in message
    assert "least-busy" in message and "round-robin" in message
    assert "\n" not in message
