"""The adaptive in-flight limit, driven by a fake clock (one decision a window)."""

from __future__ import annotations

from vllm_fleet.launcher.batch.limit import (
    MAX_LAG_HOLDS,
    AdaptiveLimit,
    LimitSettings,
    QueueSignal,
    initial_limit,
)


def window(limit: AdaptiveLimit, now: float, *, in_flight: int | None = None) -> int:
    """One full window at the limit (or at `in_flight`), then the decision at `now`."""
    limit.on_start(limit.limit if in_flight is None else in_flight)
    return limit.update(now)


def test_no_decision_before_a_window_has_passed() -> None:
    limit = AdaptiveLimit(10, window_start=0.0, slow_start=False)
    limit.on_overload()
    assert limit.update(0.5) == 10
    assert limit.update(1.0) == 7  # 10 * 0.7


def test_slow_start_decides_every_half_second() -> None:
    limit = AdaptiveLimit(8, window_start=0.0)
    limit.on_queue(QueueSignal(waiting=0, replicas=1))
    assert window(limit, 0.25) == 8
    assert window(limit, 0.5) == 16


def test_overload_decreases_multiplicatively_down_to_the_minimum() -> None:
    limit = AdaptiveLimit(100, LimitSettings(min_limit=2), slow_start=False)
    for second in range(1, 20):
        limit.on_overload()
        limit.update(float(second))
    assert limit.limit == 2


def test_slow_start_doubles_until_the_queue_reaches_its_target() -> None:
    limit = AdaptiveLimit(8, window_start=0.0)
    limit.on_queue(QueueSignal(waiting=0, replicas=2))
    assert window(limit, 1.0) == 16
    assert window(limit, 2.0) == 32
    limit.on_queue(QueueSignal(waiting=10, replicas=2))  # target 4: too many waiting
    assert window(limit, 3.0) == 29  # 32 + (4 - 10) / 2
    assert not limit.slow_start


def lagging_fleet(capacity: int, lag_s: float, seconds: float, *, report_sent: bool) -> int:
    """Slow start against a fleet that runs `capacity` at once and whose view shows the
    requests as they were `lag_s` ago (a router's scrape, a loaded API server's parsing), the
    endpoint's own count of what it has out being current; the highest limit reached."""
    limit = AdaptiveLimit(16, window_start=0.0)
    history = [(0.0, 16)]
    highest = 16
    for step in range(1, int(seconds / 0.5) + 1):
        now = step * 0.5
        seen = next(n for t, n in reversed(history) if t <= max(0.0, now - lag_s))
        sent = float(limit.limit) if report_sent else None
        signal = QueueSignal(max(0, seen - capacity), 2, seen=float(seen), sent=sent)
        limit.on_queue(signal)
        highest = max(highest, window(limit, now))
        history.append((now, limit.limit))
    return highest


def test_slow_start_doubles_only_on_a_view_that_has_seen_what_was_sent() -> None:
    """Two real vLLM CPU replicas that run 256 between them went past 1,000 in flight when
    each half-second window doubled on a view 1-2 s old. Doubling only on a view that shows
    every request sent stops slow start within twice the fleet."""
    assert lagging_fleet(64, 1.5, 20.0, report_sent=False) >= 8 * 64  # the old rule
    assert lagging_fleet(64, 1.5, 20.0, report_sent=True) <= 2 * 64 + 4


def test_a_view_that_never_catches_up_ends_slow_start_by_counting_the_unseen_as_waiting() -> None:
    """A replica whose metrics never show running requests (seen stays 0): slow start does
    not hold for ever; after MAX_LAG_HOLDS windows the unseen requests count as queued, and
    slow start ends instead of doubling blind."""
    limit = AdaptiveLimit(32, window_start=0.0)
    for step in range(1, MAX_LAG_HOLDS + 2):
        limit.on_queue(QueueSignal(0.0, 2, seen=0.0, sent=float(limit.limit)))
        window(limit, step * 0.5)
    assert not limit.slow_start  # 32 unseen against a target of 4: slow start ended
    assert limit.limit == 40  # ... and the queue rule took over (+ a quarter: nothing waits)


def test_queue_rule_settles_where_the_engines_keep_the_target_queue() -> None:
    """A fleet that runs 32 at once: waiting = in flight - 32. The limit converges to 32 plus
    the target queue (2 per replica)."""
    limit = AdaptiveLimit(80, slow_start=False)
    for second in range(1, 30):
        limit.on_queue(QueueSignal(waiting=max(0, limit.limit - 32), replicas=2))
        window(limit, float(second))
    assert 35 <= limit.limit <= 37


def test_after_overload_the_limit_climbs_back_quickly_while_nothing_waits() -> None:
    """A fleet that runs 32 at once, the limit cut to 4 by a burst of 503s: idle engines (no
    queue) grow it by a quarter a window, then the queue rule settles it."""
    limit = AdaptiveLimit(4, slow_start=False)
    seconds = 0
    while limit.limit < 32 and seconds < 60:
        seconds += 1
        limit.on_queue(QueueSignal(waiting=max(0, limit.limit - 32), replicas=2))
        window(limit, float(seconds))
    assert seconds <= 12
    for more in range(30):
        limit.on_queue(QueueSignal(waiting=max(0, limit.limit - 32), replicas=2))
        window(limit, float(seconds + more + 1))
    assert 35 <= limit.limit <= 37


def test_an_unused_limit_is_held() -> None:
    limit = AdaptiveLimit(50, slow_start=False)
    limit.on_queue(QueueSignal(waiting=0, replicas=1))
    assert window(limit, 1.0, in_flight=10) == 50  # the input ran dry: no evidence
    assert window(limit, 2.0) > 50


def test_gradient_rule_shrinks_when_latency_per_token_grows_past_tolerance() -> None:
    limit = AdaptiveLimit(40, slow_start=False)
    for second in range(1, 4):
        limit.on_start(40)
        limit.on_done(latency_s=1.0, output_tokens=100)  # 10 ms a token
        limit.update(float(second))
    steady = limit.limit
    assert steady > 40  # no queueing: grows by sqrt(limit) steps
    for second in range(4, 8):
        limit.on_start(limit.limit)
        limit.on_done(latency_s=5.0, output_tokens=100)  # 5x slower: queueing
        limit.update(float(second))
    assert limit.limit < steady


def test_gradient_slow_start_stops_at_the_first_latency_rise() -> None:
    limit = AdaptiveLimit(4, window_start=0.0)
    limit.on_start(4)
    limit.on_done(1.0, 10)
    assert limit.update(1.0) == 8
    limit.on_start(8)
    limit.on_done(10.0, 10)
    limit.update(2.0)
    assert not limit.slow_start and limit.limit <= 8


def test_initial_limit_from_known_and_unknown_capacities() -> None:
    assert initial_limit([16.0, 16.0], queue_per_replica=2.0) == (36, False)
    assert initial_limit([16.0, None], queue_per_replica=2.0) == (32, True)
    assert initial_limit([], queue_per_replica=2.0) == (16, True)
