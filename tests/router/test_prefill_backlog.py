"""The prefill backlog: prompt tokens sent to a replica and probably not computed yet drain at
the replica's measured prefill speed, and the cost policy sends a cold prompt past a replica
still prefilling the previous one (hand-built replica states, a settable clock)."""

from __future__ import annotations

import os
import random

import pytest

from vllm_fleet.router.balancer import CostAware, RequestInfo
from vllm_fleet.router.prefill_backlog import (
    MAX_REPLICAS,
    PREFILL_S_PER_TOKEN_PRIOR,
    PrefillBacklog,
)
from vllm_fleet.router.shared_board import Board
from vllm_fleet.router.speed import SpeedEstimate
from vllm_fleet.router.state import Fleet, ReplicaState
from vllm_fleet.router.worker import WorkerLink

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


def measure(r: ReplicaState) -> ReplicaState:
    """10 ms steps, 7,000 prompt tokens per second, learned."""
    r.healthy, r.scraped_at = True, NOW - 0.5
    r.speed = SpeedEstimate(token_s=0.01, prefill_s_per_token=1.4e-4, batch_limit=16)
    r.speed.recent_tokens, r.speed.recent_finished = 400.0, 10.0
    return r


def replica(url: str) -> ReplicaState:
    """A measured replica running one request."""
    return measure(ReplicaState(url=url, in_flight=1))


COLD = RequestInfo(model="m", prompt_tokens=1600, max_tokens=40, stream=True)
#: A request with no prompt to speak of: it leaves no backlog.
WARM = RequestInfo(model="m", prompt_tokens=0, max_tokens=40, stream=True)


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


def test_with_workers_each_backlog_holds_every_worker_s_prompts() -> None:
    """Two router workers, each with its own cost policy, their replica records counted in
    one shared board (--workers 2): right after worker 0 sent a cold prompt to one replica,
    worker 1 sends the next cold prompt to the other, as one router would."""
    for seed in range(8):
        board = Board.create(workers=2, slots=2)
        try:
            for url in ("http://a:1", "http://b:1"):
                slot = board.allocate(url)
                assert slot is not None
                board.publish(slot, {})
            links = [WorkerLink(Board.attach(board.path), i, os.getpid()) for i in range(2)]
            fleets = [Fleet(new_replica=link.new_replica) for link in links]
            clock = Clock()
            policies = [CostAware(random.Random(seed + i), clock=clock) for i in range(2)]
            for link, fleet in zip(links, fleets, strict=True):
                link.read()
                fleet.set_backends(["http://a:1", "http://b:1"])
                for r in fleet.replicas.values():
                    measure(r)
            views = [[f.replicas["http://a:1"], f.replicas["http://b:1"]] for f in fleets]
            policies[1].pick(views[1], WARM)  # worker 1 has picked before: its backlog exists
            clock.now += 0.05
            first = policies[0].pick(views[0], COLD)
            clock.now += 0.05
            second = policies[1].pick(views[1], COLD)
            assert second.url != first.url, seed
            for link in links:
                link.board.close()
        finally:
            board.close()


def test_a_peers_prompt_counts_from_when_it_was_heard_of() -> None:
    """Another router's prompt (``peer_prompt_sent``) joins the backlog with what is left of it
    since its counts arrived, not whole at this router's next pick: a router that picks seldom
    took a prompt prefilled half a second before for a fresh one."""
    backlog = PrefillBacklog()
    assert backlog.follow("http://a:1", NOW, 0, 1e-3) == 0.0  # the first call notes the counters
    # heard of 0.25 s ago, 1,000 tokens at 1,000 tokens/s: 750 are left
    left = backlog.follow("http://a:1", NOW + 0.5, 0, 1e-3, peer_sent=1000, peer_at=NOW + 0.25)
    assert left == pytest.approx(750.0)
    assert backlog.follow("http://a:1", NOW + 0.5, 0, 1e-3, peer_sent=1000) == pytest.approx(750.0)
    # one heard of 2 s ago is long prefilled; this router's own workers' sends count whole
    left = backlog.follow("http://a:1", NOW + 3.0, 400, 1e-3, peer_sent=2000, peer_at=NOW + 1.0)
    assert left == pytest.approx(400.0)


def test_a_peers_fresh_prompt_sends_the_next_cold_one_elsewhere_and_an_old_one_does_not() -> None:
    """Two replicas equally busy by count; another router's counts say it just sent a cold
    1,600-token prompt to one of them (0.22 s of prefill): this router sends the next cold
    prompt to the other. Heard of 1 s before this router's pick, the same prompt is prefilled
    and either replica may get the next one."""
    picked: dict[float, set[str]] = {0.05: set(), 1.0: set()}
    for heard_ago, urls in picked.items():
        for seed in range(16):
            clock = Clock()
            policy = CostAware(random.Random(seed), clock=clock)
            a, b = replica("http://a:1"), replica("http://b:1")
            policy.pick([a, b], WARM)  # this router has picked before: its backlogs exist
            clock.now += 2.0
            a.peer_prompt_sent, a.peer_prompt_at = 1600, clock.now - heard_ago
            urls.add(policy.pick([a, b], COLD).url)
    assert picked[0.05] == {"http://b:1"}
    assert picked[1.0] == {"http://a:1", "http://b:1"}
