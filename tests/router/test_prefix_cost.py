"""The cost policy with the prefix index: a cached prefix makes a replica cheaper by the prefill
it saves, and by nothing more (hand-built replica states, a fixed clock)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from vllm_fleet.router.balancer import (
    DUPLICATE_WEIGHT,
    CostAware,
    RequestInfo,
    Speed,
    request_cost,
)
from vllm_fleet.router.prefill_backlog import PREFILL_WEIGHT
from vllm_fleet.router.prefix_index import BLOCK_BYTES, BYTES_PER_TOKEN, prefix_bytes, prefix_keys
from vllm_fleet.router.speed import SpeedEstimate
from vllm_fleet.router.state import ReplicaState

NOW = 1000.0
SYSTEM = "You are the support assistant of a large fleet of servers. " * 120  # ~7 KB
#: 1e-4 s per prompt token (10k tokens/s), a 20 ms decode step growing 5 % per running request.
PREFILL_S = 1e-4


def replica(url: str, *, in_flight: int = 0, limit: float = 8) -> ReplicaState:
    r = ReplicaState(url=url, healthy=True, in_flight=in_flight, scraped_at=NOW - 0.5)
    r.speed = SpeedEstimate(
        token_s=0.02, batch_slowdown=0.05, batch_limit=limit, prefill_s_per_token=PREFILL_S
    )
    r.speed.recent_tokens, r.speed.recent_finished = 1000.0, 10.0  # 100 tokens per request
    return r


def request(text: str, max_tokens: int = 100) -> RequestInfo:
    body_tokens = len(text.encode()) // BYTES_PER_TOKEN
    return RequestInfo(
        model="m",
        prompt_tokens=body_tokens,
        max_tokens=max_tokens,
        prefix=prefix_keys("m", text),
    )


def pick(policy: CostAware, replicas: list[ReplicaState], info: RequestInfo) -> ReplicaState:
    """One routing decision as the proxy makes it: pick, then record what was sent."""
    chosen = policy.pick(replicas, info)
    chosen.prefixes.record(info.prefix, NOW)
    return chosen


def policy(seed: int = 0) -> CostAware:
    return CostAware(random.Random(seed), clock=lambda: NOW)


def test_prefill_is_priced_for_the_tokens_not_cached() -> None:
    holder = replica("http://a:1")
    info = request(SYSTEM + "How do I restart a replica?")
    speed = Speed(token_s=0.02, batch_slowdown=0.05, batch_limit=8, prefill_s_per_token=PREFILL_S)
    before = request_cost(holder, info, speed, 100.0, NOW)
    holder.prefixes.record(prefix_keys("m", SYSTEM), NOW)
    after = request_cost(holder, info, speed, 100.0, NOW)
    cached = prefix_bytes(len(prefix_keys("m", SYSTEM))) / BYTES_PER_TOKEN
    assert before - after == pytest.approx(cached * PREFILL_S * PREFILL_WEIGHT, rel=1e-6)


def test_at_equal_load_the_replica_holding_the_prefix_wins() -> None:
    replicas = [replica(f"http://r{i}:1", in_flight=2) for i in range(4)]
    replicas[2].prefixes.record(prefix_keys("m", SYSTEM), NOW)
    for seed in range(20):
        chosen = policy(seed).pick(replicas, request(SYSTEM + f"question {seed}?"))
        assert chosen.url == "http://r2:1"


def test_the_prefix_holder_may_be_somewhat_busier() -> None:
    """1,700 cached tokens save 0.17 s of prefill, and as long again for every request
    running there (they stall while a prompt is computed): worth a request more of load."""
    holder, other = replica("http://a:1", in_flight=3), replica("http://b:1", in_flight=2)
    holder.prefixes.record(prefix_keys("m", SYSTEM), NOW)
    assert policy().pick([holder, other], request(SYSTEM + "next?")).url == "http://a:1"


def test_a_popular_prefix_spreads_when_its_replica_cannot_keep_up() -> None:
    """Requests of one prefix group arrive faster than they finish (none finishes here): they
    stay on the replica holding the prefix until its batch is full, then the queue term
    prices a place in line above recomputing the prefix elsewhere, and the group spreads.
    Each replica then keeps what it got (recorded at send), and no replica queues while
    another has room."""
    replicas = [replica(f"http://r{i}:1") for i in range(4)]
    p = policy(1)
    sent: Counter[str] = Counter()
    for i in range(32):
        chosen = pick(p, replicas, request(SYSTEM + f"user {i} asks something different?"))
        chosen.in_flight += 1
        sent[chosen.url] += 1
    assert len(sent) == 4, sent  # all four took part of the group
    assert max(sent.values()) <= 8 + 1, sent  # nobody queues more than one while others had room
    # and it really stuck first: the first replica got a full batch before the group spread
    first = max(sent, key=lambda u: sent[u])
    assert sent[first] >= 8


def test_a_request_without_a_shared_prefix_is_not_pushed_onto_a_busy_replica() -> None:
    """Only the first two blocks (a stock greeting, ~60 tokens) are cached on the busy replica;
    that saves a few milliseconds of prefill, far less than running next to 5 requests costs."""
    busy, idle = replica("http://busy:1", in_flight=5), replica("http://idle:1")
    greeting = "Hello! You are a helpful assistant. Please answer the question below. " * 4
    busy.prefixes.record(prefix_keys("m", greeting[: 2 * BLOCK_BYTES]), NOW)
    info = request(greeting[: 2 * BLOCK_BYTES] + "Unrelated long document. " * 300)
    assert busy.prefixes.cached_tokens(info.prefix) > 0
    for seed in range(10):
        assert policy(seed).pick([busy, idle], info).url == "http://idle:1"


def test_trust_scales_the_saving() -> None:
    holder, other = replica("http://a:1", in_flight=3), replica("http://b:1", in_flight=2)
    holder.prefixes.record(prefix_keys("m", SYSTEM), NOW)
    info = request(SYSTEM + "next?")
    assert policy().pick([holder, other], info).url == "http://a:1"
    holder.prefixes.trust = 0.1  # its counters showed it keeps little of what we predicted
    assert policy().pick([holder, other], info).url == "http://b:1"


def test_caching_a_prefix_a_second_time_is_priced() -> None:
    """Computing a prefix that another replica holds copies it into a second cache, evicting
    another group there: priced as much again as its prefill (DUPLICATE_WEIGHT). A prefix no
    replica holds costs nothing extra anywhere."""
    speed = Speed(token_s=0.02, batch_slowdown=0.05, batch_limit=8, prefill_s_per_token=PREFILL_S)
    info = request(SYSTEM + "status?")
    other = replica("http://b:1")
    base = request_cost(other, info, speed, 100.0, NOW)
    held = prefix_bytes(len(prefix_keys("m", SYSTEM))) / BYTES_PER_TOKEN
    copied = request_cost(other, info, speed, 100.0, NOW, held_elsewhere=held)
    assert copied - base == pytest.approx(
        held * PREFILL_S * PREFILL_WEIGHT * DUPLICATE_WEIGHT, rel=1e-6
    )
    assert request_cost(other, info, speed, 100.0, NOW, held_elsewhere=0.0) == base


def test_the_holder_keeps_its_group_at_a_load_the_prefill_alone_would_give_away() -> None:
    """Without the duplicate price the holder running seven requests loses the next to an idle
    replica, which then holds a copy; with it, the group stays where it is cached."""
    holder, idle = replica("http://a:1", in_flight=7), replica("http://b:1", in_flight=0)
    holder.prefixes.record(prefix_keys("m", SYSTEM), NOW)
    info = request(SYSTEM + "and now?")
    speed = Speed(token_s=0.02, batch_slowdown=0.05, batch_limit=8, prefill_s_per_token=PREFILL_S)
    cached = holder.prefixes.cached_tokens(info.prefix)
    without = [request_cost(r, info, speed, 100.0, NOW) for r in (holder, idle)]
    with_dup = [
        request_cost(r, info, speed, 100.0, NOW, held_elsewhere=cached) for r in (holder, idle)
    ]
    assert without[1] < without[0]  # the idle replica would take it and copy the prefix
    assert with_dup[0] < with_dup[1]
    assert policy().pick([holder, idle], info).url == "http://a:1"
