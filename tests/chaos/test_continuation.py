"""Streams that survive their replica (vllm_fleet.router.continuation), over simulated replicas.

A replica is killed while it streams an answer (``ignore_eos`` and a fixed ``max_tokens``);
the client, the official ``openai`` package, must read one uninterrupted answer: exactly
``max_tokens`` tokens, one ``id``, one role delta, and a final usage counting both parts. The
simulator streams one token per chunk with running usage, as vLLM does with
``continuous_usage_stats``; requests that cannot be continued exactly still end with the SSE
error event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from openai.types import Completion
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionMessageParam,
    ChatCompletionStreamOptionsParam,
)

from tests.chaos.conftest import FIGURES, MODELS_BODY, raw_server, read_request
from tests.support.router import RouterHandle, eventually, running_router
from tests.support.sim import SIM_MODEL, SimHandle, running_sim, start_sim_process
from vllm_fleet.router.stitcher import MAX_CONTINUATIONS

#: A step of 20 ms: a 60-token answer takes ~1.2 s, time enough to kill its replica mid-way.
STEP_MS = 20.0
MAX_TOKENS = 60
#: Chunks the client reads before the replica dies.
READ_BEFORE_KILL = 8
DEADLINE_S = 30.0
USAGE: ChatCompletionStreamOptionsParam = {"include_usage": True}
IGNORE_EOS = {"ignore_eos": True}


@asynccontextmanager
async def recording_sims(n: int) -> AsyncIterator[tuple[list[SimHandle], list[dict[str, Any]]]]:
    """``n`` in-process simulators, and every generation body they received, in order."""
    bodies: list[dict[str, Any]] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and request.path.startswith("/v1/"):
            bodies.append(json.loads(await request.read()))
        return await handler(request)

    def prepare(app: web.Application) -> None:
        app.middlewares.append(record)

    async with AsyncExitStack() as stack:
        sims = [
            await stack.enter_async_context(running_sim(step_ms=STEP_MS, prepare=prepare))
            for _ in range(n)
        ]
        yield sims, bodies


def serving(sims: Sequence[SimHandle]) -> SimHandle:
    """The one simulator generating right now."""
    busy = [s for s in sims if s.running == 1]
    assert len(busy) == 1, [s.running for s in sims]
    return busy[0]


async def next_serving(sims: Sequence[SimHandle]) -> SimHandle:
    """The one simulator generating, once one is: the client may read chunks the router
    relayed from a replica before it was killed while the continuation is still on its way
    to (or queued in) the next one (a CI run at 7745153 read 8 such chunks)."""
    await eventually(lambda: any(s.running for s in sims), what="a simulator generating")
    return serving(sims)


def counter(router: RouterHandle, name: str, **labels: str) -> float:
    value = router.ctx.telemetry.registry.get_sample_value(f"{name}_total", labels)
    return value or 0.0


async def prompt_tokens_of(url: str, path: str, body: dict[str, Any]) -> int:
    """The prompt_tokens a replica reports for ``body`` (answered whole, not streamed)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}{path}", json={**body, "max_tokens": 1}) as resp,
    ):
        assert resp.status == 200
        tokens: int = (await resp.json())["usage"]["prompt_tokens"]
        return tokens


