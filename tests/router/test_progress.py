"""The progress monitor: a replica that owes bytes and says nothing is suspect, then ejected,
and what waited there for a first byte is abandoned (to be re-sent). Explicit clock."""

from __future__ import annotations

from vllm_fleet.router.balancer import RequestInfo
from vllm_fleet.router.health import BreakerPolicy, apply_check, record_failure
from vllm_fleet.router.progress import (
    MIN_FIRST_BYTE_S,
    SILENCE_S,
    STALL_EJECT_S,
    first_byte_due_s,
    review,
    review_fleet,
)
from vllm_fleet.router.state import Attempt, Breaker, Fleet, ReplicaState
from vllm_fleet.router.telemetry import Telemetry

POLICY = BreakerPolicy(failure_threshold=3, cooldown_s=5.0)


class Abandons:
    """Counts abandon() calls of the attempts it made."""

    def __init__(self) -> None:
        self.count = 0

    def attempt(self, sent_at: float, due_in: float = MIN_FIRST_BYTE_S) -> Attempt:
        def abandon() -> None:
            self.count += 1

        return Attempt(sent_at=sent_at, due_at=sent_at + due_in, abandon=abandon)


def fleet_of(n: int, now: float = 100.0) -> tuple[Fleet, list[ReplicaState]]:
    fleet = Fleet()
    fleet.set_backends([f"http://r{i}:1" for i in range(n)])
    replicas = list(fleet.replicas.values())
    for r in replicas:
        apply_check(r, True, now, POLICY)
        r.last_byte_at = now
    return fleet, replicas


def test_a_stream_is_due_at_once_a_whole_answer_after_its_generation() -> None:
    r = ReplicaState(url="http://a:1")
    r.speed.token_s = 0.02
    stream = first_byte_due_s(r, RequestInfo(model="m", max_tokens=1000, stream=True))
    whole = first_byte_due_s(r, RequestInfo(model="m", max_tokens=1000, stream=False))
    assert stream == MIN_FIRST_BYTE_S
    # 1000 steps of at least 20 ms: never overdue before the generation could have ended.
    assert whole >= 1000 * 0.02


def test_a_silent_replica_with_overdue_requests_is_suspect_while_peers_progress() -> None:
    abandons = Abandons()
    _, (hung, _ok) = fleet_of(2)
    hung.awaiting.add(abandons.attempt(100.0))
    now = 100.0 + MIN_FIRST_BYTE_S + 0.1
    assert review(hung, peers_progressing=True, now=now).suspect
    # Every replica quiet at once: the router or the network, not this replica.
    assert not review(hung, peers_progressing=False, now=now).suspect
    # Not overdue yet: not suspect.
    assert not review(hung, peers_progressing=True, now=100.0 + 1.0).suspect
    assert abandons.count == 0


def test_a_replica_with_a_running_stream_must_keep_sending() -> None:
    _, (r, _) = fleet_of(2)
    r.relays.add(Abandons().attempt(100.0, due_in=float("inf")))
    assert r.streams == 1
    assert not review(r, True, 100.0 + SILENCE_S / 2).suspect
    assert review(r, True, 100.0 + SILENCE_S + 0.01).suspect


def test_a_suspect_whose_check_fails_is_ejected_and_its_waiting_requests_abandoned() -> None:
    abandons = Abandons()
    fleet, (hung, ok) = fleet_of(2)
    telemetry = Telemetry(fleet)
    hung.awaiting.update({abandons.attempt(100.0), abandons.attempt(100.5)})
    now = 103.0
    ok.last_byte_at = now - 0.1
    review_fleet(fleet, POLICY, telemetry, now)
    assert hung.suspect and abandons.count == 0
    assert hung.healthy
    apply_check(hung, False, now + 0.5, POLICY)  # its /health timed out
    review_fleet(fleet, POLICY, telemetry, now + 0.6)
    assert hung.breaker is Breaker.OPEN
    assert abandons.count == 2
    assert telemetry.hung_ejections._value.get() == 1
    assert telemetry.abandoned._value.get() == 2
    review_fleet(fleet, POLICY, telemetry, now + 0.7)
    assert abandons.count == 2  # each attempt is abandoned once


def test_a_suspect_whose_health_still_passes_is_ejected_after_the_stall_limit() -> None:
    abandons = Abandons()
    fleet, (hung, ok) = fleet_of(2)
    telemetry = Telemetry(fleet)
    hung.awaiting.add(abandons.attempt(100.0))
    t = 103.0
    while t < 103.0 + STALL_EJECT_S + 1.0:
        ok.last_byte_at = t
        review_fleet(fleet, POLICY, telemetry, t)
        if hung.breaker is Breaker.OPEN:
            break
        t += 0.25
    assert hung.breaker is Breaker.OPEN
    assert t - 103.0 >= STALL_EJECT_S - 0.25
    assert abandons.count == 1


def test_an_ejected_replica_gives_up_what_waited_there_before_the_ejection_only() -> None:
    abandons = Abandons()
    fleet, (r, _ok) = fleet_of(2)
    telemetry = Telemetry(fleet)
    before = abandons.attempt(100.0, due_in=600.0)
    r.awaiting.add(before)
    record_failure(r, 101.0, POLICY, refused=True)  # ejected at 101
    panic = abandons.attempt(102.0, due_in=600.0)  # sent later, in panic mode
    r.awaiting.add(panic)
    review_fleet(fleet, POLICY, telemetry, 102.5)
    assert before.abandoned and not panic.abandoned
    assert abandons.count == 1
