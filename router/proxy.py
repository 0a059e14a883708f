"""Forwarding one API request: parse, pick a replica, send with failover, relay, record.

The rule that shapes the path: a request may be retried on another replica only while nothing
has reached the client. Each step is a module of its own, and this handler is their sequence:

- router.parse: the body, what the balancer needs from it, the path and the headers;
- router.priority: batch requests (X-Fleet-Priority: batch) wait for room kept from them;
- router.failover: the pick, failover, the 500 rule, panic mode, the final error;
- router.upstream: one attempt on one replica, its failure counted, the replica released;
- router.relay: the answer to the client, a stream continued elsewhere when its replica dies.
"""

from __future__ import annotations

from aiohttp import web

from vllm_fleet.router.context import ROUTER
from vllm_fleet.router.continuation import prepare as prepare_continuation
from vllm_fleet.router.failover import ReplicasExhausted, failure_response, send_with_failover
from vllm_fleet.router.middleware import exchange_of
from vllm_fleet.router.parse import forward_path, parse_body, read_body, upstream_headers
from vllm_fleet.router.priority import classify, is_batch
from vllm_fleet.router.relay import buffered_response, relay_stream
from vllm_fleet.router.upstream import UpstreamFailure, finish


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """POST /v1/{tail}: the whole request path, as a sequence of the steps above."""
    ctx = request.app[ROUTER]
    exchange = exchange_of(request)
    path = forward_path(request)
    body = await read_body(request, ctx.config.max_body_bytes, ctx.config.body_timeout_s)
    parsed, payload = parse_body(body, request.content_type)
    info = classify(parsed, request.headers)
    if ctx.tokenizers is not None:  # vLLM's block hashes of the prompt, off the event loop
        info = await ctx.tokenizers.attach(ctx.fleet, info, body)
    exchange.model = info.model
    headers = upstream_headers(request.headers, exchange.request_id)
    resume = None
    if ctx.config.stream_continuation:
        body, resume = prepare_continuation(path, info, headers, body, payload)
    if is_batch(info):  # batch yields to interactive traffic (router.priority)
        await ctx.batch_gate.wait_for_room(lambda: ctx.fleet.candidates(info.model))
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
        if ctx.peers is not None:
            ctx.peers.count_changed()
