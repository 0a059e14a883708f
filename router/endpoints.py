"""The router's own endpoints: liveness, readiness, metrics, the fleet view, the peer exchange
and /v1/models."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vllm_fleet.router.context import ROUTER
from vllm_fleet.router.failover import RETRY_AFTER_S, no_replica_error
from vllm_fleet.router.openai_errors import ApiError, error_response
from vllm_fleet.router.peers import MAX_BATCH_BYTES, BadBatch, decode_batch, hello, take_batch
from vllm_fleet.router.precise import live_view
from vllm_fleet.router.prefix_index import ReplicaPrefixes, memory_bytes
from vllm_fleet.router.prompt_tokens import PromptTokenizers


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers. Says nothing about the replicas (that is /ready)."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 while at least one replica takes traffic and we are not shutting down."""
    ctx = request.app[ROUTER]
    healthy = len(ctx.fleet.healthy())
    if ctx.draining:
        return error_response(
            503, "The router is shutting down.", code="shutting_down",
            headers={"Retry-After": RETRY_AFTER_S},
        )  # fmt: skip
    if healthy == 0:
        return error_response(
            503,
            f"No healthy replica (0 of {len(ctx.fleet.replicas)}).",
            code="no_healthy_replica",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    return web.json_response(
        {"status": "ready", "healthy": healthy, "replicas": len(ctx.fleet.replicas)}
    )


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[ROUTER].telemetry.exposed
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def fleet_replicas(request: web.Request) -> web.Response:
    """Every known replica as the router sees it (for operators and tests), with the speed it
    learned: why the cost policy prefers one replica over another. ``batch_held``: batch
    requests the router holds back (vllm_fleet.router.priority), spread over the healthy ones."""
    ctx = request.app[ROUTER]
    held = ctx.batch_gate.held / max(1, sum(1 for r in ctx.fleet.replicas.values() if r.healthy))
    rows: list[dict[str, Any]] = [
        {
            "url": r.url,
            "healthy": r.healthy,
            "breaker": r.breaker.value,
            "in_flight": r.in_flight,
            "waiting": r.waiting,
            "batch_held": held if r.healthy else 0.0,
            "running": r.running,
            "kv_cache_usage": r.kv_cache_usage,
            "models": sorted(r.models),
            "served": r.served,
            "ejections": r.ejections,
            "speed": {
                "step_s": r.speed.token_s,
                "batch_slowdown": r.speed.batch_slowdown,
                "batch_limit": r.speed.batch_limit,
                "peak_running": r.speed.peak_running,
                "tokens_per_request": r.speed.tokens_per_request,
                "prefill_s_per_token": r.speed.prefill_s_per_token,
            },
            "prefix_cache": prefix_view(r.prefixes, ctx.tokenizers),
        }
        for r in ctx.fleet.replicas.values()
    ]
    return web.json_response(rows)


async def fleet_peers(request: web.Request) -> web.Response:
    """This router's peer exchange (vllm_fleet.router.peers): its id, its peers, the counts."""
    link = request.app[ROUTER].peers
    return web.json_response(link.view() if link is not None else {"router": None, "peers": []})


async def peer_socket(request: web.Request) -> web.StreamResponse:
    """A peer router's socket (vllm_fleet.router.peers): this router says who it is, then
    takes every batch the peer sends. The hello lets a router that reached itself (one DNS
    name over every router pod) stop sending there."""
    ctx = request.app[ROUTER]
    link = ctx.peers
    if link is None:
        raise ApiError(
            404,
            "This router takes no peer batches: start it with --peer or --discover-peers-dns.",
            code="peers_off",
        )
    ws = web.WebSocketResponse(max_msg_size=MAX_BATCH_BYTES)
    if not ws.can_prepare(request).ok:
        raise ApiError(
            400, "Peer batches come over a WebSocket (Upgrade: websocket).", code="not_a_websocket"
        )
    await ws.prepare(request)
    link.inbound.add(ws)
    # A worker's siblings connect on its own loopback port; other routers on the shared one.
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    from_sibling = isinstance(sockname, tuple) and sockname[1] == link.sibling_port
    try:
        await ws.send_str(hello(link))
        async for message in ws:
            if message.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                continue
            try:
                batch = decode_batch(message.data)
            except BadBatch as exc:
                reason = f"Bad peer batch: {exc}"[:120].encode()
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=reason)
                break
            take_batch(ctx.fleet, link, batch, time.monotonic())
            if link.siblings and not from_sibling:
                link.relay(batch.sent)
    finally:
        link.inbound.discard(ws)
    return ws


def prefix_view(p: ReplicaPrefixes, tokenizers: PromptTokenizers | None = None) -> dict[str, Any]:
    """The replica's prefix record as /fleet/replicas shows it: the router's predicted hit
    rate next to the replica's measured one, the trust derived from them, the record's size,
    and the KV-event block set where the replica publishes events, with the state of its
    models' tokenizers (precise matching needs them loaded)."""
    events = p.events
    return {
        "predicted_hit_rate": p.predicted_hit_rate,
        "measured_hit_rate": p.measured_hit_rate,
        "trust": p.trust,
        "entries": len(p),
        "capacity": p.capacity,
        "memory_bytes": memory_bytes([p]),
        "block_tokens": p.block_tokens,
        "resets": p.resets,
        "kv_events": None
        if events is None
        else {
            "blocks": len(events.hashes),
            "block_size": events.block_size,
            "stored": events.stored,
            "removed": events.removed,
            "cleared": events.cleared,
            "batches": events.batches,
            "replayed": events.replayed,
            "missed": events.missed,
            "overflows": events.overflows,
            "last_seq": events.last_seq,
            **live_view(events, tokenizers.states if tokenizers is not None else None),
        },
    }


def _model_card(model: str, created: int, parent: str | None = None) -> dict[str, Any]:
    card = {"id": model, "object": "model", "created": created, "owned_by": "vllm-fleet"}
    return card if parent is None else {**card, "parent": parent}  # a LoRA adapter's base


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the union of the healthy replicas' models, in OpenAI's list format."""
    ctx = request.app[ROUTER]
    parents = ctx.fleet.model_parents()
    data = [_model_card(m, ctx.created, parents.get(m)) for m in ctx.fleet.served_models()]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model} (``client.models.retrieve``): one card, or 404."""
    ctx = request.app[ROUTER]
    model = request.match_info["model"]
    served = ctx.fleet.served_models()
    if model not in served:
        raise no_replica_error(ctx.fleet, model)
    return web.json_response(_model_card(model, ctx.created, ctx.fleet.model_parents().get(model)))
