"""The speed estimator on synthetic counter series (pure: time comes with each sample)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import pytest

from vllm_fleet.router.speed import B_PRIOR, CounterSample, SpeedEstimate

#: The simulator's step model: 20 ms, +5% per running request.
A, B = 0.020, 0.05


@dataclass
class Engine:
    """Cumulative counters of a replica running ``batch`` requests for whole scrape intervals,
    with a step time of ``a * (1 + b * batch)`` (vLLM's meaning of each counter)."""

    a: float = A
    b: float = B
    at: float = 0.0
    tokens: float = 0.0
    itl_sum: float = 0.0
    itl_count: float = 0.0
    steps: float = 0.0
    finished: float = 0.0
    queue_s: float = 0.0
    queued: float = 0.0

    def run(self, batch: int, seconds: float = 1.0, *, request_tokens: float = 100.0) -> None:
        self.at += seconds
        if batch == 0:
            return
        step = self.a * (1 + self.b * batch)
        steps = seconds / step
        self.steps += steps
        self.tokens += steps * batch
        self.itl_count += steps * batch
        self.itl_sum += steps * batch * step
        self.finished += steps * batch / request_tokens

    def sample(self, running: float, waiting: float = 0.0) -> CounterSample:
        return CounterSample(
            at=self.at,
            running=running,
            waiting=waiting,
            generation_tokens=self.tokens,
            itl_sum=self.itl_sum,
            itl_count=self.itl_count,
            steps=self.steps,
            finished=self.finished,
            queue_s=self.queue_s,
            queued=self.queued,
        )


def feed(estimate: SpeedEstimate, engine: Engine, batches: list[int]) -> None:
    for batch in batches:
        engine.run(batch)
        estimate.observe(engine.sample(running=batch))


def varying_batches(count: int, seed: int = 1) -> list[int]:
    """Batch sizes as Poisson-ish load makes them: between 2 and 16, changing every second."""
    rng = random.Random(seed)
    return [rng.randint(2, 16) for _ in range(count)]


def test_nothing_is_known_before_two_scrapes() -> None:
    estimate = SpeedEstimate()
    assert estimate.step_s(4) is None
    engine = Engine()
    estimate.observe(engine.sample(running=0))
    assert estimate.token_s is None
    feed(estimate, engine, [4])
    assert estimate.step_s(4) == pytest.approx(A * (1 + B * 4), rel=0.05)


def test_converges_on_speed_and_batch_slowdown() -> None:
    estimate = SpeedEstimate()
    feed(estimate, (engine := Engine()), [0, *varying_batches(120)])
    assert estimate.token_s == pytest.approx(A, rel=0.05)
    assert estimate.batch_slowdown == pytest.approx(B, rel=0.25)
    for batch in (1, 8, 16):
        assert estimate.step_s(batch) == pytest.approx(A * (1 + B * batch), rel=0.03)
    assert estimate.tokens_per_request == pytest.approx(100.0, rel=0.01)
    assert engine.at == 121.0


def test_a_constant_batch_cannot_tell_slowdown_from_speed() -> None:
    """With the batch never changing the prior stays, and the speed fits at that batch."""
    estimate = SpeedEstimate()
    feed(estimate, Engine(), [0] + [10] * 60)
    assert estimate.batch_slowdown == pytest.approx(B_PRIOR, abs=0.005)
    assert estimate.step_s(10) == pytest.approx(A * (1 + B * 10), rel=0.02)


@pytest.mark.parametrize("batch_at_change", [4, 16])
def test_a_halving_of_speed_is_noticed_within_seconds(batch_at_change: int) -> None:
    estimate = SpeedEstimate()
    engine = Engine()
    feed(estimate, engine, [0, *varying_batches(60)])
    learned_b = estimate.batch_slowdown
    engine.a = 2 * A  # a noisy neighbour: every step now takes twice as long
    feed(estimate, engine, [batch_at_change] * 4)
    seen = (estimate.token_s or 0.0) / A
    assert seen >= 1.75, f"after 4 s the estimate moved only to x{seen:.2f}"
    feed(estimate, engine, varying_batches(6, seed=2))
    assert estimate.token_s == pytest.approx(2 * A, rel=0.05)  # within 10 s of the change
    # the change was not read as batch slowdown, even when it struck a full batch
    assert estimate.batch_slowdown == pytest.approx(learned_b, abs=0.01)


def test_idle_intervals_keep_what_was_learned() -> None:
    estimate = SpeedEstimate()
    feed(estimate, (engine := Engine()), [0, *varying_batches(30)])
    before = (estimate.token_s, estimate.batch_slowdown, estimate.observations)
    feed(estimate, engine, [0] * 20)  # no traffic: the counters stand still
    assert (estimate.token_s, estimate.batch_slowdown, estimate.observations) == before


def test_counters_going_backwards_mean_a_restart_and_start_over() -> None:
    estimate = SpeedEstimate()
    engine = Engine()
    feed(estimate, engine, [0, *varying_batches(30)])
    estimate.batch_limit = 16
    restarted = Engine(a=3 * A, at=engine.at + 5)  # counters back to zero, a slower engine
    estimate.observe(restarted.sample(running=0))
    assert estimate.token_s is None and estimate.batch_limit is None
    feed(estimate, restarted, [8, 8])
    assert estimate.step_s(8) == pytest.approx(3 * A * (1 + B * 8), rel=0.05)


def test_without_the_latency_histogram_speed_comes_from_tokens_per_second() -> None:
    estimate = SpeedEstimate()
    engine = Engine()
    for batch in [0] + [8] * 10:
        engine.run(batch)
        estimate.observe(replace(engine.sample(running=batch), itl_sum=None, itl_count=None))
    assert estimate.step_s(8) == pytest.approx(A * (1 + B * 8), rel=0.02)


def test_batch_limit_needs_requests_that_really_waited() -> None:
    estimate = SpeedEstimate()
    engine = Engine()
    feed(estimate, engine, [0, 4, 4])
    # a request caught between arrival and the next step: waiting, but for under a step
    engine.run(4)
    engine.queue_s, engine.queued = engine.queue_s + 0.005, engine.queued + 1
    estimate.observe(engine.sample(running=4, waiting=1))
    assert estimate.batch_limit is None
    # a full batch: requests waited many steps for a slot
    engine.run(16)
    engine.queue_s, engine.queued = engine.queue_s + 2.0, engine.queued + 3
    estimate.observe(engine.sample(running=16, waiting=3))
    assert estimate.batch_limit == 16
    # running more than that later (a KV-limited batch earlier, say) raises it
    feed(estimate, engine, [20])
    assert estimate.batch_limit == 20
    assert estimate.peak_running == 20


def test_waiting_behind_long_prefills_is_no_batch_limit() -> None:
    """Requests that waited while the engine prefilled long prompts waited for the step's
    token budget, not for a slot: with 3 running the replica has not shown a limit of 3. The
    same waits without that much prefill in the interval are a full batch."""
    estimate = SpeedEstimate()
    engine = Engine()
    feed(estimate, engine, [0, 3, 3])
    prefill_s = 0.0
    estimate.observe(replace(engine.sample(running=3), prefill_s=prefill_s))
    for _ in range(5):  # two requests waited 0.2 s each behind 0.5 s of cold prefills
        engine.run(3)
        engine.queue_s, engine.queued = engine.queue_s + 0.4, engine.queued + 2
        prefill_s += 0.5
        estimate.observe(replace(engine.sample(running=3, waiting=1), prefill_s=prefill_s))
    assert estimate.batch_limit is None
    engine.run(3)
    engine.queue_s, engine.queued = engine.queue_s + 0.4, engine.queued + 2
    prefill_s += 0.05  # only short prompts prefilled: the waits were for slots
    estimate.observe(replace(engine.sample(running=3, waiting=1), prefill_s=prefill_s))
    assert estimate.batch_limit == 3


def test_batch_limit_without_queue_times_needs_two_scrapes_of_waiting() -> None:
    estimate = SpeedEstimate()
    engine = Engine()
    feed(estimate, engine, [0, 8])

    def scrape(running: int, waiting: int) -> None:
        engine.run(running)
        sample = engine.sample(running=running, waiting=waiting)
        estimate.observe(replace(sample, queue_s=None, queued=None))

    scrape(8, 1)
    assert estimate.batch_limit is None
    scrape(8, 2)
    assert estimate.batch_limit == 8


def test_prefill_time_per_prompt_token_excludes_the_first_step() -> None:
    estimate = SpeedEstimate()
    engine = Engine()
    feed(estimate, engine, [0, 1, 1])
    base = engine.sample(running=1)
    # 10 requests, 1000 prompt tokens each: 0.5 ms per token plus their first step
    first_step = estimate.step_s(1) or math.nan
    estimate.observe(replace(base, prefill_s=0.0, prefill_prompt_tokens=0.0, prefill_requests=0))
    later = replace(
        base,
        at=base.at + 1,
        prefill_s=10 * (1000 * 0.0005 + first_step),
        prefill_prompt_tokens=10_000.0,
        prefill_requests=10,
    )
    estimate.observe(later)
    assert estimate.prefill_s_per_token == pytest.approx(0.0005, rel=0.01)


def test_prefill_time_is_per_computed_token_when_the_prefix_cache_hits() -> None:
    """vLLM counts cached prompt tokens in the prompt sum but spends no prefill time on them:
    the learned price is per token actually computed (prompt minus prefix-cache hits)."""
    estimate = SpeedEstimate()
    engine = Engine()
    feed(estimate, engine, [0, 1, 1])
    base = engine.sample(running=1)
    first_step = estimate.step_s(1) or math.nan
    zero = replace(
        base, prefill_s=0.0, prefill_prompt_tokens=0.0, prefill_requests=0, cached_tokens=0.0
    )
    estimate.observe(zero)
    # 10 requests of 1000 prompt tokens, 800 of each found cached: 200 computed at 0.5 ms
    later = replace(
        base,
        at=base.at + 1,
        prefill_s=10 * (200 * 0.0005 + first_step),
        prefill_prompt_tokens=10_000.0,
        prefill_requests=10,
        cached_tokens=8_000.0,
    )
    estimate.observe(later)
    assert estimate.prefill_s_per_token == pytest.approx(0.0005, rel=0.01)
