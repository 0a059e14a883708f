"""Which failures eject a replica: gateway failures, 5xx-rate outliers, and the fleet cap."""

from __future__ import annotations

import pytest

from vllm_fleet.router.health import BreakerPolicy, apply_check, record_failure
from vllm_fleet.router.outliers import (
    MIN_VOLUME,
    error_rate,
    is_gateway_failure,
    is_outlier,
    may_eject,
    record_answer,
)
from vllm_fleet.router.state import Breaker, Fleet, ReplicaState

POLICY = BreakerPolicy(failure_threshold=3, cooldown_s=5.0)


def admitted(url: str) -> ReplicaState:
    r = ReplicaState(url=url)
    apply_check(r, True, 100.0, POLICY)
    return r


@pytest.mark.parametrize(
    ("reason", "status", "gateway"),
    [
        ("connect", 0, True),
        ("timeout", 0, True),
        ("disconnect", 0, True),
        ("stalled", 0, True),
        ("status", 502, True),
        ("status", 503, True),
        ("status", 504, True),
        ("status", 500, False),
        ("status", 501, False),
    ],
)
def test_only_gateway_failures_speak_about_the_replica(
    reason: str, status: int, gateway: bool
) -> None:
    assert is_gateway_failure(reason, status) is gateway


def test_error_rate_needs_volume_and_forgets_old_answers() -> None:
    r = admitted("http://a:1")
    for _ in range(int(MIN_VOLUME) - 1):
        record_answer(r.outcomes, 100.1, error=True)
    assert error_rate(r.outcomes, 100.1) is None  # too few answers to judge
    record_answer(r.outcomes, 100.1, error=True)
    assert error_rate(r.outcomes, 100.1) == pytest.approx(1.0)
    # A minute later the old errors weigh almost nothing: back under the volume needed.
    assert error_rate(r.outcomes, 160.0) is None


def test_a_replica_failing_most_requests_is_an_outlier_next_to_good_peers() -> None:
    bad, good = admitted("http://bad:1"), admitted("http://good:1")
    for i in range(20):
        record_answer(bad.outcomes, 100.0 + i * 0.01, error=i % 10 < 8)  # 80 % errors
        record_answer(good.outcomes, 100.0 + i * 0.01, error=False)
    assert is_outlier(bad, [bad, good], 100.3)
    assert not is_outlier(good, [bad, good], 100.3)


def test_a_replica_answering_seventy_percent_is_not_ejected() -> None:
    flaky, good = admitted("http://flaky:1"), admitted("http://good:1")
    for i in range(40):
        record_answer(flaky.outcomes, 100.0 + i * 0.01, error=i % 10 < 3)  # 30 % errors
        record_answer(good.outcomes, 100.0 + i * 0.01, error=False)
    assert not is_outlier(flaky, [flaky, good], 100.5)


def test_poison_requests_fail_every_replica_alike_so_none_is_an_outlier() -> None:
    replicas = [admitted(f"http://r{i}:1") for i in range(3)]
    for i in range(30):  # every replica answers the poison with a 500, like the others
        for r in replicas:
            record_answer(r.outcomes, 100.0 + i * 0.01, error=True)
    assert not any(is_outlier(r, replicas, 100.4) for r in replicas)


@pytest.mark.parametrize(
    ("ejected", "total", "percent", "allowed"),
    [
        (0, 3, 50.0, True),
        (1, 3, 50.0, False),  # floor(1.5) = 1
        (1, 4, 50.0, True),
        (2, 4, 50.0, False),
        (0, 1, 50.0, True),  # at least one replica may always be ejected
        (0, 2, 0.0, True),
        (1, 2, 100.0, True),
        (2, 2, 100.0, False),
    ],
)
def test_the_ejection_cap(ejected: int, total: int, percent: float, allowed: bool) -> None:
    assert may_eject(ejected, total, percent) is allowed


def test_a_capped_failure_keeps_its_count_but_does_not_eject() -> None:
    r = admitted("http://a:1")
    for t in (101.0, 102.0, 103.0):
        assert record_failure(r, t, POLICY, may_eject=False) is False
    assert r.breaker is Breaker.CLOSED
    assert r.consecutive_failures == 3
    # Once the cap allows it, the next failure ejects.
    assert record_failure(r, 104.0, POLICY, may_eject=True) is True


def test_a_refused_connection_ejects_even_past_the_cap() -> None:
    r = admitted("http://a:1")
    assert record_failure(r, 101.0, POLICY, refused=True, may_eject=False) is True


def test_panic_candidates_are_ejected_replicas_whose_check_passes() -> None:
    fleet = Fleet()
    fleet.set_backends(["http://a:1", "http://b:1", "http://c:1"])
    a, b, c = fleet.replicas.values()
    for r in (a, b, c):
        apply_check(r, True, 100.0, POLICY)
        r.models = frozenset({"m"})
    record_failure(a, 101.0, POLICY, refused=True)  # dead: refused, then its check fails
    apply_check(a, False, 101.5, POLICY, refused=True)
    record_failure(b, 101.0, POLICY, refused=True)  # ejected, but /health still answers
    apply_check(c, True, 101.0, POLICY)
    record_failure(c, 101.0, POLICY, refused=True)
    c.suspect = True  # hung: never a panic candidate
    assert fleet.candidates("m") == []
    assert fleet.panic_candidates("m") == [b]
    assert fleet.panic_candidates("other-model") == []
    assert fleet.ejected_count() == 3


def test_suspects_get_nothing_new_while_another_candidate_is_fine() -> None:
    fleet = Fleet()
    fleet.set_backends(["http://a:1", "http://b:1"])
    a, b = fleet.replicas.values()
    for r in (a, b):
        apply_check(r, True, 100.0, POLICY)
        r.models = frozenset({"m"})
    a.suspect = True
    assert fleet.candidates("m") == [b]
    b.suspect = True  # both suspect: no better choice, keep both
    assert fleet.candidates("m") == [a, b]


def test_when_every_check_fails_panic_mode_uses_replicas_that_sent_bytes_recently() -> None:
    """Every health check timing out at once (a starved router host) is no reason for a 503
    while replicas are streaming answers to us."""
    fleet = Fleet()
    fleet.set_backends(["http://a:1", "http://b:1", "http://c:1"])
    a, b, c = fleet.replicas.values()
    for r in (a, b, c):
        apply_check(r, True, 100.0, POLICY)
        r.models = frozenset({"m"})
        apply_check(r, False, 101.0, POLICY)  # timed out
    a.last_byte_at = 104.0  # still answering
    b.last_byte_at = 80.0  # silent for long
    c.last_byte_at = 104.5
    c.check_error = "connect: [Errno 111] Connect call failed"  # refused: nothing listens
    assert fleet.candidates("m") == []
    assert fleet.panic_candidates("m", (), now=105.0) == [a]
    assert fleet.panic_candidates("m", (), now=200.0) == []  # nothing recent: a real 503
    record_failure(a, 105.0, POLICY, refused=False)
    record_failure(a, 105.1, POLICY, refused=False)
    assert a.breaker is Breaker.OPEN  # ejected (a hung replica is): out of panic mode too
    assert fleet.panic_candidates("m", (), now=105.2) == []
