"""The vLLM V1 scheduler model with a hand-driven clock: no event loop, no sleeping."""

from __future__ import annotations

import pytest

from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.engine import (
    SimEngine,
    StepTiming,
    TokenEvent,
    kv_read_tokens,
    prefill_attention_pairs,
)

BLOCK = 16


def make_engine(**overrides: float) -> SimEngine:
    """An engine with the old law only (no per-token or attention cost) unless overridden."""
    config = SimConfig(
        max_num_seqs=int(overrides.pop("max_num_seqs", 4)),
        step_ms=overrides.pop("step_ms", 10.0),
        batch_slowdown=overrides.pop("batch_slowdown", 0.1),
        prefill_ms_per_token=overrides.pop("prefill_ms_per_token", 0.0),
        attention_ms_per_ktoken=overrides.pop("attention_ms_per_ktoken", 0.0),
        prefill_attention_ms_per_mpair=overrides.pop("prefill_attention_ms_per_mpair", 0.0),
        kv_cache_tokens=int(overrides.pop("kv_cache_tokens", 1024)),
        max_model_len=int(overrides.pop("max_model_len", 512)),
        max_num_batched_tokens=int(overrides.pop("max_num_batched_tokens", 2048)),
        block_size=BLOCK,
    )
    assert not overrides
    return SimEngine.from_config(config)


def ids(start: int, count: int) -> list[int]:
    """`count` distinct token ids from `start` (two calls share ids only where ranges overlap)."""
    return list(range(start, start + count))


def run_until_idle(engine: SimEngine, clock: FakeClock, limit: int = 10_000) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    for _ in range(limit):
        if not engine.has_work():
            return events
        events += clock.step(engine)
    raise AssertionError("engine did not drain")


