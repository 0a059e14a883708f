"""Is a replica fit for traffic: active checks, passive outcomes and a circuit breaker.

Two signals feed one record per replica:

- the active check (this module's loop) GETs /health every second; its last outcome is
  ``check_ok``. A failed check takes the replica out of rotation at once and a passing check
  puts it back at once, so a replica that is starting or restarting joins as soon as it is up.
  While a replica's answers are flowing it is checked only every MAX_UNCHECKED_S (check_due):
  its bytes already say it is up;
- passive outcomes of real traffic (the proxy calls record_success / record_failure).

Both kinds of failure count toward the breaker. After ``failure_threshold`` consecutive
failures (or one refused connection: nothing listens there, the process is gone) the breaker
OPENs and the replica is ejected even if /health still passes, which catches replicas whose
/health is fine but whose completions fail. After the cool-down the next active check is the
one HALF_OPEN probe: success closes the breaker, failure re-opens it for the same cool-down.
A failed probe costs nothing (it is one /health GET, no client traffic), so a replica that is
down keeps being probed every cool-down and is back in rotation about a second after it
answers again. Flapping is what the cool-down grows for: a replica ejected again within
``stable_s`` of its re-admission gets a doubled cool-down (capped), so one that passes /health
but keeps failing requests is re-admitted less and less often.

``healthy`` is kept equal to ``breaker is CLOSED and check_ok`` by every transition here.
The transitions are pure functions of (state, outcome, now) so they are tested with explicit
times; the only I/O is check_replica and the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from vllm_fleet.router.bounded_read import within
from vllm_fleet.router.replica_tasks import ReplicaTasks
from vllm_fleet.router.state import Breaker, Fleet, ReplicaState
from vllm_fleet.router.upstream_client import ConnectFailed, UpstreamClient

log = logging.getLogger("vllm_fleet.router")

#: Refresh the model list this often, in seconds (aliases / LoRA adapters change).
MODELS_REFRESH_S = 30.0
#: A replica whose answers are flowing is still checked at least this often, in seconds.
MAX_UNCHECKED_S = 10.0
#: Cap on the /v1/models body: it lists a handful of ids, never megabytes.
MAX_MODELS_BYTES = 1 << 20
#: Cap on the /health body (vLLM's is empty).
MAX_HEALTH_BYTES = 64 << 10
#: Exponent cap for the doubling cool-down: a replica dead for days re-opens thousands of
#: times, and 2.0**1024 overflows. max_cooldown_s caps the value long before this matters.
MAX_STREAK_EXPONENT = 32


@dataclass(frozen=True)
class BreakerPolicy:
    """When to eject a replica and when to try it again."""

    #: Consecutive failures (active or passive) that open the breaker.
    failure_threshold: int = 3
    #: First OPEN -> HALF_OPEN cool-down; doubles on every re-ejection soon after a
    #: re-admission (flapping), not on failed probes. Short, so a restarted replica is used
    #: again about a second after it is up.
    cooldown_s: float = 1.0
    #: Upper bound on the doubled cool-down.
    max_cooldown_s: float = 60.0
    #: A replica that stayed CLOSED this long and then fails starts again from cooldown_s.
    stable_s: float = 60.0
    #: A refused connection (nothing listening) opens the breaker at once.
    eject_on_refused: bool = True
    #: Most of the fleet (percent, at least one replica) that failed requests may eject at
    #: once (vllm_fleet.router.outliers.may_eject). Refused connections and failed checks are not
    #: capped: such a replica cannot answer anyway.
    max_ejection_percent: float = 50.0


def _sync_healthy(r: ReplicaState) -> None:
    r.healthy = r.breaker is Breaker.CLOSED and r.check_ok


def _open(r: ReplicaState, now: float, policy: BreakerPolicy, *, streak: int) -> None:
    r.breaker = Breaker.OPEN
    r.opened_at = now
    r.open_streak = streak
    cap = max(policy.max_cooldown_s, policy.cooldown_s)
    r.cooldown_s = min(policy.cooldown_s * 2.0 ** min(streak, MAX_STREAK_EXPONENT), cap)
    _sync_healthy(r)


def _close(r: ReplicaState, now: float) -> None:
    r.breaker = Breaker.CLOSED
    r.closed_at = now
    r.consecutive_failures = 0
    r.prefixes.clear()  # out long enough to be ejected: assume it restarted with an empty cache
    _sync_healthy(r)
    log.info("replica breaker closed url=%s ejections=%d", r.url, r.ejections)


def record_success(r: ReplicaState, now: float) -> None:
    """A request succeeded on ``r``: the consecutive-failure count starts over.

    Only counts while CLOSED. In OPEN or HALF_OPEN it is a request sent before the ejection
    finishing late; only the probe after the cool-down (apply_check) may re-admit the replica.
    """
    if r.breaker is Breaker.CLOSED:
        r.consecutive_failures = 0
        r.last_failure_at = 0.0


def record_failure(
    r: ReplicaState,
    now: float,
    policy: BreakerPolicy,
    *,
    refused: bool = False,
    may_eject: bool = True,
) -> bool:
    """A request (or a check of a replica that was up) failed; True when this ejected ``r``.

    Failures count as consecutive unless the previous one is more than ``policy.stable_s``
    old: two failures an hour apart with no traffic in between are not a streak.
    ``refused`` marks a refused connection: with ``policy.eject_on_refused`` it ejects at once,
    because nothing is listening and retrying the same replica is pointless.
    An ejection is a CLOSED -> OPEN transition and increments ``r.ejections``. In OPEN or
    HALF_OPEN the failure is a late result of a request sent before the ejection: ignored.
    ``may_eject`` False (the fleet's ejection cap is reached) keeps the count but not the
    ejection, except for a refused connection.
    """
    if r.breaker is not Breaker.CLOSED:
        return False
    if r.last_failure_at > 0.0 and now - r.last_failure_at > policy.stable_s:
        r.consecutive_failures = 0
    r.consecutive_failures += 1
    r.last_failure_at = now
    refused_now = refused and policy.eject_on_refused
    if r.consecutive_failures < policy.failure_threshold and not refused_now:
        return False
    if not (may_eject or refused_now):
        return False
    eject(r, now, policy, why=f"failures={r.consecutive_failures} refused={refused}")
    return True


def eject(r: ReplicaState, now: float, policy: BreakerPolicy, *, why: str) -> bool:
    """Open ``r``'s breaker now (a CLOSED -> OPEN transition); False when it was not CLOSED.

    Used by record_failure, and directly for a hung replica (vllm_fleet.router.progress) and a
    5xx-rate outlier (vllm_fleet.router.outliers), which need no streak of consecutive failures.
    """
    if r.breaker is not Breaker.CLOSED:
        return False
    recently_closed = r.closed_at > 0.0 and now - r.closed_at < policy.stable_s
    _open(r, now, policy, streak=r.open_streak + 1 if recently_closed else 0)
    r.ejections += 1
    log.warning(
        "replica ejected url=%s %s cooldown_s=%.1f ejections=%d",
        r.url,
        why,
        r.cooldown_s,
        r.ejections,
    )
    return True


def probe_due(r: ReplicaState, now: float) -> bool:
    """Should the active checker check ``r`` now? Not while OPEN and cooling down."""
    if r.breaker is Breaker.OPEN:
        return now - r.opened_at >= r.cooldown_s
    return True


def check_due(r: ReplicaState, now: float, interval_s: float) -> bool:
    """Should the active loop check ``r`` now? Not while OPEN and cooling down (probe_due),
    and not while traffic already shows it is up.

    A replica whose breaker is CLOSED, whose last check passed and which sent bytes of an
    answer within the last half ``interval_s`` is alive by the best evidence there is: a
    /health GET then costs CPU (a request and its answer every second per replica, about a
    third of an idle router's work) and tells nothing new. It is still checked every
    MAX_UNCHECKED_S. When its answers stop (a hang, a crash, no traffic), the checks resume at
    the next tick, at most half an interval later than they would have run: a hung replica's
    check still fails before the progress monitor has waited long for it
    (vllm_fleet.router.progress: its ejection waits for a failed check).
    """
    if not probe_due(r, now):
        return False
    flowing = (
        r.breaker is Breaker.CLOSED
        and r.check_ok
        and now - r.last_byte_at < interval_s / 2
        and now - r.checked_at < MAX_UNCHECKED_S
    )
    return not flowing


def begin_check(r: ReplicaState, now: float) -> None:
    """Move an OPEN breaker whose cool-down has passed to HALF_OPEN: this check is the probe."""
    if r.breaker is Breaker.OPEN and now - r.opened_at >= r.cooldown_s:
        r.breaker = Breaker.HALF_OPEN
        _sync_healthy(r)


def apply_check(
    r: ReplicaState, ok: bool, now: float, policy: BreakerPolicy, *, refused: bool = False
) -> None:
    """Apply one active check outcome (after begin_check) to the replica's state.

    In HALF_OPEN the check is the probe: a pass closes the breaker, a failure re-opens it for
    the same cool-down (not a new ejection: the replica was not in rotation, and a replica that
    is simply down should be re-admitted soon after it is back).
    A pass in CLOSED does not reset ``consecutive_failures``: /health passing says nothing
    about completions failing, and resetting on every 1 s check would hide passive failures.
    Failures before the replica ever passed a check mean "still starting" and do not count.
    """
    r.check_ok = ok
    if ok:
        r.ever_healthy = True
    if r.breaker is Breaker.HALF_OPEN:  # this check was the one probe
        if ok:
            _close(r, now)
        else:
            _open(r, now, policy, streak=r.open_streak)
            log.debug("replica probe failed url=%s cooldown_s=%.1f", r.url, r.cooldown_s)
    elif not ok and r.ever_healthy:
        record_failure(r, now, policy, refused=refused)
    _sync_healthy(r)


@dataclass(frozen=True)
class CheckOutcome:
    """Result of one active check: whether it passed, and how it failed (for the breaker)."""

    ok: bool
    refused: bool = False
    detail: str = ""


async def _get_json(client: UpstreamClient, base: str, path: str, timeout_s: float) -> Any:
    answer = await client.get(base, path, timeout_s, MAX_MODELS_BYTES)
    if answer.status != 200:
        raise _BadStatus(answer.status)
    return json.loads(answer.body)


class _BadStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _model_ids(payload: Any) -> frozenset[str]:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ValueError("/v1/models: expected an object with a 'data' list")
    ids = [m.get("id") for m in data if isinstance(m, dict)]
    return frozenset(i for i in ids if isinstance(i, str) and i)


def _model_parents(payload: Any) -> dict[str, str]:
    """LoRA adapters vLLM lists as models of their own, with the base model as ``parent``."""
    return {
        m["id"]: m["parent"]
        for m in payload["data"]
        if isinstance(m, dict) and isinstance(m.get("id"), str) and isinstance(m.get("parent"), str)
    }


async def _probe(client: UpstreamClient, r: ReplicaState, timeout_s: float) -> CheckOutcome:
    answer = await client.get(r.url, "/health", timeout_s, MAX_HEALTH_BYTES)
    if answer.status != 200:
        return CheckOutcome(False, detail=f"/health HTTP {answer.status}")
    now = time.monotonic()
    if not r.models or now - r.models_at >= MODELS_REFRESH_S:
        r.models_at = now
        payload = await _get_json(client, r.url, "/v1/models", timeout_s)
        models = _model_ids(payload)
        r.parents = _model_parents(payload)
        if not models:
            return CheckOutcome(False, detail="/v1/models lists no models")
        if models != r.models:
            log.info("replica models url=%s models=%s", r.url, ",".join(sorted(models)))
        r.models = models
    return CheckOutcome(True)


async def probe_replica(client: UpstreamClient, r: ReplicaState, timeout_s: float) -> CheckOutcome:
    """GET /health (and /v1/models when due); never raises except on cancellation.

    The model list is fetched when unknown and every MODELS_REFRESH_S; failing to
    fetch it fails the check, since a replica that cannot list its models cannot be routed to.
    Each request is bounded by ``timeout_s`` and the whole check by twice that.
    """
    try:
        return await within(_probe(client, r, timeout_s), timeout_s * 2)
    except (ConnectFailed, aiohttp.ClientConnectorError) as exc:
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        return CheckOutcome(False, refused=refused, detail=f"connect: {exc.os_error}")
    except asyncio.TimeoutError:
        return CheckOutcome(False, detail=f"timeout after {timeout_s:g}s")
    except _BadStatus as exc:
        return CheckOutcome(False, detail=f"/v1/models {exc}")
    except (aiohttp.ClientError, ValueError) as exc:
        return CheckOutcome(False, detail=f"{type(exc).__name__}: {exc}")


async def check_replica(client: UpstreamClient, r: ReplicaState, timeout_s: float) -> bool:
    """One active check of ``r``: True when /health (and /v1/models when due) answered 200."""
    return (await probe_replica(client, r, timeout_s)).ok


async def check_and_apply(
    fleet: Fleet,
    client: UpstreamClient,
    r: ReplicaState,
    *,
    timeout_s: float,
    breaker: BreakerPolicy,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Probe ``r`` (begin_check already done) and apply the outcome, unless ``r`` was removed.

    Logs the first failure of a streak (not every second) and every admission; ejections are
    logged by record_failure.
    """
    outcome = await probe_replica(client, r, timeout_s)
    if fleet.replicas.get(r.url) is not r:
        return  # removed (or replaced) by discovery while we were checking
    was_healthy = r.healthy
    apply_check(r, outcome.ok, clock(), breaker, refused=outcome.refused)
    if not outcome.ok and not r.check_error:
        log.warning(
            "replica check failed url=%s reason=%s breaker=%s",
            r.url,
            outcome.detail,
            r.breaker.value,
        )
    r.check_error = "" if outcome.ok else outcome.detail
    r.check_refused = outcome.refused
    r.checks_done += 1
    if r.healthy and not was_healthy:
        log.info("replica healthy url=%s models=%s", r.url, ",".join(sorted(r.models)))


async def check_round(
    fleet: Fleet,
    client: UpstreamClient,
    *,
    timeout_s: float,
    breaker: BreakerPolicy = BreakerPolicy(),
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Check every due replica once, concurrently, and return when all are done.

    Useful at startup (after discovery's first refresh) so the router is ready before the
    first health_loop tick, and in tests.
    """
    now = clock()
    due = [r for r in list(fleet.replicas.values()) if probe_due(r, now)]
    for r in due:
        begin_check(r, now)
    await asyncio.gather(
        *(
            check_and_apply(fleet, client, r, timeout_s=timeout_s, breaker=breaker, clock=clock)
            for r in due
        )
    )


async def health_loop(
    fleet: Fleet,
    client: UpstreamClient,
    *,
    interval_s: float = 1.0,
    timeout_s: float = 1.0,
    breaker: BreakerPolicy = BreakerPolicy(),
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Check every replica every ``interval_s`` forever; cancel the task to stop it.

    Each tick starts a check for every due replica that has none in progress, so a hanging
    replica (its check bounded by 2 x ``timeout_s``) never delays the others' checks. Replicas
    added or removed between ticks are picked up or dropped at the next tick.
    """
    running = ReplicaTasks("health check")
    try:
        while True:
            started = clock()
            for r in list(fleet.replicas.values()):
                if running.busy(r.url) or not check_due(r, started, interval_s):
                    continue
                r.checked_at = started
                begin_check(r, started)
                running.start(
                    r.url,
                    check_and_apply(
                        fleet, client, r, timeout_s=timeout_s, breaker=breaker, clock=clock
                    ),
                )
            await asyncio.sleep(max(0.0, interval_s - (clock() - started)))
    finally:
        await running.close()
