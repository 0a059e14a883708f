"""Which replica answers: the first pick, failover, the 500 rule, panic mode, and what the
client gets when every attempt failed.

A request may be retried on another replica only while nothing has reached the client;
non-streaming answers are read whole before anything is sent, so any failure up to their last
byte is retryable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from aiohttp import web
from multidict import CIMultiDict
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_none,
)

from vllm_fleet.router.balancer import RequestInfo
from vllm_fleet.router.context import RouterContext
from vllm_fleet.router.middleware import Exchange
from vllm_fleet.router.openai_errors import ApiError, error_response
from vllm_fleet.router.state import Fleet
from vllm_fleet.router.upstream import Reply, UpstreamFailure, send_once

#: Retry-After (seconds) sent with 503: about one health-check interval.
RETRY_AFTER_S = "1"


class ReplicasExhausted(Exception):
    """Every candidate replica was tried (fewer candidates than --max-attempts)."""

    def __init__(self, last: UpstreamFailure) -> None:
        super().__init__(str(last))
        self.last = last


def no_replica_error(fleet: Fleet, model: str | None) -> ApiError:
    """404 when no known replica serves ``model`` (and some are up to say so), else 503."""
    known = model is None or any(model in r.models for r in fleet.replicas.values())
    if not known and fleet.healthy():
        served = ", ".join(fleet.served_models())
        return ApiError(
            404,
            f"The model `{model}` does not exist. Served models: {served}.",
            param="model",
            code="model_not_found",
        )
    what = f"No healthy replica serving model `{model}`" if model else "No healthy replica"
    return ApiError(
        503,
        f"{what} is available right now; retry shortly.",
        code="no_healthy_replica",
        headers={"Retry-After": RETRY_AFTER_S},
    )


async def send_with_failover(
    ctx: RouterContext,
    exchange: Exchange,
    info: RequestInfo,
    path: str,
    headers: CIMultiDict[str],
    body: bytes,
    exclude: Sequence[str] = (),
) -> Reply:
    """Try up to --max-attempts different replicas; raise the last failure if all fail.

    The first attempt runs directly: it is the only one almost every request makes, and
    tenacity's bookkeeping costs ~20 us per request. Failover (attempts 2..N) is driven by
    tenacity, on a replica not tried yet each time, without waiting in between.

    A 5xx that is not a gateway status (500 above all) is most likely the request's own
    problem: it is retried on another replica, and once it has failed on two different
    replicas it is returned to the client (a poison request costs two attempts, never an
    ejection). When no other replica is left, the one that answered may take the retry
    (within --max-attempts): a replica failing some requests is still worth asking again.
    A replica suspected of hanging is not retried while one that answered is left. When no
    healthy replica is left, the least-bad ones are used (panic mode,
    vllm_fleet.router.state.Fleet.panic_candidates): 503 only when none is reachable at all.
    Attempts abandoned on a hung replica (reason "stalled") and connections a replica refused
    (nothing listens: a replica that just died) are not counted toward --max-attempts: the
    request was never answered, through no fault of its own, and the attempts left go to
    replicas that can answer. Both end: each replica is tried once, and only one that answered
    is asked again.
    """
    tried: list[str] = list(exclude)  # a continuation never goes back to a replica that broke
    failures: list[UpstreamFailure] = []

    async def attempt() -> Reply:
        answered_5xx = [f for f in failures if not f.gateway]
        if len({f.replica for f in answered_5xx}) >= 2:  # failed on two: the request's problem
            raise ReplicasExhausted(answered_5xx[-1])
        candidates = ctx.fleet.candidates(info.model, tried)
        if answered_5xx and all(r.suspect for r in candidates):
            # A replica that answered is fine next to one that owes bytes: a suspect gets no
            # retry either while the replica that answered may take it (below).
            candidates = []
        if not candidates:
            candidates = ctx.fleet.panic_candidates(info.model, tried, time.monotonic())
            if candidates:
                ctx.telemetry.panic_requests.inc()
        if not candidates and answered_5xx:
            # A replica that answered is reachable: the retry may go back to it.
            usable = ctx.fleet.candidates(info.model) or ctx.fleet.panic_candidates(
                info.model, (), time.monotonic()
            )
            candidates = [r for r in usable if r.url == answered_5xx[-1].replica]
        if not candidates:
            if not failures:
                raise no_replica_error(ctx.fleet, info.model)
            # The replica's own answer says more than a connection error elsewhere.
            raise ReplicasExhausted(answered_5xx[-1] if answered_5xx else failures[-1])
        replica = ctx.policy.pick(candidates, info)
        tried.append(replica.url)
        exchange.replica = replica.url
        exchange.attempts = len(tried)
        try:
            return await send_once(ctx, replica, path, headers, body, info)
        except UpstreamFailure as failure:
            failures.append(failure)
            raise

    def count_retry(state: RetryCallState) -> None:
        ctx.telemetry.retries.labels(failures[-1].reason).inc()

    try:
        return await attempt()
    except UpstreamFailure as failure:
        if ctx.config.max_attempts == 1 and not _free(failure):
            raise
        ctx.telemetry.retries.labels(failure.reason).inc()

    def spent(state: RetryCallState) -> bool:
        return sum(1 for f in failures if not _free(f)) >= ctx.config.max_attempts

    retrying = AsyncRetrying(
        stop=spent,
        retry=retry_if_exception_type(UpstreamFailure),
        wait=wait_none(),
        before_sleep=count_retry,
        reraise=True,
    )
    async for retry in retrying:
        with retry:
            return await attempt()
    raise AssertionError("unreachable: tenacity re-raises the last failure")


def _free(failure: UpstreamFailure) -> bool:
    """An attempt that does not count toward --max-attempts: no replica answered it."""
    return failure.reason == "stalled" or failure.refused


def failure_response(failure: UpstreamFailure, attempts: int) -> web.Response:
    """What the client gets when every attempt failed before answering."""
    if failure.reason == "status":
        if _is_openai_error(failure.body):
            return web.Response(
                status=failure.status,
                body=failure.body,
                headers={"Content-Type": failure.content_type},
            )
        return error_response(
            failure.status,
            f"The replica failed to answer this request (HTTP {failure.status}, "
            f"{attempts} attempt(s)).",
            code="upstream_error",
        )
    if failure.reason == "timeout":
        return error_response(
            504,
            f"No replica answered in time ({attempts} attempt(s)); "
            "the router's --first-byte-timeout bounds the wait.",
            code="upstream_timeout",
        )
    return error_response(
        502,
        f"Could not get an answer from a replica ({attempts} attempt(s); last: {failure.reason}).",
        code="upstream_unavailable",
    )


def _is_openai_error(body: bytes) -> bool:
    """Is ``body`` an OpenAI-style error object (``{"error": {...}}``, as vLLM sends)?"""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    if not isinstance(payload, dict):
        return False
    return isinstance(payload.get("error"), dict) or payload.get("object") == "error"
