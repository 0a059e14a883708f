"""The simulator's HTTP face: vLLM's OpenAI routes plus `/sim/stats` and `/sim/control`.

Serve the app with ``handler_cancellation=True`` (``web.run_app`` / ``AppRunner``): then a
client that disconnects cancels its handler, which aborts the request in the engine at once,
as vLLM aborts generation when the client goes away. Streaming requests notice a disconnect on
their next write even without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from vllm_fleet.launcher.sim.config import SIM_VLLM_VERSION, SimConfig, SimKnobs, apply_knobs
from vllm_fleet.launcher.sim.engine import SimEngine
from vllm_fleet.launcher.sim.kv_events import KvEventPublisher, open_publisher
from vllm_fleet.launcher.sim.lora import LORA, add_lora
from vllm_fleet.launcher.sim.metrics import SimMetrics
from vllm_fleet.launcher.sim.protocol import (
    ApiError,
    GenerationRequest,
    ResponseBuilder,
    bad_request,
    embedding_response,
    filler_text,
    filler_token,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from vllm_fleet.launcher.sim.runner import Generation, SimRunner


@dataclass
class SimState:
    """Everything the handlers share; one per app (no globals)."""

    config: SimConfig
    knobs: SimKnobs
    engine: SimEngine
    metrics: SimMetrics
    runner: SimRunner
    rng: random.Random
    ready_at: float
    created: int
    publisher: KvEventPublisher | None = None


SIM_STATE = web.AppKey("sim_state", SimState)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return _json_error(error)


async def _read_json(request: web.Request) -> object:
    try:
        return await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from None


async def _hold_if_hung(state: SimState) -> None:
    """A hung server accepts the connection and then says nothing until the hang is lifted."""
    await state.runner.wait_while_hung()


def _is_loading(state: SimState) -> bool:
    return state.runner.now() < state.ready_at


async def health(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    await _hold_if_hung(state)
    if _is_loading(state) or not state.knobs.healthy:
        return web.Response(status=503)
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    await _hold_if_hung(request.app[SIM_STATE])
    return web.json_response({"version": SIM_VLLM_VERSION})


async def models(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    await _hold_if_hung(state)
    config = state.config
    card = {
        "id": config.model,
        "object": "model",
        "created": state.created,
        "owned_by": "vllm",
        "root": config.model,
        "parent": None,
        "max_model_len": config.max_model_len,
        "permission": [
            {
                "id": f"modelperm-{config.model}",
                "object": "model_permission",
                "created": state.created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
    adapters = request.app[LORA].cards(config.model, state.created)
    return web.json_response({"object": "list", "data": [card, *adapters]})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    await _hold_if_hung(state)
    body = state.metrics.render(state.engine)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def stats(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    engine = state.engine
    s = engine.stats
    return web.json_response(
        {
            "received": s.received,
            "finished": s.finished,
            "aborted": s.aborted,
            "failed": s.failed,
            "running": len(engine.running),
            "waiting": len(engine.waiting),
            "tokens_generated": s.tokens_generated,
            "prompt_tokens": s.prompt_tokens,
            "steps": s.steps,
            "max_running_seen": s.max_running_seen,
            "held": state.runner.held,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
            "preemptions": s.preemptions,
            "kv_blocks_total": engine.num_blocks,
            "kv_blocks_used": engine.num_blocks - engine.pool.num_free,
            "kv_blocks_cached": engine.pool.num_cached,
        }
    )


async def kv_event_sources(request: web.Request) -> web.Response:
    """vLLM's `GET /kv_event_sources`: where this replica publishes KV events, per DP rank."""
    state = request.app[SIM_STATE]
    await _hold_if_hung(state)
    publisher = state.publisher
    return web.json_response({} if publisher is None else {"0": publisher.source()})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """vLLM's `POST /reset_prefix_cache` (a dev-mode route there): forget every cached block."""
    state = request.app[SIM_STATE]
    await _hold_if_hung(state)
    if not state.engine.reset_prefix_cache():
        raise ApiError(
            409,
            "Cannot reset the prefix cache while requests are running; retry when idle.",
            err_type="ConflictError",
        )
    state.runner.publish_kv_events()
    return web.Response(status=200)


