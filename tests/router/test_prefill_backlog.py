"""The prefill backlog: prompt tokens sent to a replica and probably not computed yet drain at
the replica's measured prefill speed, and the cost policy sends a cold prompt past a replica
still prefilling the previous one (hand-built replica states, a settable clock)."""

from __future__ import annotations

import random

import pytest

from vllm_fleet.router.balancer import CostAware, RequestInfo
from vllm_fleet.router.prefill_backlog import (
    MAX_REPLICAS,
    PREFILL_S_PER_TOKEN_PRIOR,
    PrefillBacklog,
)
from vllm_fleet.router.speed import SpeedEstimate
from vllm_fleet.router.state import ReplicaState

NOW = 1000.0


def test_a_backlog_drains_at_the_replica_s_prefill_speed() -> None:
    backlog = PrefillBacklog()
    backlog.add("http://a:1", NOW, 1000.0, 1e-3)  # 1,000 tokens at 1,000 tokens/s
    assert backlog.ahead("http://a:1", NOW + 0.25) == pytest.approx(750.0)
    backlog.add("http://a:1", NOW + 0.25, 500.0, 1e-3)  # queued behind what is left
    assert backlog.ahead("http://a:1", NOW + 0.5) == pytest.approx(1000.0)
    assert backlog.ahead("http://a:1", NOW + 2.0) == 0.0
    assert backlog.ahead("http://b:1", NOW) == 0.0


def test_an_unmeasured_replica_drains_at_the_prior() -> None:
    backlog = PrefillBacklog()
    backlog.add("http://a:1", NOW, 1000.0, 0.0)
    drained = 0.05 / PREFILL_S_PER_TOKEN_PRIOR
    assert backlog.ahead("http://a:1", NOW + 0.05) == pytest.approx(1000.0 - drained)


def test_the_record_stays_bounded() -> None:
    backlog = PrefillBacklog()
    for i in range(MAX_REPLICAS + 10):
        backlog.add(f"http://r{i}:1", NOW + i, 10.0, 1e6)  # none drains within the loop
    assert len(backlog) == MAX_REPLICAS
    assert backlog.ahead(f"http://r{MAX_REPLICAS + 9}:1", NOW + MAX_REPLICAS + 9) == 10.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def replica(url: str) -> ReplicaState:
    """A measured replica running one request: 10 ms steps, 7,000 prompt tokens per second."""
    r = ReplicaState(url=url, healthy=True, in_flight=1, scraped_at=NOW - 0.5)
    r.speed = SpeedEstimate(token_s=0.01, prefill_s_per_token=1.4e-4, batch_limit=16)
    r.speed.recent_tokens, r.speed.recent_finished = 400.0, 10.0
    return r


COLD = RequestInfo(model="m", prompt_tokens=1600, max_tokens=40, stream=True)


def test_a_cold_prompt_goes_past_a_replica_still_prefilling_one() -> None:
    """Two replicas equally busy by count: right after one was sent a cold 1,600-token prompt
    (0.22 s of prefill), the next cold prompt goes to the other; once that prefill is done,
    either may get it again (ties are drawn at random)."""
    for seed in range(8):
        clock = Clock()
        policy = CostAware(random.Random(seed), clock=clock)
        a, b = replica("http://a:1"), replica("http://b:1")
        first = policy.pick([a, b], COLD)
        clock.now += 0.05
        second = policy.pick([a, b], COLD)
        assert second is not first
    later: set[str] = set()
    for seed in range(16):
        clock = Clock()
        policy = CostAware(random.Random(seed), clock=clock)
        a, b = replica("http://a:1"), replica("http://b:1")
        policy.pick([a, b], COLD)
        clock.now += 1.0
        later.add(policy.pick([a, b], COLD).url)
    assert later == {"http://a:1", "http://b:1"}