class FakeClock:
    """Advances by exactly each step's planned duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def step(self, engine: SimEngine, speed: float = 1.0) -> list[TokenEvent]:
        plan = engine.begin_step(self.now, speed)
        self.now += plan.duration
        return engine.end_step(self.now)


def test_running_never_exceeds_max_num_seqs_and_the_rest_waits() -> None:
    engine = make_engine(max_num_seqs=3)
    for i in range(7):
        engine.add(f"r{i}", prompt_tokens=5, max_tokens=100, now=0.0)
    plan = engine.begin_step(0.0)
    assert plan.batch_size == 3
    assert len(engine.running) == 3
    assert len(engine.waiting) == 4
    assert len(engine.end_step(plan.duration)) == 3
    assert engine.stats.max_running_seen == 3


def test_admission_and_completion_follow_arrival_order() -> None:
    engine = make_engine(max_num_seqs=2)
    for i in range(5):
        engine.add(f"r{i}", prompt_tokens=1, max_tokens=2, now=float(i) / 1000)
    clock = FakeClock()
    finished: list[str] = []
    for _ in range(20):
        finished += [e.seq.request_id for e in clock.step(engine) if e.finished]
        if not engine.has_work():
            break
    assert finished == ["r0", "r1", "r2", "r3", "r4"]


def test_step_time_law_keeps_the_old_flags_for_short_decodes() -> None:
    timing = StepTiming(step_ms=20.0, batch_slowdown=0.05, prefill_ms_per_token=0.5)
    assert timing.duration(1, 0, 1.0) == pytest.approx(0.021 + 0.0005)
    assert timing.duration(10, 0, 1.0) == pytest.approx(0.030 + 0.005)
    assert timing.duration(10, 0, 0.5) == pytest.approx(2 * (0.030 + 0.005))
    assert timing.duration(1, 100, 1.0) == pytest.approx(0.021 + 0.0505)


def test_step_time_grows_with_the_context_so_it_is_not_a_function_of_the_batch_size() -> None:
    """Same batch size, longer contexts: a longer step (the balancer's a*(1+b*n) cannot say so)."""
    timing = StepTiming(
        step_ms=10.0, batch_slowdown=0.05, prefill_ms_per_token=0.01, attention_ms_per_ktoken=0.5
    )
    short = timing.step_duration(8, 8, kv_read=8 * 100, speed=1.0)
    long = timing.step_duration(8, 8, kv_read=8 * 3000, speed=1.0)
    assert long - short == pytest.approx(0.5 * (24.0 - 0.8) / 1000)
    assert kv_read_tokens(computed=99, tokens=1) == 100  # a decode reads its context


def test_a_prefill_pays_for_its_attention_pairs_so_a_cached_prefix_still_costs_a_little() -> None:
    engine = make_engine(prefill_attention_ms_per_mpair=1000.0, batch_slowdown=0.0)
    prompt = ids(1, 256)
    clock = FakeClock()
    engine.add("cold", len(prompt), 1, 0.0, prompt_token_ids=prompt)
    cold = engine.begin_step(0.0)
    clock.now += cold.duration
    engine.end_step(clock.now)
    run_until_idle(engine, clock)
    engine.add("warm", len(prompt), 1, clock.now, prompt_token_ids=prompt)
    warm = engine.begin_step(clock.now)
    assert cold.prefill_pairs == prefill_attention_pairs(0, 256) == 256 * 257 // 2
    assert warm.prefill_pairs == prefill_attention_pairs(240, 16) == 16 * 240 + 16 * 17 // 2
    assert cold.duration == pytest.approx(0.010 + cold.prefill_pairs / 1e6)
    assert warm.duration == pytest.approx(0.010 + warm.prefill_pairs / 1e6)
    assert warm.kv_read == cold.kv_read == 0  # prefills are priced by pairs, decodes by reads


def test_plan_charges_prefill_only_in_the_admission_step() -> None:
    engine = make_engine(step_ms=10.0, batch_slowdown=0.0, prefill_ms_per_token=1.0)
    engine.add("a", prompt_tokens=30, max_tokens=3, now=0.0)
    first = engine.begin_step(0.0)
    engine.end_step(first.duration)
    second = engine.begin_step(first.duration)
    assert first.duration == pytest.approx(0.040)
    assert second.duration == pytest.approx(0.011)
    assert first.prefill_tokens == 30
    assert second.prefill_tokens == 0
    assert second.admitted == ()


def test_a_long_prompt_is_prefilled_in_chunks_while_running_requests_keep_decoding() -> None:
    engine = make_engine(max_num_batched_tokens=64, max_model_len=256)
    engine.add("short", prompt_tokens=4, max_tokens=20, now=0.0)
    clock = FakeClock()
    clock.step(engine)
    engine.add("long", prompt_tokens=150, max_tokens=2, now=clock.now)
    chunks: list[int] = []
    for _ in range(3):
        plan = engine.begin_step(clock.now)
        assert plan.scheduled[0] == (engine.running["short"], 1)  # decode goes first
        chunks.append(plan.scheduled[1][1])
        clock.now += plan.duration
        events = engine.end_step(clock.now)
        assert events[0].seq.request_id == "short"
    assert chunks == [63, 63, 24]
    assert engine.running["long"].first_token_at == clock.now


@pytest.mark.parametrize("max_tokens", [1, 2, 17])
def test_a_request_gets_exactly_max_tokens(max_tokens: int) -> None:
    engine = make_engine()
    engine.add("a", prompt_tokens=3, max_tokens=max_tokens, now=0.0)
    clock = FakeClock()
    events: list[TokenEvent] = []
    while engine.has_work():
        events += clock.step(engine)
    assert [e.index for e in events] == list(range(max_tokens))
    assert [e.finished for e in events] == [False] * (max_tokens - 1) + [True]
    assert events[-1].seq.finish_reason == "length"
    assert engine.stats.tokens_generated == max_tokens
    assert engine.stats.finished == 1


def test_abort_frees_the_slot_for_the_next_waiting_request() -> None:
    engine = make_engine(max_num_seqs=1)
    engine.add("a", prompt_tokens=1, max_tokens=50, now=0.0)
    engine.add("b", prompt_tokens=1, max_tokens=50, now=0.0)
    clock = FakeClock()
    clock.step(engine)
    aborted = engine.abort("a", clock.now)
    assert aborted is not None
    assert aborted.finish_reason == "abort"
    assert not engine.running
    events = clock.step(engine)
    assert [e.seq.request_id for e in events] == ["b"]
    assert engine.stats.aborted == 1


def test_a_request_aborted_mid_step_gets_no_token() -> None:
    engine = make_engine()
    engine.add("a", prompt_tokens=1, max_tokens=5, now=0.0)
    engine.add("b", prompt_tokens=1, max_tokens=5, now=0.0)
    plan = engine.begin_step(0.0)
    engine.abort("a", 0.001)
    events = engine.end_step(plan.duration)
    assert [e.seq.request_id for e in events] == ["b"]


def test_abort_of_a_finished_or_unknown_request_is_a_no_op() -> None:
    engine = make_engine()
    engine.add("a", prompt_tokens=1, max_tokens=1, now=0.0)
    FakeClock().step(engine)
    assert engine.abort("a", 1.0) is None
    assert engine.abort("nope", 1.0) is None
    assert engine.stats.aborted == 0


def test_waiting_request_can_be_aborted() -> None:
    engine = make_engine(max_num_seqs=1)
    engine.add("a", prompt_tokens=1, max_tokens=5, now=0.0)
    engine.add("b", prompt_tokens=1, max_tokens=5, now=0.0)
    FakeClock().step(engine)
    assert engine.abort("b", 0.1) is not None
    assert not engine.waiting


def test_stats_add_up() -> None:
    engine = make_engine(max_num_seqs=2)
    for i in range(4):
        engine.add(f"r{i}", prompt_tokens=2, max_tokens=3, now=0.0)
    engine.record_failed()
    clock = FakeClock()
    clock.step(engine)
    engine.abort("r3", clock.now)
    clock.step(engine)
    s = engine.stats
    assert s.received == 5
    assert s.received == s.finished + s.aborted + s.failed + len(engine.running) + len(
        engine.waiting
    )


def test_a_chunked_prompt_caches_its_blocks_chunk_by_chunk() -> None:
    engine = make_engine(max_num_batched_tokens=40, max_model_len=256)
    prompt = ids(300, 150)
    clock = FakeClock()
    engine.add("a", len(prompt), 1, 0.0, prompt_token_ids=prompt)
    plan = engine.begin_step(0.0)
    assert engine.pool.num_cached == 40 // BLOCK  # only what the first chunk filled
    clock.now += plan.duration
    engine.end_step(clock.now)
    run_until_idle(engine, clock)
    engine.add("b", len(prompt), 1, clock.now, prompt_token_ids=prompt)
    assert engine.begin_step(clock.now).cache_hits == 144


def test_kv_cache_usage_counts_the_blocks_requests_hold() -> None:
    engine = make_engine(kv_cache_tokens=160, max_model_len=160)
    engine.add("a", prompt_tokens=10, max_tokens=50, now=0.0)
    assert engine.kv_cache_usage() == 0.0
    clock = FakeClock()
    clock.step(engine)
    clock.step(engine)
    assert engine.kv_cache_usage() == pytest.approx(0.1)  # 11 tokens: 1 block of 10
    for _ in range(6):
        clock.step(engine)
    assert engine.kv_cache_usage() == pytest.approx(0.2)  # 17 tokens: 2 blocks


def test_a_shared_prefix_is_computed_once_and_counted_as_a_hit() -> None:
    engine = make_engine(prefill_ms_per_token=1.0)
    system = ids(1000, 100)
    clock = FakeClock()
    engine.add("a", 110, 2, clock.now, prompt_token_ids=[*system, *ids(1, 10)])
    first = engine.begin_step(clock.now)
    clock.now += first.duration
    engine.end_step(clock.now)
    run_until_idle(engine, clock)
    engine.add("b", 120, 2, clock.now, prompt_token_ids=[*system, *ids(500, 20)])
    second = engine.begin_step(clock.now)
    assert first.cache_queries == 110
    assert first.cache_hits == 0
    assert second.cache_hits == 96  # 6 full blocks of the 100 shared tokens
    assert second.prefill_tokens == 120 - 96
    assert second.duration < first.duration
    assert engine.stats.prefix_cache_queries == 230
    assert engine.stats.prefix_cache_hits == 96


def test_the_last_prompt_token_is_always_computed() -> None:
    engine = make_engine()
    prompt = ids(7, 3 * BLOCK)
    clock = FakeClock()
    engine.add("a", len(prompt), 1, 0.0, prompt_token_ids=prompt)
    run_until_idle(engine, clock)
    engine.add("b", len(prompt), 1, clock.now, prompt_token_ids=prompt)
    plan = engine.begin_step(clock.now)
    assert plan.cache_hits == 2 * BLOCK
    assert plan.prefill_tokens == BLOCK


def test_freed_blocks_are_evicted_least_recently_used_first() -> None:
    """Room for 8 blocks; prompts of 3 full blocks (+1 token) take 4 while they run."""
    engine = make_engine(kv_cache_tokens=8 * BLOCK, max_model_len=4 * BLOCK)
    clock = FakeClock()
    prompts = {name: ids(10_000 * (i + 1), 3 * BLOCK + 1) for i, name in enumerate("abc")}

    def run(name: str, request_id: str) -> int:
        prompt = prompts[name]
        engine.add(request_id, len(prompt), 1, clock.now, prompt_token_ids=prompt)
        plan = engine.begin_step(clock.now)
        clock.now += plan.duration
        engine.end_step(clock.now)
        run_until_idle(engine, clock)
        return plan.cache_hits

    assert run("a", "a1") == 0
    assert run("b", "b1") == 0
    assert run("a", "a2") == 3 * BLOCK  # a was used again: b is now the oldest
    assert run("c", "c1") == 0  # needs 4 blocks: b's cached blocks go first
    assert run("a", "a3") == 3 * BLOCK
    assert run("b", "b2") < 3 * BLOCK
    assert engine.pool.num_cached <= 8


def test_a_full_kv_cache_preempts_the_newest_request_which_then_finishes_in_full() -> None:
    engine = make_engine(kv_cache_tokens=8 * BLOCK, max_model_len=6 * BLOCK, max_num_seqs=4)
    clock = FakeClock()
    for name in "abc":
        engine.add(name, 2 * BLOCK, 3 * BLOCK, 0.0)
    events = run_until_idle(engine, clock)
    counts = {name: sum(1 for e in events if e.seq.request_id == name) for name in "abc"}
    assert counts == {"a": 3 * BLOCK, "b": 3 * BLOCK, "c": 3 * BLOCK}
    assert engine.stats.preemptions >= 1
    assert engine.stats.finished == 3
    assert engine.pool.num_free == engine.num_blocks


def test_prefix_caching_can_be_turned_off() -> None:
    engine = SimEngine.from_config(SimConfig(enable_prefix_caching=False))
    clock = FakeClock()
    prompt = ids(1, 200)
    for request_id in ("a", "b"):
        engine.add(request_id, len(prompt), 1, clock.now, prompt_token_ids=prompt)
        run_until_idle(engine, clock)
    assert engine.stats.prefix_cache_hits == 0
    assert engine.stats.prefix_cache_queries == 400


def test_first_token_and_inter_token_timestamps() -> None:
    engine = make_engine(step_ms=10.0, batch_slowdown=0.0)
    engine.add("a", prompt_tokens=1, max_tokens=3, now=0.0)
    clock = FakeClock()
    first = clock.step(engine)[0]
    second = clock.step(engine)[0]
    assert first.inter_token is None
    assert first.seq.first_token_at == pytest.approx(0.010)
    assert second.inter_token == pytest.approx(0.010)


def test_a_request_that_can_never_fit_the_kv_cache_is_refused() -> None:
    engine = make_engine(kv_cache_tokens=4 * BLOCK, max_model_len=4 * BLOCK)
    with pytest.raises(ValueError, match="KV cache"):
        engine.add("a", prompt_tokens=3 * BLOCK, max_tokens=2 * BLOCK, now=0.0)


def test_misuse_is_rejected() -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add("a", prompt_tokens=1, max_tokens=0, now=0.0)
    engine.add("a", prompt_tokens=1, max_tokens=1, now=0.0)
    with pytest.raises(ValueError, match="already"):
        engine.add("a", prompt_tokens=1, max_tokens=1, now=0.0)
    engine.begin_step(0.0)
    with pytest.raises(RuntimeError):
        engine.begin_step(0.0)
