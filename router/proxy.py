"""Forwarding one API request: parse, pick a replica, send with failover, relay, record.

The rule that shapes this module: a request may be retried on another replica only while
nothing has reached the client. Non-streaming answers are read whole before anything is sent,
so any failure up to the last byte is retryable; a stream is committed when its headers are
relayed, and a failure after that ends the stream with an SSE error event instead.

Hot-path care: the request body is parsed once (model, stream, max_tokens) and forwarded as the
original bytes; stream chunks are relayed as they arrive without being parsed or buffered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_none,
)

from vllm_fleet.router.balancer import RequestInfo
from vllm_fleet.router.context import ROUTER, RouterContext
from vllm_fleet.router.continuation import Continuation, Refused
from vllm_fleet.router.continuation import prepare as prepare_continuation
from vllm_fleet.router.health import eject, record_failure, record_success
from vllm_fleet.router.middleware import REQUEST_ID, Exchange, exchange_of
from vllm_fleet.router.openai_errors import ApiError, error_response, sse_error_event
from vllm_fleet.router.outliers import is_gateway_failure, is_outlier, may_eject, record_answer
from vllm_fleet.router.prefix_index import request_prefix
from vllm_fleet.router.progress import first_byte_due_s
from vllm_fleet.router.state import Attempt, Fleet, ReplicaState
from vllm_fleet.router.telemetry import CLIENT_CLOSED

log = logging.getLogger("vllm_fleet.router")

#: RFC 9110 hop-by-hop headers: they describe one connection, never the end-to-end message.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Also not forwarded upstream: the client's credentials (replaced by --upstream-api-key), the
#: framing and host of the client's connection, and Accept-Encoding (chunks are relayed as they
#: come, uncompressed, so the stream is never held back by a compressor).
_DROP_UPSTREAM = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "accept-encoding",
    "expect",
    "x-request-id",
}
_DROP_DOWNSTREAM = HOP_BY_HOP | {"content-length", "date", "server", "x-request-id"}
#: Path under /v1/ that may be forwarded: plain segments, no "." / ".." and no encoded tricks.
_SEGMENT = r"(?!\.\.?(?:/|$))[A-Za-z0-9._~\-]+"
_TAIL_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
#: Rough bytes per prompt token, to estimate the prompt size without a tokenizer.
BYTES_PER_TOKEN = 4
#: Retry-After (seconds) sent with 503: about one health-check interval.
RETRY_AFTER_S = "1"


class UpstreamFailure(Exception):
    """One attempt failed before any byte reached the client, so another replica may take it.

    ``reason`` is one of telemetry.REASONS. For a 5xx answer the status and body are kept so
    that, when every attempt fails, the client gets the replica's own error.
    """

    def __init__(
        self,
        replica: str,
        reason: str,
        detail: str,
        *,
        refused: bool = False,
        status: int = 0,
        body: bytes = b"",
        content_type: str = "application/json",
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.replica = replica
        self.reason = reason
        self.detail = detail
        self.refused = refused
        self.status = status
        self.body = body
        self.content_type = content_type

    @property
    def gateway(self) -> bool:
        """Does this failure say the replica (not the request) is in trouble?
        (vllm_fleet.router.outliers)"""
        return is_gateway_failure(self.reason, self.status)


class ReplicasExhausted(Exception):
    """Every candidate replica was tried (fewer candidates than --max-attempts)."""

    def __init__(self, last: UpstreamFailure) -> None:
        super().__init__(str(last))
        self.last = last


@dataclass(slots=True)
class Reply:
    """A replica's answer we committed to. ``body`` is None for a stream still to relay."""

    replica: ReplicaState
    response: aiohttp.ClientResponse
    body: bytes | None


