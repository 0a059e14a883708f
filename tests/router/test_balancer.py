"""The balancing decision over hand-built replica states (no I/O, explicit clock and rng),
and once through a router in front of simulators (the cost policy learning a slowdown)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from openai import AsyncOpenAI

from tests.support.router import RouterHandle, eventually, running_router
from tests.support.sim import SIM_MODEL, running_sims
from vllm_fleet.router.balancer import (
    DEFAULT_TOKENS,
    PREFILL_STEP_PRIOR,
    QUEUE_PLACE_REQUESTS,
    CostAware,
    LeastBusy,
    Policy,
    RequestInfo,
    RoundRobin,
    Speed,
    fleet_defaults,
    make_policy,
    policy_names,
    replica_speed,
    request_cost,
)
from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.load import FRESH_S, STALE_S, freshness, load_score
from vllm_fleet.router.prefill_backlog import PREFILL_WEIGHT
from vllm_fleet.router.speed import SpeedEstimate
from vllm_fleet.router.state import ReplicaState

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
        pytest.param(replica(in_flight=1, running=9, age=STALE_S + 1), 1.0, id="stale-ignored"),
        pytest.param(replica(in_flight=1, running=9, kv=1.0, age=STALE_S), 1.0, id="stale-kv"),
        pytest.param(replica(in_flight=1, running=9, age=None), 1.0, id="never-scraped"),
        pytest.param(
            replica(running=6, age=(FRESH_S + STALE_S) / 2), 3.0, id="half-stale-half-weight"
        ),
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


@pytest.mark.parametrize("name", ["least-busy", "cost", "round-robin"])
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


# --- cost ---------------------------------------------------------------------------------


def measured(
    url: str,
    *,
    token_s: float,
    in_flight: int = 0,
    limit: float | None = 16,
    slowdown: float = 0.05,
    mean_tokens: float | None = 100.0,
) -> ReplicaState:
    """A replica whose speed the estimator has learned (hand-set, as if from its counters)."""
    r = replica(url, in_flight=in_flight)
    r.speed = SpeedEstimate(token_s=token_s, batch_slowdown=slowdown, batch_limit=limit)
    if mean_tokens is not None:
        r.speed.recent_tokens, r.speed.recent_finished = 10 * mean_tokens, 10.0
    return r


def cost_pick(replicas: list[ReplicaState], request: RequestInfo, seed: int = 0) -> str:
    return CostAware(random.Random(seed), clock=lambda: NOW).pick(replicas, request).url


def sized(max_tokens: int | None, prompt_tokens: int = 0) -> RequestInfo:
    return RequestInfo(model="m", prompt_tokens=prompt_tokens, max_tokens=max_tokens)


@pytest.mark.parametrize(
    ("in_flight", "expected"),
    [
        # own 40 * 0.02 * (1 + 0.05 * 4); impose 3 * 0.02 * 0.05 * min(40, 100)
        pytest.param(3, 40 * 0.02 * 1.2 + 3 * 0.02 * 0.05 * 40, id="free-slot"),
        # batch full (16 running): one place in line, priced at QUEUE_PLACE_REQUESTS mean
        # requests on a full batch, then run in a batch of 16 and slow those 16
        pytest.param(
            16,
            QUEUE_PLACE_REQUESTS * 0.02 * 1.8 * 100 + 40 * 0.02 * 1.8 + 16 * 0.02 * 0.05 * 40,
            id="queued",
        ),
    ],
)
def test_request_cost_formula(in_flight: int, expected: float) -> None:
    r = replica(in_flight=in_flight)
    speed = Speed(token_s=0.02, batch_slowdown=0.05, batch_limit=16, prefill_s_per_token=0.0)
    assert request_cost(r, sized(40), speed, 100.0, NOW) == pytest.approx(expected)


def test_request_cost_counts_prefill_others_load_and_kv_pressure() -> None:
    speed = Speed(token_s=0.02, batch_slowdown=0.0, batch_limit=math.inf, prefill_s_per_token=1e-4)
    # 2 of ours + 3 from other clients; prefill 1000 * 1e-4 = 0.1 s, priced PREFILL_WEIGHT
    # times on the request's own first-token path, at its seconds as a stall of all 5 running
    r = replica(in_flight=2, ours_at_scrape=2, running=5, kv=0.9)
    cost = request_cost(r, sized(10, prompt_tokens=1000), speed, 100.0, NOW)
    prefill = 0.1 * PREFILL_WEIGHT
    assert cost == pytest.approx((prefill + 10 * 0.02 + 5 * 0.1) * 1.5)
    # an unknown batch limit (inf) never makes the cost NaN
    assert math.isfinite(request_cost(replica(), sized(10), speed, 100.0, NOW))


def test_cost_sends_long_requests_to_the_fast_replica_and_short_ones_to_the_idle_slow_one() -> None:
    replicas = [
        measured("http://fast:1", token_s=0.02, in_flight=12),
        measured("http://slow:1", token_s=0.04),
    ]
    assert cost_pick(replicas, sized(400)) == "http://fast:1"
    assert cost_pick(replicas, sized(16)) == "http://slow:1"
    # least-busy sends both to the idle replica
    assert LeastBusy(random.Random(0), clock=lambda: NOW).pick(replicas, REQ).url == "http://slow:1"


def test_cost_does_not_pile_short_requests_past_a_batch_limit() -> None:
    """Short requests fill the slow replica's free slots, then wait only where waiting is
    cheapest, never in a line on the slow replica while fast ones still have room."""
    slow = measured("http://slow:1", token_s=0.04, limit=4)
    fast = [measured(f"http://fast{i}:1", token_s=0.02, in_flight=12) for i in range(2)]
    policy = CostAware(random.Random(0), clock=lambda: NOW)
    for _ in range(14):  # 12 free slots in all, then 2 requests that must wait somewhere
        chosen = policy.pick([slow, *fast], sized(16))
        chosen.in_flight += 1  # nothing finishes meanwhile
        if slow.in_flight > 4:
            assert all(f.in_flight >= 16 for f in fast), "queued on the slow replica early"
    assert slow.in_flight == 4  # it took short requests while it had room...
    # ...and the two that wait, wait on fast replicas (a place there clears twice as fast)
    assert sum(f.in_flight for f in fast) == 34 and min(f.in_flight for f in fast) >= 16


def test_cost_without_max_tokens_uses_the_learned_request_length() -> None:
    fast = measured("http://fast:1", token_s=0.02, in_flight=16, mean_tokens=300.0)
    slow = measured("http://slow:1", token_s=0.04, in_flight=2, mean_tokens=100.0)
    default, typical = fleet_defaults([fast, slow])
    assert typical == 200.0  # pooled: (3000 + 1000) tokens / 20 finished requests
    for r in (fast, slow):
        speed = replica_speed(r.speed, default)
        unknown = request_cost(r, sized(None), speed, typical, NOW)
        assert unknown == pytest.approx(request_cost(r, sized(200), speed, typical, NOW))
    # nothing finished anywhere yet: DEFAULT_TOKENS
    assert fleet_defaults([replica(), replica()])[1] == DEFAULT_TOKENS


def test_cost_breaks_ties_at_random() -> None:
    tied = [measured(f"http://r{i}:1", token_s=0.02, in_flight=2) for i in range(4)]
    policy = CostAware(random.Random(99), clock=lambda: NOW)
    counts = Counter(policy.pick(tied, sized(32)).url for _ in range(4000))
    for url in (r.url for r in tied):
        assert abs(counts[url] - 1000) < 150, counts  # binomial sd ~ 27


def test_cost_before_any_speed_is_learned_is_least_busy() -> None:
    replicas = [replica("http://a:1", in_flight=3), replica("http://b:1", in_flight=1)]
    for request in (sized(4), sized(4000), sized(None)):
        assert cost_pick(replicas, request) == "http://b:1"


def test_an_unmeasured_replica_is_assumed_average() -> None:
    fast = measured("http://fast:1", token_s=0.02, limit=8)
    slow = measured("http://slow:1", token_s=0.04, limit=16)
    new = replica("http://new:1")
    default, typical = fleet_defaults([fast, slow, new])
    assert (default.token_s, default.batch_limit, typical) == pytest.approx((0.03, 12, 100.0))
    # no replica exports prefill times: a prompt token costs PREFILL_STEP_PRIOR decode steps
    prior = default._replace(prefill_s_per_token=0.03 * PREFILL_STEP_PRIOR)
    assert replica_speed(new.speed, default) == prior
    # a replica that never queued takes the fleet's batch limit, unless it ran more than that
    new.speed = SpeedEstimate(token_s=0.02, peak_running=20)
    assert replica_speed(new.speed, default).batch_limit == 20


def test_before_any_replica_queued_running_past_its_peak_is_priced_as_a_risk() -> None:
    """No batch limit known anywhere: each replica is assumed full at the most it has been
    seen running, so load spreads before one replica is pushed into the unknown."""
    seen = measured("http://a:1", token_s=0.02, limit=None, in_flight=6)
    seen.speed.peak_running = 6
    roomy = measured("http://b:1", token_s=0.02, limit=None, in_flight=6)
    roomy.speed.peak_running = 9
    default, _ = fleet_defaults([seen, roomy])
    assert default.batch_limit == math.inf
    assert replica_speed(seen.speed, default).batch_limit == 6
    assert cost_pick([seen, roomy], sized(32)) == "http://b:1"
    # never scraped while busy: at least one request is not a risk
    assert replica_speed(SpeedEstimate(token_s=0.02), default).batch_limit == 1


# --- through a router ---------------------------------------------------------------------


class Recording:
    """Wraps the router's policy to record (max_tokens, chosen replica) of every pick."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.picks: list[tuple[int | None, str]] = []

    def pick(self, replicas: Sequence[ReplicaState], request: RequestInfo) -> ReplicaState:
        chosen = self.inner.pick(replicas, request)
        self.picks.append((request.max_tokens, chosen.url))
        return chosen