async def control(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object of knobs.")
    try:
        apply_knobs(state.knobs, body)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    state.runner.knobs_changed()
    return web.json_response(state.knobs.as_dict())


def _check_ready(state: SimState) -> None:
    if _is_loading(state):
        raise ApiError(503, "The model is still loading.", err_type="ServiceUnavailableError")


def _maybe_fail(state: SimState) -> None:
    """Answer a `fail_rate` fraction of requests with vLLM's 500 body."""
    if state.knobs.fail_rate > 0 and state.rng.random() < state.knobs.fail_rate:
        state.engine.record_failed()
        raise ApiError(500, "Simulated internal server error.", err_type="InternalServerError")


async def _generate(
    request: web.Request, parse: Callable[[object, SimConfig], GenerationRequest]
) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    await _hold_if_hung(state)
    _check_ready(state)
    body = await _read_json(request)
    gen = parse(body, request.app[LORA].config_for(state.config, body))
    _maybe_fail(state)
    engine_id = state.runner.next_request_id()
    request_id = request.headers.get("X-Request-Id") or engine_id
    builder = ResponseBuilder(gen, request_id)
    generation_context = state.runner.generate(
        engine_id,
        gen.prompt_tokens,
        gen.max_tokens,
        stream=gen.stream,
        prompt_token_ids=gen.prompt_token_ids,
        text_offset=gen.text_offset,
        priority=gen.priority,
    )
    async with generation_context as generation:
        if not gen.stream:
            last = await generation.finished()
            text = filler_text(gen.text_offset, last.index + 1)
            body = builder.response(text, last.index + 1, last.seq.finish_reason or "length")
            return web.json_response(body, headers={"X-Request-Id": request_id})
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Request-Id": request_id,
            }
        )
        # A vanished client ends the stream (even before its headers went out); leaving the
        # block aborts the request in the engine.
        with contextlib.suppress(ConnectionResetError):
            await response.prepare(request)
            await _stream_tokens(response, builder, generation)
        return response


async def _stream_tokens(
    response: web.StreamResponse, builder: ResponseBuilder, generation: Generation
) -> None:
    gen = builder.request
    for chunk in builder.preamble_chunks():
        await response.write(_sse(chunk))
    completion_tokens = 0
    async for event in generation.tokens():
        completion_tokens = event.index + 1
        finish = (event.seq.finish_reason or "length") if event.finished else None
        text = filler_token(gen.text_offset, event.index)
        await response.write(_sse(builder.token_chunk(text, finish)))
    if gen.include_usage:
        await response.write(_sse(builder.usage_chunk(completion_tokens)))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat)


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    await _hold_if_hung(state)
    _check_ready(state)
    body = await _read_json(request)
    parsed = parse_embedding(body, request.app[LORA].config_for(state.config, body))
    _maybe_fail(state)
    state.metrics.prompt_tokens.inc(parsed.prompt_tokens)
    return web.json_response(embedding_response(parsed, state.config.embedding_dim))


def cache_config_labels(config: SimConfig) -> dict[str, str]:
    """The `vllm:cache_config_info` labels a router may read (vLLM's names and spelling)."""
    return {
        "block_size": str(config.block_size),
        "num_gpu_blocks": str(config.num_gpu_blocks),
        "kv_cache_size_tokens": str(config.num_gpu_blocks * config.block_size),
        "enable_prefix_caching": str(config.enable_prefix_caching),
        "prefix_caching_hash_algo": "sha256",
    }


def make_sim_app(config: SimConfig) -> web.Application:
    """One simulated vLLM server; the engine loop runs while the app runs."""
    app = web.Application(middlewares=[_errors_as_json])

    async def engine_loop(app: web.Application) -> AsyncIterator[None]:
        knobs = SimKnobs.from_config(config)
        engine = SimEngine.from_config(config)
        metrics_ = SimMetrics(config.model, cache_config_labels(config))
        async with open_publisher(config.kv_events) as publisher:
            runner = SimRunner(engine, metrics_, knobs, publisher)
            app[SIM_STATE] = SimState(
                config=config,
                knobs=knobs,
                engine=engine,
                metrics=metrics_,
                runner=runner,
                rng=random.Random(config.seed),
                ready_at=runner.now() + config.startup_delay,
                created=int(time.time()),
                publisher=publisher,
            )
            task = asyncio.create_task(runner.run(), name=f"sim-engine-{config.model}")
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(engine_loop)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_get("/kv_event_sources", kv_event_sources)
    app.router.add_get("/sim/stats", stats)
    app.router.add_post("/sim/control", control)
    add_lora(app, config)
    return app