# -- parse -----------------------------------------------------------------------------------


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, within ``limit`` bytes and ``timeout_s`` seconds (--body-timeout)."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    try:
        if request.content.is_eof():  # the body came whole with the headers: no wait, no timer
            return await request.read()
        return await _read_bounded(request.read(), timeout_s)
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except asyncio.TimeoutError:
        raise ApiError(
            408,
            f"The request body did not arrive within {timeout_s:g} seconds "
            "(the router's --body-timeout).",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"Request body is larger than the router's limit of {limit} bytes "
        "(raise it with --max-body-bytes).",
        code="request_too_large",
    )


def parse_request(body: bytes, content_type: str) -> RequestInfo:
    """What the balancer needs from the body; the body itself is forwarded untouched.

    Multipart bodies (audio uploads) are not parsed: they go to any healthy replica.
    """
    prompt_tokens = len(body) // BYTES_PER_TOKEN
    if content_type.startswith("multipart/"):
        return RequestInfo(model=None, prompt_tokens=prompt_tokens)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json"
        ) from None
    except RecursionError:  # "[[[[...": the C decoder recurses once per level
        raise ApiError(
            400, "The JSON body of your request is nested too deeply.", code="invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400, "You must provide a model parameter (a non-empty string).", param="model"
        )
    max_tokens = payload.get("max_tokens", payload.get("max_completion_tokens"))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        max_tokens = None
    return RequestInfo(
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=payload.get("stream") is True,
        prefix=request_prefix(model, payload),
    )


def forward_path(request: web.Request) -> str:
    """``/v1/<tail>[?query]`` to send upstream; anything but plain path segments is a 404."""
    tail = request.match_info["tail"]
    if not _TAIL_RE.fullmatch(tail):
        raise ApiError(404, f"Unknown API path {request.path!r}.", code="not_found")
    query = request.rel_url.raw_query_string
    return f"/v1/{tail}?{query}" if query else f"/v1/{tail}"


