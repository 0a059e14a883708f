"""Finding a hung replica from the requests it holds, and saving the requests it holds.

A GPU or NCCL hang leaves the replica's port open: connections are accepted and nothing is
ever answered. Health checks notice only when one times out (seconds), and the requests already
sent there would wait for --first-byte-timeout (minutes) although nothing has reached their
clients and each could simply be sent elsewhere.

The router knows every request it has in flight, so it sees the hang first:

- each attempt waiting for its first byte has a due time, from the router's own estimate of
  the request's time there (``first_byte_due_s``), padded generously;
- a replica is **suspect** when it owes bytes (an attempt is overdue, or a stream is running)
  and has sent nothing at all for ``SILENCE_S``, while some other replica is making progress
  (if every replica went quiet at once, the router itself or the network is the likelier
  cause, and nobody is blamed). A suspect gets no new request while another candidate is fine
  (vllm_fleet.router.state.Fleet.candidates);
- a suspect whose health check then fails, or that stays silent for ``STALL_EJECT_S`` while
  its peers progress (an engine hung behind an API server that still answers /health), is
  ejected, and every attempt waiting there for its first byte is abandoned: it is cancelled
  upstream and the request sent to another replica at once (router.upstream.send_once).

So a hung replica stops getting requests about ``SILENCE_S`` after it hangs, and loses none of
the requests it was holding. --first-byte-timeout stays the outer bound for everything else.
``review`` is pure (state and clock in, decisions out); ``progress_loop`` applies it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vllm_fleet.router.balancer import RequestInfo
from vllm_fleet.router.health import BreakerPolicy, eject
from vllm_fleet.router.state import Attempt, Breaker, Fleet, ReplicaState
from vllm_fleet.router.telemetry import Telemetry

log = logging.getLogger("vllm_fleet.router")

#: A replica that owes bytes and sent none for this long is silent. Healthy replicas with work
#: send a chunk every engine step (milliseconds to a few hundred ms).
SILENCE_S = 1.5
#: The first byte of a request is never due sooner than this after it was sent.
MIN_FIRST_BYTE_S = 2.0
#: Padding on the router's estimate of the time to the first byte.
DUE_FACTOR = 3.0
#: Seconds per generated token assumed before a replica's speed is learned: a slow decode step
#: of a busy batch, so an unmeasured replica is not blamed early.
UNKNOWN_STEP_S = 0.1
#: A suspect whose /health still passes is ejected after this long silent.
STALL_EJECT_S = 10.0
#: How often the monitor looks.
INTERVAL_S = 0.25


def first_byte_due_s(replica: ReplicaState, request: RequestInfo) -> float:
    """Seconds after sending by which ``request``'s first byte from ``replica`` is overdue.

    vLLM sends a stream's headers as soon as the request is accepted, before its prefill, so
    a stream's first byte is due after the floor alone. A non-streaming answer comes whole at
    the end of the generation: its estimate is prefill plus every decode step, at the
    replica's learned step time and batch slowdown with the batch it has now.
    """
    if request.stream:
        return MIN_FIRST_BYTE_S
    speed = replica.speed
    tokens = request.max_tokens if request.max_tokens is not None else 256
    step = speed.token_s if speed.token_s is not None else UNKNOWN_STEP_S
    batch = max(1, replica.in_flight)
    expected = request.prompt_tokens * speed.prefill_s_per_token + tokens * step * (
        1.0 + speed.batch_slowdown * batch
    )
    return MIN_FIRST_BYTE_S + DUE_FACTOR * expected


def owes_bytes(replica: ReplicaState, now: float) -> bool:
    """Is ``replica`` expected to be sending something right now?"""
    if replica.streams > 0:
        return True
    return any(a.due_at <= now for a in replica.awaiting)


def silent_for(replica: ReplicaState, now: float) -> float:
    """Seconds since any byte came from ``replica`` or, if later, its oldest waiting attempt
    was sent (a replica idle for an hour is not "silent" the moment it gets a request)."""
    since = replica.last_byte_at
    if replica.awaiting:
        since = max(since, min(a.sent_at for a in replica.awaiting))
    return now - since if since > 0.0 else 0.0


@dataclass(frozen=True)
class Verdict:
    """What the monitor decided for one replica this round."""

    suspect: bool
    #: Eject it now (its check failed while suspect, or it stayed silent too long).
    eject: bool
    #: Abandon its waiting attempts sent at or before this time (it is ejected or about to
    #: be); 0 = abandon none. Attempts sent later went there in panic mode, knowingly.
    abandon_before: float
    why: str = ""


def review(replica: ReplicaState, peers_progressing: bool, now: float) -> Verdict:
    """The monitor's decision for one replica (pure).

    ``peers_progressing``: some other replica sent a byte within SILENCE_S.
    """
    silent = silent_for(replica, now)
    suspect = peers_progressing and silent >= SILENCE_S and owes_bytes(replica, now)
    if replica.breaker is not Breaker.CLOSED:
        # Ejected (for any reason): what waited there for a first byte goes elsewhere.
        return Verdict(suspect, eject=False, abandon_before=replica.opened_at)
    if not suspect:
        return Verdict(False, eject=False, abandon_before=0.0)
    if not replica.check_ok:
        why = f"hung: silent {silent:.1f}s with requests overdue and its check failing"
        return Verdict(True, eject=True, abandon_before=now, why=why)
    if replica.suspect_since > 0.0 and now - replica.suspect_since >= STALL_EJECT_S:
        why = f"hung: silent {silent:.1f}s with requests overdue while peers progress"
        return Verdict(True, eject=True, abandon_before=now, why=why)
    return Verdict(True, eject=False, abandon_before=0.0)


def progressing(replica: ReplicaState, now: float) -> bool:
    return replica.last_byte_at > 0.0 and now - replica.last_byte_at < SILENCE_S


def review_fleet(fleet: Fleet, breaker: BreakerPolicy, telemetry: Telemetry, now: float) -> None:
    """One round of the monitor over every replica: mark suspects, eject, abandon."""
    replicas = list(fleet.replicas.values())
    moving = [r for r in replicas if progressing(r, now)]
    for r in replicas:
        peers = any(p is not r for p in moving)
        verdict = review(r, peers, now)
        if verdict.suspect and not r.suspect:
            r.suspect_since = now
            log.warning(
                "replica suspect url=%s silent_s=%.1f awaiting=%d streams=%d",
                r.url,
                silent_for(r, now),
                len(r.awaiting),
                r.streams,
            )
        elif not verdict.suspect:
            r.suspect_since = 0.0
        r.suspect = verdict.suspect
        if verdict.eject and eject(r, now, breaker, why=verdict.why):
            telemetry.hung_ejections.inc()
        if verdict.abandon_before > 0.0 and r.awaiting:
            abandon_waiting(r, telemetry, verdict.abandon_before)
        if verdict.eject:
            cut_streams(r, telemetry)


def abandon_waiting(replica: ReplicaState, telemetry: Telemetry, sent_before: float) -> int:
    """Cancel the attempts waiting on ``replica`` for their first byte that were sent at or
    before ``sent_before``; returns how many."""
    count = _abandon(a for a in replica.awaiting if a.sent_at <= sent_before)
    if count:
        telemetry.abandoned.inc(count)
        log.warning("requests re-sent elsewhere url=%s count=%d", replica.url, count)
    return count


def cut_streams(replica: ReplicaState, telemetry: Telemetry) -> int:
    """End every stream relayed from a replica found hung: nothing more will come, and each
    relay then continues the stream elsewhere or ends it with an SSE error
    (router.relay), instead of waiting --first-byte-timeout with its client."""
    count = _abandon(replica.relays)
    if count:
        telemetry.hung_streams_cut.inc(count)
        log.warning("streams cut on a hung replica url=%s count=%d", replica.url, count)
    return count


def _abandon(attempts: Iterable[Attempt]) -> int:
    """Abandon each of ``attempts`` not abandoned yet, once; returns how many."""
    chosen = [a for a in attempts if not a.abandoned]
    for attempt in chosen:
        attempt.abandoned = True
        attempt.abandon()
    return len(chosen)


async def progress_loop(
    fleet: Fleet,
    breaker: BreakerPolicy,
    telemetry: Telemetry,
    *,
    interval_s: float = INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Review the fleet every ``interval_s`` forever; cancel the task to stop it."""
    while True:
        review_fleet(fleet, breaker, telemetry, clock())
        await asyncio.sleep(interval_s)