async def test_a_chat_stream_survives_its_replica_and_reads_as_one_answer() -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Tell me a long story about a lighthouse."}
    ]
    async with recording_sims(2) as (sims, bodies), running_router([s.url for s in sims]) as router:
        expected_prompt = await prompt_tokens_of(
            sims[0].url, "/v1/chat/completions", {"model": SIM_MODEL, "messages": messages}
        )
        bodies.clear()
        received = [s.stats().received for s in sims]
        chunks: list[ChatCompletionChunk] = []
        async with router.openai() as client, asyncio.timeout(DEADLINE_S):
            stream = await client.chat.completions.create(
                model=SIM_MODEL,
                messages=messages,
                max_tokens=MAX_TOKENS,
                stream=True,
                stream_options=USAGE,
                extra_body=IGNORE_EOS,
            )
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == READ_BEFORE_KILL:
                    victim = serving(sims)
                    await victim.stop()
        survivor = next(i for i, s in enumerate(sims) if s is not victim)
        assert sims[survivor].stats().received == received[survivor] + 1  # the continuation

    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.created for c in chunks} == {chunks[0].created}
    assert {c.model for c in chunks} == {SIM_MODEL}
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert [d.role for d in deltas if d.role] == ["assistant"]  # no second role delta
    words = "".join(d.content or "" for d in deltas).split()
    assert len(words) == MAX_TOKENS  # the simulator's tokens are one word each
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected_prompt, MAX_TOKENS)
    assert usage.total_tokens == expected_prompt + MAX_TOKENS
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)

    first, continuation = bodies
    assert first["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert continuation["continue_final_message"] is True
    assert continuation["add_generation_prompt"] is False
    partial = continuation["messages"][-1]
    assert continuation["messages"][:-1] == messages and partial["role"] == "assistant"
    assert len(partial["content"].split()) + continuation["max_tokens"] == MAX_TOKENS
    assert " ".join(words).startswith(partial["content"].strip())
    assert counter(router, "vllm_fleet_stream_continuations_attempted") == 1
    assert counter(router, "vllm_fleet_stream_continuations_succeeded") == 1
    assert counter(router, "vllm_fleet_stream_errors", reason="disconnect") == 0
    FIGURES["stream_continuation_chat"] = {
        "max_tokens": MAX_TOKENS,
        "tokens_before_the_kill": MAX_TOKENS - continuation["max_tokens"],
        "tokens_received": len(words),
        "ids": len({c.id for c in chunks}),
    }


async def test_a_completion_survives_its_replica_process_killed() -> None:
    """SIGKILL: the replica's process dies with the connection open, as a crashed vLLM does."""
    prompt = "The history of the lighthouse begins"
    async with AsyncExitStack() as stack:
        sims = [
            await stack.enter_async_context(start_sim_process(step_ms=STEP_MS)) for _ in range(2)
        ]
        router = await stack.enter_async_context(running_router([s.url for s in sims]))
        expected_prompt = await prompt_tokens_of(
            sims[0].url, "/v1/completions", {"model": SIM_MODEL, "prompt": prompt}
        )
        finished = [(await s.stats())["finished"] for s in sims]
        chunks: list[Completion] = []
        async with router.openai() as client, asyncio.timeout(DEADLINE_S):
            stream = await client.completions.create(
                model=SIM_MODEL,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                stream=True,
                stream_options=USAGE,
                extra_body=IGNORE_EOS,
            )
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == READ_BEFORE_KILL:
                    running = [(await s.stats())["running"] for s in sims]
                    assert sorted(running) == [0, 1]
                    victim = sims[running.index(1)]
                    victim.kill()
        survivor = next(i for i, s in enumerate(sims) if s is not victim)
        assert (await sims[survivor].stats())["finished"] == finished[survivor] + 1

    assert {c.id for c in chunks} == {chunks[0].id}
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len("".join(texts).split()) == MAX_TOKENS
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    assert usage.prompt_tokens == expected_prompt
    assert counter(router, "vllm_fleet_stream_continuations_succeeded") == 1


async def cut_stream(router: RouterHandle, sims: Sequence[SimHandle], **extra: Any) -> str:
    """Stream a completion, kill its replica after a few chunks; the error the client got."""
    async with router.openai() as client, asyncio.timeout(DEADLINE_S):
        stream = await client.completions.create(
            model=SIM_MODEL,
            prompt="x",
            max_tokens=MAX_TOKENS,
            stream=True,
            extra_body={**IGNORE_EOS, **extra},
        )
        read = 0
        with pytest.raises(openai.APIError) as error:
            async for _ in stream:
                read += 1
                if read == READ_BEFORE_KILL:
                    await serving(sims).stop()
    assert read < MAX_TOKENS
    return str(error.value)


@pytest.mark.parametrize(
    "extra",
    [
        {"seed": 7},
        {"stop": ["never"]},
        {"response_format": {"type": "json_object"}},
        {"logprobs": 1},
        {"frequency_penalty": 0.5},
    ],
)
async def test_a_stream_that_cannot_be_continued_exactly_keeps_the_error_event(
    extra: dict[str, Any],
) -> None:
    async with recording_sims(2) as (sims, bodies), running_router([s.url for s in sims]) as router:
        message = await cut_stream(router, sims, **extra)
        assert "mid-stream" in message
        # the event says why: the request is of a kind that is not continued (plan_for's words)
        assert "It could not be continued on another replica: " in message, message
        assert len(bodies) == 1 and "stream_options" not in bodies[0]  # forwarded untouched
        assert counter(router, "vllm_fleet_stream_continuations_failed", reason="request") == 1
        assert counter(router, "vllm_fleet_stream_continuations_attempted") == 0
        assert counter(router, "vllm_fleet_stream_errors", reason="disconnect") == 1


async def test_with_continuation_off_a_cut_stream_ends_with_the_error_event() -> None:
    async with (
        recording_sims(2) as (sims, bodies),
        running_router([s.url for s in sims], stream_continuation=False) as router,
    ):
        message = await cut_stream(router, sims)
        assert "mid-stream" in message and "continued" not in message, message
        assert len(bodies) == 1 and "stream_options" not in bodies[0]
        assert counter(router, "vllm_fleet_stream_continuations_failed", reason="request") == 0


async def test_with_no_other_replica_the_stream_ends_with_the_error_event() -> None:
    async with recording_sims(1) as (sims, _), running_router([sims[0].url]) as router:
        message = await cut_stream(router, sims)
        assert "mid-stream" in message
        assert (
            "could not be continued on another replica: no replica took the rest (No "
            "healthy replica" in message
        ), message
        assert counter(router, "vllm_fleet_stream_continuations_attempted") == 1
        assert counter(router, "vllm_fleet_stream_continuations_failed", reason="replica") == 1
        await eventually(lambda: router.fleet.replicas[sims[0].url].in_flight == 0)


async def test_a_stream_outlives_several_replicas_up_to_the_limit() -> None:
    """Each replica dies after a few chunks; the answer completes while replicas remain."""
    replicas = MAX_CONTINUATIONS + 1
    async with (
        recording_sims(replicas) as (sims, bodies),
        running_router([s.url for s in sims]) as router,
        router.openai() as client,
        asyncio.timeout(DEADLINE_S),
    ):
        stream = await client.completions.create(
            model=SIM_MODEL,
            prompt="x",
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options=USAGE,
            extra_body=IGNORE_EOS,
        )
        chunks: list[Completion] = []
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) % READ_BEFORE_KILL == 0 and len(bodies) < replicas:
                await (await next_serving(sims)).stop()
        assert len(bodies) == replicas  # the first attempt and MAX_CONTINUATIONS continuations
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    assert len("".join(c.choices[0].text for c in chunks if c.choices).split()) == MAX_TOKENS
    assert counter(router, "vllm_fleet_stream_continuations_attempted") == MAX_CONTINUATIONS