def _drop_set(base: frozenset[str], headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """``base`` plus the extra hop-by-hop names listed in the Connection header (RFC 9110
    section 7.6.1). Most messages have none beyond ``base``: then ``base`` itself, no new set."""
    value = headers.get("Connection")
    if not value:
        return base
    tokens = {t.strip().lower() for t in value.split(",")}
    tokens.discard("")
    return base if tokens <= base else base | tokens


def _filtered(
    headers: CIMultiDictProxy[str], drop: frozenset[str], request_id: str
) -> CIMultiDict[str]:
    kept: CIMultiDict[str] = CIMultiDict(
        [(name, value) for name, value in headers.items() if name.lower() not in drop]
    )
    kept.add(REQUEST_ID, request_id)  # any X-Request-Id was dropped: add, not replace
    return kept


def upstream_headers(incoming: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """The client's end-to-end headers minus its credentials; --upstream-api-key, when set, is
    added by the session (vllm_fleet.router.app.upstream_session)."""
    return _filtered(incoming, _drop_set(_DROP_UPSTREAM, incoming), request_id)


def downstream_headers(upstream: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    return _filtered(upstream, _drop_set(_DROP_DOWNSTREAM, upstream), request_id)


# -- pick ------------------------------------------------------------------------------------


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


# -- forward ---------------------------------------------------------------------------------


def _failure_of(replica: str, exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return UpstreamFailure(replica, "timeout", str(exc) or "no answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        return UpstreamFailure(replica, "connect", str(exc.os_error), refused=refused)
    return UpstreamFailure(replica, "disconnect", f"{type(exc).__name__}: {exc}")


async def _exchange(
    session: aiohttp.ClientSession,
    replica: ReplicaState,
    url: str,
    headers: CIMultiDict[str],
    body: bytes,
    idle_s: float,
) -> Reply:
    """POST to the replica; a 5xx is a failure, any other answer a Reply (read whole unless
    it is an event stream). Body reads are bounded by ``idle_s`` (see _read_bounded).
    Redirects go back to the client: following one would send its body outside the fleet."""
    response = await session.post(url, data=body, headers=headers, allow_redirects=False)
    try:
        if response.status >= 500:
            data = await _read_bounded(response.read(), idle_s)
            raise UpstreamFailure(
                replica.url,
                "status",
                f"HTTP {response.status}",
                status=response.status,
                body=data,
                content_type=response.headers.get("Content-Type", "application/json"),
            )
        if response.content_type == "text/event-stream":
            return Reply(replica, response, None)
        return Reply(replica, response, await _read_bounded(response.read(), idle_s))
    except BaseException:
        response.close()
        raise


async def _read_bounded(read: Awaitable[bytes], idle_s: float) -> bytes:
    """``await read`` for at most ``idle_s`` seconds (asyncio.TimeoutError after).

    Used for client bodies (--body-timeout) and upstream bodies. For the latter, the
    session's sock_read timeout should already bound every read, but aiohttp's C parser drops
    it when a replica breaks the chunked framing in the middle of a body: the parser error
    closes the connection without failing the body's reader, so the read would wait forever
    (tests/chaos/test_network_faults.py). This timer does not depend on the parser.
    """
    if sys.version_info < (3, 11):  # no asyncio.timeout yet; wait_for costs a task per read
        return await asyncio.wait_for(read, idle_s)
    async with asyncio.timeout(idle_s):
        return await read


class IdleWatchdog:
    """Fails a stream's pending read once it has waited ``idle_s`` seconds for data.

    The same bound as _read_bounded, for the per-chunk loop of a stream: a timeout scope per
    chunk costs a timer handle, a heap push and a cancel per chunk, several microseconds at
    hundreds of chunks per second. Here one timer per stream wakes at most every ``idle_s``
    (--first-byte-timeout, minutes by default) and the loop only notes when each read started.
    The read is failed through the reader itself, which also wakes a read that the parser
    stopped feeding (see _read_bounded). Time spent writing to the client is not counted.
    """

    __slots__ = ("_content", "_handle", "_idle_s", "_loop", "read_since")

    def __init__(
        self, content: aiohttp.StreamReader, idle_s: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._content = content
        self._idle_s = idle_s
        self._loop = loop
        #: Loop time the pending read started; None while no read is pending.
        self.read_since: float | None = None
        self._handle: asyncio.TimerHandle | None = loop.call_at(loop.time() + idle_s, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.read_since
        if since is not None and now - since >= self._idle_s:
            self._handle = None
            self._content.set_exception(
                asyncio.TimeoutError(f"no data from the replica for {self._idle_s:g} s")
            )
            return
        self._handle = self._loop.call_at(
            (now if since is None else since) + self._idle_s, self._check
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def send_once(
    ctx: RouterContext,
    replica: ReplicaState,
    path: str,
    headers: CIMultiDict[str],
    body: bytes,
    info: RequestInfo | None = None,
) -> Reply:
    """One attempt on ``replica``. On success its in_flight stays counted until finish().

    While it waits for its first byte the attempt is registered on the replica, with the time
    it becomes overdue, so the progress monitor (vllm_fleet.router.progress) can tell a hung replica
    and abandon the attempt: it is then cancelled here (closing the connection makes vLLM drop it)
    and fails as "stalled", which the caller re-sends elsewhere; nothing reached the client.
    """
    task = asyncio.current_task()
    assert task is not None
    now = time.monotonic()
    due = first_byte_due_s(replica, info) if info is not None else MIN_DUE_UNKNOWN_S
    attempt = Attempt(sent_at=now, due_at=now + due, abandon=task.cancel)
    replica.in_flight += 1
    replica.awaiting.add(attempt)
    if info is not None:
        replica.prefixes.record(info.prefix, now)
    try:
        reply = await _exchange(
            ctx.session, replica, replica.url + path, headers, body, ctx.config.first_byte_timeout_s
        )
    except UpstreamFailure as exc:
        failure = exc
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        failure = _failure_of(replica.url, exc)
    except asyncio.CancelledError:
        if not attempt.abandoned or _still_cancelled(task):
            replica.in_flight -= 1
            raise
        failure = UpstreamFailure(
            replica.url, "stalled", "the replica sent nothing while requests were overdue"
        )
    except BaseException:
        replica.in_flight -= 1
        raise
    else:
        replica.last_byte_at = time.monotonic()
        record_answer(replica.outcomes, replica.last_byte_at, error=False)
        return reply
    finally:
        replica.awaiting.discard(attempt)
    replica.in_flight -= 1
    _note_failure(ctx, replica, failure)
    raise failure


#: First-byte due time of an attempt sent without a RequestInfo (none in the proxy today).
MIN_DUE_UNKNOWN_S = 60.0


def _still_cancelled(task: asyncio.Task[object]) -> bool:
    """Undo the progress monitor's cancel; True when someone else cancelled ``task`` too
    (the client went away, or shutdown): that cancellation must go on."""
    if sys.version_info < (3, 11):  # no cancel counting: the monitor's was the only one
        return False
    return task.uncancel() > 0


def _note_failure(ctx: RouterContext, replica: ReplicaState, failure: UpstreamFailure) -> None:
    """Count a failed attempt toward the replica's ejection, by what kind of failure it was.

    Gateway failures feed the breaker's consecutive count; any other 5xx answer only the
    replica's error rate (vllm_fleet.router.outliers). Either ejection is capped by
    --max-ejection-percent; a refused connection is not (nothing listens there).
    """
    now = time.monotonic()
    fleet = ctx.fleet
    allowed = may_eject(
        fleet.ejected_count(), len(fleet.replicas), ctx.breaker.max_ejection_percent
    )
    ejected = False
    if failure.refused and replica.check_ok:
        # Nothing listens there: as good as a failed check. Out of rotation (and of panic
        # mode) until its next check passes, which is as soon as it is back.
        replica.check_ok = False
        replica.healthy = False
    if failure.gateway:
        ejected = record_failure(
            replica, now, ctx.breaker, refused=failure.refused, may_eject=allowed
        )
        if (
            not ejected
            and not allowed
            and replica.consecutive_failures >= ctx.breaker.failure_threshold
        ):
            ctx.telemetry.ejections_prevented.inc()
    else:
        replica.last_byte_at = now  # it answered: not hung
        record_answer(replica.outcomes, now, error=True)
        if is_outlier(replica, list(fleet.replicas.values()), now):
            if not allowed:
                ctx.telemetry.ejections_prevented.inc()
            elif eject(replica, now, ctx.breaker, why="5xx rate far above its peers'"):
                ejected = True
                ctx.telemetry.outlier_ejections.inc()
    ctx.telemetry.observe_failure(replica.url, failure.reason)
    log.warning(
        "upstream failed replica=%s reason=%s detail=%s ejected=%s",
        replica.url,
        failure.reason,
        failure.detail,
        ejected,
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
    When no healthy replica is left, the least-bad ones are used (panic mode,
    vllm_fleet.router.state.Fleet.panic_candidates): 503 only when none is reachable at all.
    Attempts abandoned on a hung replica (reason "stalled") are not counted toward
    --max-attempts: the request was never answered, through no fault of its own.
    """
    tried: list[str] = list(exclude)  # a continuation never goes back to a replica that broke
    failures: list[UpstreamFailure] = []

    async def attempt() -> Reply:
        answered_5xx = [f for f in failures if not f.gateway]
        if len({f.replica for f in answered_5xx}) >= 2:  # failed on two: the request's problem
            raise ReplicasExhausted(answered_5xx[-1])
        candidates = ctx.fleet.candidates(info.model, tried)
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
        if ctx.config.max_attempts == 1 and failure.reason != "stalled":
            raise
        ctx.telemetry.retries.labels(failure.reason).inc()

    def spent(state: RetryCallState) -> bool:
        stalled = sum(1 for f in failures if f.reason == "stalled")
        return len(failures) - stalled >= ctx.config.max_attempts

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


# -- relay -----------------------------------------------------------------------------------


async def relay_stream(
    request: web.Request,
    reply: Reply,
    exchange: Exchange,
    ctx: RouterContext,
    resume: Continuation | None = None,
) -> tuple[web.StreamResponse, bool]:
    """Pass the upstream stream through chunk by chunk; returns (response, completed).

    Headers go out as soon as the upstream's arrived. A client that goes away raises out of
    write() (or cancels this task); the caller then closes the upstream response, which makes
    vLLM abort the request. With ``resume`` (--stream-continuation), a continuable stream's
    chunks go through its Stitcher, and when the replica dies the stream goes on from another
    one (``reply`` then points at it, so the caller's finish() releases the right replica).
    """
    stitcher = resume.stitcher if resume is not None else None
    upstream = reply.response
    response = web.StreamResponse(
        status=upstream.status, headers=downstream_headers(upstream.headers, exchange.request_id)
    )
    content = upstream.content
    loop = asyncio.get_running_loop()
    watchdog = IdleWatchdog(content, ctx.config.first_byte_timeout_s, loop)
    first = True
    # The progress monitor (vllm_fleet.router.progress) expects bytes from a replica with running
    # streams, and records when they come: streams and last_byte_at follow the replica being
    # relayed.
    replica = reply.replica
    relay = Attempt(
        sent_at=loop.time(),
        due_at=math.inf,
        abandon=lambda: content.set_exception(
            asyncio.TimeoutError("the replica stopped sending (found hung)")
        ),
    )
    replica.relays.add(relay)
    try:
        await response.prepare(request)
        while True:
            watchdog.read_since = loop.time()
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure = _failure_of(reply.replica.url, exc)
                replica.relays.discard(relay)  # it failed: it owes this stream nothing more
                if not await _stream_broke(response, reply, exchange, ctx, failure, resume):
                    return response, False
                watchdog.close()  # continued: relay the new replica's stream
                replica, content = reply.replica, reply.response.content
                # its abandon() reads `content`; a new replica, so not abandoned there yet
                relay = replace(relay, sent_at=loop.time(), abandoned=False)
                replica.relays.add(relay)
                watchdog = IdleWatchdog(content, ctx.config.first_byte_timeout_s, loop)
                continue
            watchdog.read_since = None
            replica.last_byte_at = time.monotonic()
            if not chunk:
                break
            if first:
                first = False
                elapsed = loop.time() - exchange.started
                ctx.telemetry.observe_first_byte(reply.replica.url, elapsed)
            if stitcher is not None:
                chunk = stitcher.feed(chunk)  # whole events only: may hold a partial one
                if not chunk:
                    continue
            await response.write(chunk)
        if stitcher is not None:
            await response.write(stitcher.end())
            if stitcher.segment:
                ctx.telemetry.continuations_succeeded.inc()
        await response.write_eof()
    except ConnectionResetError:  # the client went away: not the replica's fault
        exchange.status = CLIENT_CLOSED
        return response, False
    finally:
        replica.relays.discard(relay)
        watchdog.close()
    return response, True


async def _stream_broke(
    response: web.StreamResponse,
    reply: Reply,
    exchange: Exchange,
    ctx: RouterContext,
    failure: UpstreamFailure,
    resume: Continuation | None = None,
) -> bool:
    """The replica of a committed stream failed: True when the stream goes on from another
    replica (``reply`` now holds it), else False once the stream is ended, complete or with
    the SSE error event."""
    _note_failure(ctx, reply.replica, failure)
    if resume is not None:
        why = await _continue_stream(response, reply, exchange, ctx, resume)
        if why is None:
            return True
        if not why:
            return False  # every token had been sent: the stream was ended properly
        ctx.telemetry.continuations_failed.labels(why).inc()
    ctx.telemetry.stream_errors.labels(failure.reason).inc()
    exchange.status = 502
    event = sse_error_event(
        502, f"The replica failed mid-stream ({failure.reason}); the response is incomplete."
    )
    try:
        await response.write(event)
        await response.write_eof()
    except ConnectionResetError:
        exchange.status = CLIENT_CLOSED
    return False


async def _continue_stream(
    response: web.StreamResponse,
    reply: Reply,
    exchange: Exchange,
    ctx: RouterContext,
    resume: Continuation,
) -> str | None:
    """Ask another replica for the rest of a cut stream (vllm_fleet.router.continuation).

    None when its stream is to be relayed next (``reply`` is switched to it in place, and the
    broken one released), "" when the answer was already complete and has been ended here,
    else why the stream cannot go on (a telemetry.CONTINUATION_FAILURES label).
    """
    stitcher = resume.stitcher
    if stitcher is None:
        log.info("stream not continued: %s", resume.refusal)
        return "request"
    resume.broken.append(reply.replica.url)
    point = stitcher.resume_at_break()
    if isinstance(point, Refused):
        log.warning("stream not continued: %s", point.detail)
        return point.reason
    ctx.telemetry.continuations.inc()
    if point.body is None:
        await response.write(point.tail)
        await response.write_eof()
        ctx.telemetry.continuations_succeeded.inc()
        return ""
    info = replace(resume.info, max_tokens=stitcher.plan.limit - point.sent)
    try:
        new = await send_with_failover(
            ctx, exchange, info, resume.path, resume.headers, point.body, resume.broken
        )
    except (UpstreamFailure, ReplicasExhausted, ApiError) as exc:
        log.warning("stream not continued: no replica took the rest (%s)", exc)
        return "replica"
    if new.body is not None or new.response.status != 200:
        log.warning("stream not continued: the continuation got HTTP %s", new.response.status)
        finish(new, False)
        return "replica"
    broken = replace(reply)
    reply.replica, reply.response = new.replica, new.response
    finish(broken, False)
    stitcher.next_segment()
    log.info("stream continued replica=%s after %d tokens", new.replica.url, point.sent)
    return None


def buffered_response(reply: Reply, exchange: Exchange, ctx: RouterContext) -> web.Response:
    elapsed = asyncio.get_running_loop().time() - exchange.started
    ctx.telemetry.observe_first_byte(reply.replica.url, elapsed)
    upstream = reply.response
    return web.Response(
        status=upstream.status,
        body=reply.body,
        headers=downstream_headers(upstream.headers, exchange.request_id),
    )


def finish(reply: Reply, succeeded: bool) -> None:
    """Release the replica: in_flight back down, and a success for the breaker if it was one.

    An upstream response not read to the end (client gone, stream broken) is closed, not
    returned to the pool: closing the connection is what makes vLLM abort the request.
    """
    replica = reply.replica
    replica.in_flight -= 1
    replica.served += 1
    if reply.response.content.is_eof():
        reply.response.release()
    else:
        reply.response.close()
    if succeeded:
        record_success(replica, time.monotonic())


# -- handler ---------------------------------------------------------------------------------


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """POST /v1/{tail}: the whole request path, as a sequence of the steps above."""
    ctx = request.app[ROUTER]
    exchange = exchange_of(request)
    path = forward_path(request)
    body = await read_body(request, ctx.config.max_body_bytes, ctx.config.body_timeout_s)
    info = parse_request(body, request.content_type)
    exchange.model = info.model
    headers = upstream_headers(request.headers, exchange.request_id)
    resume = None
    if ctx.config.stream_continuation:
        body, resume = prepare_continuation(path, info, headers, body)
    try:
        reply = await send_with_failover(ctx, exchange, info, path, headers, body)
    except UpstreamFailure as failure:
        return failure_response(failure, exchange.attempts)
    except ReplicasExhausted as exhausted:
        return failure_response(exhausted.last, exchange.attempts)
    succeeded = False
    try:
        if reply.body is not None:
            succeeded = True
            return buffered_response(reply, exchange, ctx)
        response, succeeded = await relay_stream(request, reply, exchange, ctx, resume)
        return response
    finally:
        finish(reply, succeeded)
