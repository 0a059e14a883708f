"""The batching model with a hand-driven clock: no event loop, no sleeping."""

from __future__ import annotations

import pytest

from launcher.sim.config import SimConfig
from launcher.sim.engine import SimEngine, StepTiming, TokenEvent


def make_engine(**overrides: float) -> SimEngine:
    config = SimConfig(
        max_num_seqs=int(overrides.pop("max_num_seqs", 4)),
        step_ms=overrides.pop("step_ms", 10.0),
        batch_slowdown=overrides.pop("batch_slowdown", 0.1),
        prefill_ms_per_token=overrides.pop("prefill_ms_per_token", 0.0),
        kv_cache_tokens=int(overrides.pop("kv_cache_tokens", 1000)),
    )
    assert not overrides
    return SimEngine.from_config(config)


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


def test_step_time_grows_with_the_batch_and_shrinks_with_speed() -> None:
    timing = StepTiming(step_ms=20.0, batch_slowdown=0.05, prefill_ms_per_token=0.5)
    assert timing.duration(1, 0, 1.0) == pytest.approx(0.021)
    assert timing.duration(10, 0, 1.0) == pytest.approx(0.030)
    assert timing.duration(10, 0, 0.5) == pytest.approx(0.060)
    assert timing.duration(1, 100, 1.0) == pytest.approx(0.021 + 0.050)


def test_plan_charges_prefill_only_in_the_admission_step() -> None:
    engine = make_engine(step_ms=10.0, batch_slowdown=0.0, prefill_ms_per_token=1.0)
    engine.add("a", prompt_tokens=30, max_tokens=3, now=0.0)
    first = engine.begin_step(0.0)
    engine.end_step(first.duration)
    second = engine.begin_step(first.duration)
    assert first.duration == pytest.approx(0.040)
    assert second.duration == pytest.approx(0.010)
    assert first.prefill_tokens == 30
    assert second.admitted == ()


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


def test_kv_cache_usage_counts_prompt_and_generated_tokens_of_running_requests() -> None:
    engine = make_engine(kv_cache_tokens=100)
    engine.add("a", prompt_tokens=10, max_tokens=50, now=0.0)
    assert engine.kv_cache_usage() == 0.0
    clock = FakeClock()
    clock.step(engine)
    clock.step(engine)
    assert engine.kv_cache_usage() == pytest.approx(0.12)
    engine.add("b", prompt_tokens=500, max_tokens=5, now=clock.now)
    clock.step(engine)
    assert engine.kv_cache_usage() == 1.0


def test_first_token_and_inter_token_timestamps() -> None:
    engine = make_engine(step_ms=10.0, batch_slowdown=0.0)
    engine.add("a", prompt_tokens=1, max_tokens=3, now=0.0)
    clock = FakeClock()
    first = clock.step(engine)[0]
    second = clock.step(engine)[0]
    assert first.inter_token is None
    assert first.seq.first_token_at == pytest.approx(0.010)
    assert second.inter_token == pytest.approx(0.010)


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
