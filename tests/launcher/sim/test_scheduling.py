"""The simulator honours vLLM's ``priority`` under ``--scheduling-policy priority``: the queue
is ordered by (priority, arrival) and a KV shortage preempts the lowest-priority request, as in
vLLM V1's scheduler; under fcfs the field changes nothing."""

from __future__ import annotations

import pytest

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.engine import SimEngine
from vllm_fleet.launcher.sim.protocol import ApiError, parse_chat


class FakeClock:
    """Advances by exactly each step's planned duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def step(self, engine: SimEngine) -> None:
        plan = engine.begin_step(self.now)
        self.now += plan.duration
        engine.end_step(self.now)


def make_engine(policy: str, max_num_seqs: int = 1, kv_cache_tokens: int = 1024) -> SimEngine:
    config = SimConfig(
        max_num_seqs=max_num_seqs,
        step_ms=10.0,
        kv_cache_tokens=kv_cache_tokens,
        max_model_len=min(256, kv_cache_tokens),
        block_size=16,
        scheduling_policy=policy,
    )
    return SimEngine.from_config(config)


def admission_order(policy: str) -> list[str]:
    """One slot; a running batch request, then two batch and two interactive arrivals."""
    engine = make_engine(policy)
    clock = FakeClock()
    engine.add("batch-0", 8, 4, clock.now, priority=10)
    clock.step(engine)  # batch-0 takes the only slot
    for name, priority in (("batch-1", 10), ("chat-1", 0), ("batch-2", 10), ("chat-2", 0)):
        engine.add(name, 8, 4, clock.now, priority=priority)
        clock.now += 0.001
    order = ["batch-0"]
    for _ in range(200):
        if not engine.has_work():
            break
        plan = engine.begin_step(clock.now)
        order += [seq.request_id for seq in plan.admitted]
        clock.now += plan.duration
        engine.end_step(clock.now)
    return order


def test_priority_policy_admits_interactive_requests_before_earlier_batch_ones() -> None:
    assert admission_order("priority") == ["batch-0", "chat-1", "chat-2", "batch-1", "batch-2"]


def test_fcfs_ignores_the_priority_field() -> None:
    assert admission_order("fcfs") == ["batch-0", "batch-1", "chat-1", "batch-2", "chat-2"]


def test_a_kv_shortage_preempts_the_lowest_priority_request_not_the_newest() -> None:
    # 8 blocks of 16 tokens: two requests growing to 80 tokens (5 blocks) each cannot both fit.
    engine = make_engine("priority", max_num_seqs=2, kv_cache_tokens=128)
    clock = FakeClock()
    engine.add("batch", 16, 64, clock.now, priority=10)
    engine.add("chat", 16, 64, clock.now + 0.001, priority=0)
    preempted: list[str] = []
    for _ in range(500):
        if not engine.has_work():
            break
        plan = engine.begin_step(clock.now)
        preempted += [seq.request_id for seq in plan.preempted]
        clock.now += plan.duration
        engine.end_step(clock.now)
    assert preempted and set(preempted) == {"batch"}
    assert not engine.has_work() and engine.stats.finished == 2


def test_fcfs_preempts_the_newest_request_whatever_its_priority() -> None:
    engine = make_engine("fcfs", max_num_seqs=2, kv_cache_tokens=128)
    clock = FakeClock()
    engine.add("batch", 16, 64, clock.now, priority=10)
    engine.add("chat", 16, 64, clock.now + 0.001, priority=0)
    preempted: list[str] = []
    for _ in range(500):
        if not engine.has_work():
            break
        plan = engine.begin_step(clock.now)
        preempted += [seq.request_id for seq in plan.preempted]
        clock.now += plan.duration
        engine.end_step(clock.now)
    assert preempted and set(preempted) == {"chat"}


def test_an_unknown_policy_is_a_config_error_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match="scheduling-policy"):
        SimConfig(scheduling_policy="lifo")


def test_the_body_priority_field_is_parsed_like_vllm() -> None:
    config = SimConfig()
    body = {"model": config.model, "messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat({**body, "priority": 10}, config).priority == 10
    assert parse_chat(body, config).priority == 0
    with pytest.raises(ApiError, match="priority"):
        parse_chat({**body, "priority": "low"}, config)