async def send_wave(router: RouterHandle, sizes: list[int]) -> None:
    async with router.openai() as client:
        await asyncio.gather(
            *(client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=n) for n in sizes)
        )


@pytest.mark.timeout(60)
async def test_cost_learns_a_slowdown_and_keeps_long_requests_off_that_replica() -> None:
    async with (
        running_sims(2) as sims,
        running_router([s.url for s in sims], policy="cost") as router,
    ):
        fast, slow = (router.fleet.replicas[s.url] for s in sims)

        def ratio() -> float:
            if fast.speed.token_s is None or slow.speed.token_s is None:
                return 0.0
            return slow.speed.token_s / fast.speed.token_s

        async def traffic_until(condition: str, predicate: Callable[[], bool]) -> None:
            """Short requests in waves until ``predicate()`` (bounded by eventually): through
            the router, and straight to each replica as other clients would send them. The
            router learns speeds from the engines' own counters, whoever sent the traffic; once
            one replica is slower the cost policy rightly sends it little of its own."""
            task = asyncio.gather(_waves(router), *(_direct_waves(s.url) for s in sims))
            try:
                await eventually(predicate, 15.0, condition)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        await traffic_until("both speeds learned", lambda: 0.5 < ratio() < 2.0)
        await sims[1].control(speed=0.25)  # a noisy neighbour arrives on the second replica
        await traffic_until("the slowdown noticed", lambda: ratio() > 2.5)

        recording = Recording(router.ctx.policy)
        router.ctx.policy = recording
        rng = random.Random(7)
        for _ in range(4):  # 4 waves of 4 long and 4 short requests, in random order
            sizes = [48] * 4 + [4] * 4
            rng.shuffle(sizes)
            await send_wave(router, sizes)
        long_to_slow = sum(1 for n, url in recording.picks if n == 48 and url == slow.url)
        # least-busy splits them about evenly (8 of 16); the cost policy keeps them on the fast
        # replica, which finishes a long request four times sooner
        assert len(recording.picks) == 32
        assert long_to_slow <= 3, recording.picks


async def _waves(router: RouterHandle) -> None:
    while True:
        await send_wave(router, [4] * 6)


async def _direct_waves(url: str) -> None:
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        while True:
            await asyncio.gather(
                *(
                    client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=4)
                    for _ in range(2)
                )
            )
