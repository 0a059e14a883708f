"""Relaying an answer to the client: a whole body, or a stream chunk by chunk.

A stream is committed once its headers are relayed: a failure after that is not retried. It is
continued on another replica where that is exact (router.continuation), or ended with an SSE
error event. Chunks are relayed as they arrive, unbuffered; when the client goes away the
upstream response is closed, which makes vLLM abort the generation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import replace
from typing import Literal

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

from vllm_fleet.router.context import RouterContext
from vllm_fleet.router.continuation import Continuation
from vllm_fleet.router.failover import ReplicasExhausted, send_with_failover
from vllm_fleet.router.middleware import Exchange
from vllm_fleet.router.openai_errors import ApiError, sse_error_event
from vllm_fleet.router.parse import downstream_headers
from vllm_fleet.router.pump import Pump, bytes_from
from vllm_fleet.router.state import Attempt
from vllm_fleet.router.stitcher import Refused
from vllm_fleet.router.telemetry import CLIENT_CLOSED
from vllm_fleet.router.upstream import (
    IdleWatchdog,
    Reply,
    UpstreamFailure,
    failure_of,
    finish,
    note_failure,
)

log = logging.getLogger("vllm_fleet.router")


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
    watchdog = IdleWatchdog.of(upstream, ctx.config.first_byte_timeout_s, loop)
    first = True
    last = b""  # relayed with the end of the stream
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
    pump: Pump | None = None
    try:
        writer = await response.prepare(request)
        transport = request.transport if _pumpable(writer, request) else None
        while True:
            try:
                if pump is not None:  # the pump relays; this returns at the end
                    last = await pump.next_end()
                    break
                watchdog.read_since = loop.time()
                chunk = await content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if pump is not None:
                    pump.stop()
                    pump = None
                failure = failure_of(reply.replica.url, exc)
                replica.relays.discard(relay)  # it failed: it owes this stream nothing more
                if not await _stream_broke(response, reply, exchange, ctx, failure, resume):
                    return response, False
                watchdog.close()  # continued: relay the new replica's stream
                replica, content = reply.replica, reply.response.content
                # its abandon() reads `content`; a new replica, so not abandoned there yet
                relay = replace(relay, sent_at=loop.time(), abandoned=False)
                replica.relays.add(relay)
                watchdog = IdleWatchdog.of(reply.response, ctx.config.first_byte_timeout_s, loop)
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
            if content.at_eof():
                # The upstream's last bytes (its end came with them): they go out with the
                # stream's end in one write, one system call fewer per request.
                last = chunk
                break
            if chunk:
                await response.write(chunk)  # the headers go with the first bytes
                if writer is not None and transport is not None and Pump.usable(content):
                    # from here on the rest is moved from the upstream's callback
                    pump = Pump(
                        reply.response,
                        transport,
                        stitcher,
                        watchdog,
                        bytes_from(replica),
                        writer.drain,
                    )
                    pump.start()
        if stitcher is not None:
            last += stitcher.end()
            if stitcher.segment:
                ctx.telemetry.continuations_succeeded.inc()
        await response.write_eof(last)
    except ConnectionResetError:  # the client went away: not the replica's fault
        exchange.status = CLIENT_CLOSED
        return response, False
    finally:
        if pump is not None:
            pump.stop()
        replica.relays.discard(relay)
        watchdog.close()
    return response, True


def _pumpable(writer: AbstractStreamWriter | None, request: web.Request) -> bool:
    """Can the stream's bytes be written to the client's transport as HTTP chunks of ours
    (router.pump)? Only where aiohttp would write exactly that: chunked, not compressed."""
    return (
        isinstance(writer, StreamWriter)
        and writer.chunked
        and getattr(writer, "_compress", None) is None
        and request.transport is not None
    )


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
    note_failure(ctx, reply.replica, failure)
    message = f"The replica failed mid-stream ({failure.reason}); the response is incomplete."
    if resume is not None:
        outcome = await _continue_stream(response, reply, exchange, ctx, resume)
        if outcome == "continued":
            return True
        if outcome == "complete":
            return False  # every token had been sent: the stream was ended properly
        ctx.telemetry.continuations_failed.labels(outcome.reason).inc()
        message += f" It could not be continued on another replica: {outcome.detail}."
    ctx.telemetry.stream_errors.labels(failure.reason).inc()
    exchange.status = 502
    event = sse_error_event(502, message)
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
) -> Refused | Literal["continued", "complete"]:
    """Ask another replica for the rest of a cut stream (vllm_fleet.router.continuation).

    "continued" when its stream is to be relayed next (``reply`` is switched to it in place,
    and the broken one released), "complete" when the answer was already complete and has been
    ended here, else why the stream cannot go on.
    """
    stitcher = resume.stitcher
    if stitcher is None:
        log.info("stream not continued: %s", resume.refusal)
        return Refused("request", resume.refusal)
    resume.broken.append(reply.replica.url)
    point = stitcher.resume_at_break()
    if isinstance(point, Refused):
        log.warning("stream not continued: %s", point.detail)
        return point
    ctx.telemetry.continuations.inc()
    if point.body is None:
        await response.write(point.tail)
        await response.write_eof()
        ctx.telemetry.continuations_succeeded.inc()
        return "complete"
    info = replace(resume.info, max_tokens=stitcher.plan.limit - point.sent)
    try:
        new = await send_with_failover(
            ctx, exchange, info, resume.path, resume.headers, point.body, resume.broken
        )
    except (UpstreamFailure, ReplicasExhausted, ApiError) as exc:
        log.warning("stream not continued: no replica took the rest (%s)", exc)
        return Refused("replica", f"no replica took the rest ({_said(exc)})")
    if new.body is not None or new.response.status != 200:
        log.warning("stream not continued: the continuation got HTTP %s", new.response.status)
        finish(new, False)
        return Refused("replica", f"the continuation got HTTP {new.response.status}")
    broken = replace(reply)
    reply.replica, reply.response = new.replica, new.response
    finish(broken, False)
    stitcher.next_segment()
    log.info("stream continued replica=%s after %d tokens", new.replica.url, point.sent)
    return "continued"


def _said(exc: UpstreamFailure | ReplicasExhausted | ApiError) -> str:
    """Why no replica took a continuation, in a few words for the client's error event."""
    if isinstance(exc, ApiError):
        return exc.message.rstrip(".")
    failure = exc.last if isinstance(exc, ReplicasExhausted) else exc
    if failure.reason == "status":
        return f"HTTP {failure.status}"
    return failure.reason


def buffered_response(reply: Reply, exchange: Exchange, ctx: RouterContext) -> web.Response:
    elapsed = asyncio.get_running_loop().time() - exchange.started
    ctx.telemetry.observe_first_byte(reply.replica.url, elapsed)
    upstream = reply.response
    return web.Response(
        status=upstream.status,
        body=reply.body,
        headers=downstream_headers(upstream.headers, exchange.request_id),
    )