async def test_a_replica_that_goes_silent_mid_stream_is_continued_elsewhere() -> None:
    """The idle bound (--first-byte-timeout between chunks, or the hung-replica monitor,
    whichever comes first) ends the silent replica's part; another replica finishes."""
    async with (
        recording_sims(2) as (sims, bodies),
        running_router([s.url for s in sims], first_byte_timeout_s=2.0) as router,
        router.openai() as client,
        asyncio.timeout(DEADLINE_S),
    ):
        stream = await client.completions.create(
            model=SIM_MODEL,
            prompt="x",
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options=USAGE,
            extra_body=IGNORE_EOS,
        )
        chunks: list[Completion] = []
        victim: SimHandle | None = None
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == READ_BEFORE_KILL:
                victim = serving(sims)
                await victim.control(hang=True)
        assert victim is not None
        await victim.control(hang=False)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    assert len("".join(c.choices[0].text for c in chunks if c.choices).split()) == MAX_TOKENS
    assert len(bodies) == 2 and counter(router, "vllm_fleet_stream_continuations_succeeded") == 1


def _sse_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def test_broken_chunked_framing_mid_stream_is_continued_elsewhere() -> None:
    """A replica streams a few events in vLLM's format, then breaks the chunked framing."""
    posts: list[bytes] = []
    relayed = asyncio.Event()  # the client holds the broken replica's events

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, body = await read_request(reader)
        if line.startswith("GET /v1/models") or line.startswith("GET /health"):
            answer = MODELS_BODY.encode() if "models" in line else b""
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(answer)}\r\nConnection: close\r\n"
            writer.write(head.encode() + b"Content-Type: application/json\r\n\r\n" + answer)
        elif line.startswith("POST "):
            posts.append(body)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            for i in range(1, 4):
                event = {
                    "id": "cmpl-broken",
                    "object": "text_completion",
                    "created": 1,
                    "model": SIM_MODEL,
                    "choices": [
                        {"index": 0, "text": f" w{i}", "logprobs": None, "finish_reason": None}
                    ],
                    "usage": {"prompt_tokens": 2, "total_tokens": 2 + i, "completion_tokens": i},
                }
                data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
                writer.write(_sse_chunk(data))
            await writer.drain()
            await relayed.wait()  # the bad framing comes in a later packet
            writer.write(b"zz\r\nnot a chunk\r\n")
        else:
            writer.write(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        await writer.drain()

    async with (
        raw_server(broken) as port,
        recording_sims(1) as (sims, bodies),
        # aiohttp's parser drops a stream whose framing breaks without failing its reader: the
        # idle bound ends it (tests/chaos/test_network_faults.py), here 2 s instead of 600.
        running_router(
            [f"http://127.0.0.1:{port}", sims[0].url], first_byte_timeout_s=2.0
        ) as router,
        router.openai() as client,
    ):
        for _ in range(20):  # until the balancer picks the broken replica (bounded)
            async with asyncio.timeout(DEADLINE_S):
                stream = await client.completions.create(
                    model=SIM_MODEL,
                    prompt="x",
                    max_tokens=10,
                    stream=True,
                    stream_options=USAGE,
                    extra_body=IGNORE_EOS,
                )
                chunks = []
                async for chunk in stream:
                    chunks.append(chunk)
                    if posts and len(chunks) == 3:
                        relayed.set()
            if posts:
                break
        assert len(posts) == 1
        texts = [c.choices[0].text for c in chunks if c.choices]
        assert "".join(texts).startswith(" w1 w2 w3")  # the broken replica's part, then the rest
        assert len("".join(texts).split()) == 10
        usage = chunks[-1].usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2, 10)
        assert {c.id for c in chunks} == {"cmpl-broken"}
        assert bodies[-1]["max_tokens"] == 7
        assert bodies[-1]["prompt"] == "x w1 w2 w3"
        assert counter(router, "vllm_fleet_stream_continuations_succeeded") == 1


async def test_the_simulator_speaks_what_continuation_relies_on() -> None:
    """Running usage in every chunk (continuous_usage_stats) and vLLM's checks of
    continue_final_message, so the tests above exercise what real vLLM does."""
    async with running_sim() as sim, aiohttp.ClientSession() as session:
        body: dict[str, Any] = {
            "model": SIM_MODEL,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "continue_final_message": True,
            "add_generation_prompt": False,
        }
        async with session.post(f"{sim.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            events = [e[6:] for e in (await resp.read()).split(b"\n\n") if e]
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3]
        for wrong in ({"add_generation_prompt": True}, {"messages": body["messages"][:1]}):
            async with session.post(
                f"{sim.url}/v1/chat/completions", json={**body, **wrong}
            ) as resp:
                assert resp.status == 400
