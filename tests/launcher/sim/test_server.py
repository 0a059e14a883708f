"""The simulator seen through the official openai client and plain HTTP, as a router sees it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient
from openai import AsyncOpenAI

from tests.support.sim import (
    SIM_MODEL,
    SimHandle,
    metric_value,
    running_sim,
    running_sims,
    scrape_metrics,
    wait_until,
)
from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.server import make_sim_app

LABELS = {"model_name": SIM_MODEL}


@pytest.fixture
async def sim() -> AsyncIterator[SimHandle]:
    async with running_sim() as handle:
        yield handle


@pytest.fixture
async def client(sim: SimHandle) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0)
    yield client
    await client.close()


async def post(url: str, body: object, timeout_s: float = 10.0) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
        session.post(url, data=json.dumps(body).encode()) as response,
    ):
        return response.status, await response.json()


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent event stream, checking the framing on the way."""
    buffer = b""
    async for data in response.content.iter_any():
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            assert event.startswith(b"data: "), event
            yield event[len(b"data: ") :].decode()
    assert buffer == b""


async def test_completion_honours_max_tokens_and_reports_usage(client: AsyncOpenAI) -> None:
    result = await client.completions.create(model=SIM_MODEL, prompt="hello", max_tokens=7)
    assert result.usage is not None
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens == 2
    assert result.usage.total_tokens == 9
    assert len(result.choices[0].text.split()) == 7
    assert result.choices[0].finish_reason == "length"
    assert result.id.startswith("cmpl-")
    assert result.model == SIM_MODEL
    assert result.created > 0


async def test_chat_completion(client: AsyncOpenAI) -> None:
    result = await client.chat.completions.create(
        model=SIM_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert result.choices[0].message.role == "assistant"
    assert len((result.choices[0].message.content or "").split()) == 4
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 4
    assert result.id.startswith("chatcmpl-")


async def test_chat_without_max_tokens_uses_the_documented_default(client: AsyncOpenAI) -> None:
    result = await client.chat.completions.create(
        model=SIM_MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert result.usage is not None
    assert result.usage.completion_tokens == 64


async def test_streamed_chat_sends_one_token_per_chunk_then_usage(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=SIM_MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens: list[str] = []
    finish_reasons: list[str | None] = []
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                tokens.append(choice.delta.content)
            finish_reasons.append(choice.finish_reason)
    assert len(tokens) == 9
    assert finish_reasons[-1] == "length"
    assert finish_reasons.count("length") == 1
    assert usage is not None
    assert usage.completion_tokens == 9


async def test_streamed_completion_framing_and_done_marker(sim: SimHandle) -> None:
    body = {"model": SIM_MODEL, "prompt": "abc", "max_tokens": 5, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sim.url}/v1/completions", json=body) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [event async for event in sse_events(response)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) == 5
    assert all(len(chunk["choices"][0]["text"].split()) == 1 for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_unknown_model_is_a_404_openai_error(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert info.value.status_code == 404
    assert info.value.body == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


async def test_bad_requests_are_400_json_errors(sim: SimHandle) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sim.url}/v1/completions", data=b"{not json") as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    status, body = await post(f"{sim.url}/v1/chat/completions", {"model": SIM_MODEL})
    assert status == 400
    assert body["error"]["param"] == "messages"
    status, body = await post(f"{sim.url}/v1/completions", {"prompt": "x", "max_tokens": 5000})
    assert status == 400
    assert "maximum context length is 4096" in body["error"]["message"]
    status, body = await post(f"{sim.url}/v1/completions", {"prompt": "x", "n": 2})
    assert status == 400
    assert sim.stats().received == 0


async def test_models_version_and_health(sim: SimHandle, client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [SIM_MODEL]
    card = models.data[0].model_dump()
    assert card["object"] == "model"
    assert card["owned_by"] == "vllm"
    assert card["root"] == SIM_MODEL
    assert card["max_model_len"] == 4096
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sim.url}/version") as response:
            assert (await response.json())["version"]
        async with session.get(f"{sim.url}/health") as response:
            assert response.status == 200
            assert await response.read() == b""


async def test_embeddings_are_deterministic(client: AsyncOpenAI) -> None:
    first = await client.embeddings.create(model=SIM_MODEL, input=["a", "b"])
    again = await client.embeddings.create(model=SIM_MODEL, input="a")
    assert len(first.data) == 2
    assert len(first.data[0].embedding) == 32
    assert first.data[0].embedding == pytest.approx(again.data[0].embedding, abs=1e-6)
    assert first.data[0].embedding != first.data[1].embedding
    assert first.usage.prompt_tokens == 2


async def test_request_id_header_is_used_and_echoed(sim: SimHandle) -> None:
    body = {"prompt": "x", "max_tokens": 1}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{sim.url}/v1/completions", json=body, headers={"X-Request-Id": "abc123"}
        ) as response,
    ):
        assert response.headers["X-Request-Id"] == "abc123"
        assert (await response.json())["id"] == "cmpl-abc123"


async def stream_tokens(url: str, max_tokens: int) -> int:
    body = {"prompt": "load", "max_tokens": max_tokens, "stream": True}
    count = 0
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/completions", json=body) as response,
    ):
        async for event in sse_events(response):
            count += event != "[DONE]"
    return count


async def test_metrics_have_vllm_names_and_gauges_follow_the_load() -> None:
    async with running_sim(
        max_num_seqs=2, step_ms=10.0, kv_cache_tokens=256, max_model_len=256
    ) as sim:
        tasks = [asyncio.create_task(stream_tokens(sim.url, 30)) for _ in range(5)]

        async def batch_full() -> bool:
            samples = await scrape_metrics(sim.url)
            return (
                metric_value(samples, "vllm:num_requests_running", **LABELS) == 2
                and metric_value(samples, "vllm:num_requests_waiting", **LABELS) == 3
            )

        await wait_until(batch_full, what="2 running and 3 waiting")
        loaded = await scrape_metrics(sim.url)
        assert metric_value(loaded, "vllm:kv_cache_usage_perc", **LABELS) > 0
        assert await asyncio.gather(*tasks) == [30] * 5
        samples = await scrape_metrics(sim.url)
    assert sim.stats().max_running_seen == 2
    expected = {
        "vllm:num_requests_running": 0,
        "vllm:num_requests_waiting": 0,
        "vllm:kv_cache_usage_perc": 0,
        "vllm:generation_tokens_total": 150,
        "vllm:prompt_tokens_total": 5,
        "vllm:time_to_first_token_seconds_count": 5,
        "vllm:e2e_request_latency_seconds_count": 5,
        "vllm:request_time_per_output_token_seconds_count": 5,
        "vllm:inter_token_latency_seconds_count": 145,
        "vllm:request_queue_time_seconds_count": 5,
    }
    for name, value in expected.items():
        assert metric_value(samples, name, **LABELS) == value, name
    assert metric_value(samples, "vllm:iteration_tokens_total_sum", **LABELS) == 155
    success = "vllm:request_success_total"
    assert metric_value(samples, success, finished_reason="length", **LABELS) == 5
    assert all(s.labels.get("engine") == "0" for s in samples if s.name.startswith("vllm:"))


async def test_closing_a_stream_aborts_the_request_upstream(sim: SimHandle) -> None:
    body = {"prompt": "x", "max_tokens": 2000, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{sim.url}/v1/completions", json=body)
        events = sse_events(response)
        for _ in range(3):
            await anext(events)
        assert sim.running == 1
        response.close()
    await wait_until(lambda: sim.stats().aborted == 1 and sim.running == 0, what="abort")
    generated = sim.stats().tokens_generated
    assert generated < 2000
    samples = await scrape_metrics(sim.url)
    success = "vllm:request_success_total"
    assert metric_value(samples, success, finished_reason="abort", **LABELS) == 1
    assert sim.stats().tokens_generated == generated


async def test_client_timeout_aborts_a_non_streaming_request(sim: SimHandle) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await post(f"{sim.url}/v1/completions", {"prompt": "x", "max_tokens": 2000}, 0.2)
    await wait_until(lambda: sim.stats().aborted == 1 and sim.running == 0, what="abort")
    assert sim.stats().finished == 0


async def test_fail_rate_knob_answers_500(sim: SimHandle, client: AsyncOpenAI) -> None:
    assert (await sim.control(fail_rate=1.0))["fail_rate"] == 1.0
    with pytest.raises(openai.InternalServerError) as info:
        await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
    assert info.value.status_code == 500
    assert sim.stats().failed == 1
    await sim.control(fail_rate=0.0)
    await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
    assert sim.stats().finished == 1


async def test_partial_fail_rate_is_seeded() -> None:
    async def failures(seed: int) -> list[int]:
        async with running_sim(fail_rate=0.5, seed=seed) as sim:
            return [
                (await post(f"{sim.url}/v1/completions", {"prompt": "x", "max_tokens": 1}))[0]
                for _ in range(12)
            ]

    first = await failures(1)
    assert first == await failures(1)
    assert set(first) == {200, 500}


async def get_status(url: str, timeout_s: float = 5.0) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
        session.get(url) as response,
    ):
        return response.status


async def test_healthy_knob_forces_health_503_but_keeps_serving(
    sim: SimHandle, client: AsyncOpenAI
) -> None:
    await sim.control(healthy=False)
    assert await get_status(f"{sim.url}/health") == 503
    await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
    await sim.control(healthy=True)
    assert await get_status(f"{sim.url}/health") == 200


async def test_hang_knob_stalls_everything_until_lifted(sim: SimHandle) -> None:
    body = {"prompt": "x", "max_tokens": 3}
    await sim.control(hang=True)
    with pytest.raises(asyncio.TimeoutError):
        await get_status(f"{sim.url}/health", timeout_s=0.2)
    with pytest.raises(asyncio.TimeoutError):
        await post(f"{sim.url}/v1/completions", body, timeout_s=0.2)
    pending = asyncio.create_task(post(f"{sim.url}/v1/completions", body))
    await wait_until(lambda: sim.state.runner.held == 1, what="request held by the hang")
    assert not pending.done()
    await sim.control(hang=False)
    status, result = await pending
    assert status == 200
    assert result["usage"]["completion_tokens"] == 3


async def test_speed_knob_changes_the_token_rate() -> None:
    async with running_sim(step_ms=10.0, batch_slowdown=0.0) as sim:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await stream_tokens(sim.url, 10)
        nominal = loop.time() - started
        await sim.control(speed=0.25)
        assert sim.state.knobs.speed == 0.25
        started = loop.time()
        await stream_tokens(sim.url, 10)
        slow = loop.time() - started
    assert nominal >= 0.1
    assert slow >= 0.4
    assert slow > 1.5 * nominal


async def test_steps_shorter_than_a_timer_tick_keep_their_rate() -> None:
    """Timers fire in whole milliseconds; 0.1 ms steps must still average 0.1 ms.

    1,000 tokens are 0.1 s of simulated time; sleeping a timer tick per step would take
    over 1 s (the benchmark's "instant" replicas answered in ~19 ms instead of ~2 ms).
    """
    async with running_sim(step_ms=0.1, batch_slowdown=0.0, max_model_len=4096) as sim:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, body = await post(
            f"{sim.url}/v1/completions", {"model": SIM_MODEL, "prompt": "x", "max_tokens": 1000}
        )
        elapsed = loop.time() - started
    assert status == 200
    assert body["usage"]["completion_tokens"] == 1000
    assert elapsed >= 0.1
    assert elapsed < 0.6


async def test_bad_control_is_a_400(sim: SimHandle) -> None:
    status, body = await post(f"{sim.url}/sim/control", {"speed": -1})
    assert status == 400
    assert "speed" in body["error"]["message"]
    status, body = await post(f"{sim.url}/sim/control", {"turbo": True})
    assert status == 400


async def test_stats_endpoint(sim: SimHandle, client: AsyncOpenAI) -> None:
    await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=3)
    async with aiohttp.ClientSession() as session, session.get(f"{sim.url}/sim/stats") as r:
        stats = await r.json()
    assert stats["received"] == 1
    assert stats["finished"] == 1
    assert stats["tokens_generated"] == 3
    assert stats["running"] == 0
    assert stats["waiting"] == 0


async def test_startup_delay_answers_503_until_loaded(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(make_sim_app(SimConfig(startup_delay=0.3, step_ms=5.0)))
    response = await client.get("/health")
    assert response.status == 503
    response = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert response.status == 503
    assert (await response.json())["error"]["code"] == 503

    async def healthy() -> bool:
        return (await client.get("/health")).status == 200

    await wait_until(healthy, what="healthy after startup delay")


async def test_stop_cuts_streams_and_refuses_connections() -> None:
    async with running_sim() as sim:
        body = {"prompt": "x", "max_tokens": 2000, "stream": True}
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"{sim.url}/v1/completions", json=body)
            events = sse_events(response)
            await anext(events)
            await sim.stop()
            with pytest.raises(aiohttp.ClientPayloadError):
                async for _ in events:
                    pass
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"{sim.url}/health")
        await sim.stop()


async def test_several_sims_are_independent() -> None:
    async with running_sims(3, max_num_seqs=2) as sims:
        assert len({s.url for s in sims}) == 3
        await stream_tokens(sims[0].url, 2)
        assert [s.stats().finished for s in sims] == [1, 0, 0]
        samples = await scrape_metrics(sims[1].url)
        assert metric_value(samples, "vllm:generation_tokens_total") == 0


async def test_a_stopped_sim_comes_back_on_the_same_port() -> None:
    async with running_sim() as sim:
        await stream_tokens(sim.url, 2)
        await sim.stop()
        async with running_sim(port=sim.port) as revived:
            assert revived.url == sim.url
            assert await stream_tokens(revived.url, 3) == 3
            assert revived.stats().finished == 1


async def test_a_shared_system_prompt_shows_up_in_the_prefix_cache_counters(
    sim: SimHandle,
) -> None:
    system = {"role": "system", "content": "You answer questions about the fleet. " * 40}
    prompts: list[int] = []
    for question in ("How many replicas?", "Which one is slow?"):
        body = {"messages": [system, {"role": "user", "content": question}], "max_tokens": 2}
        status, reply = await post(f"{sim.url}/v1/chat/completions", body)
        assert status == 200
        prompts.append(reply["usage"]["prompt_tokens"])
    samples = await scrape_metrics(sim.url)
    queries = metric_value(samples, "vllm:prefix_cache_queries_total", **LABELS)
    hits = metric_value(samples, "vllm:prefix_cache_hits_total", **LABELS)
    text = len(system["content"]) // 4  # 4 bytes a token
    shared = 2 + text + 4  # system header, its text, its end and the user header
    assert queries == sum(prompts)
    assert hits == shared // 16 * 16  # the shared whole blocks, once
    assert metric_value(samples, "vllm:prompt_tokens_cached_total", **LABELS) == hits
    info = [s for s in samples if s.name == "vllm:cache_config_info"]
    assert info[0].labels["block_size"] == "16"
    assert int(info[0].labels["num_gpu_blocks"]) == sim.config.kv_cache_tokens // 16
    stats = sim.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (queries, hits)


async def test_reset_prefix_cache_forgets_cached_blocks(sim: SimHandle) -> None:
    body = {"prompt": "a long shared prompt " * 20, "max_tokens": 1}
    for _ in range(2):
        assert (await post(f"{sim.url}/v1/completions", body))[0] == 200
    hits_before = sim.stats().prefix_cache_hits
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sim.url}/reset_prefix_cache") as response,
    ):
        assert response.status == 200
    assert (await post(f"{sim.url}/v1/completions", body))[0] == 200
    assert hits_before > 0
    assert sim.stats().prefix_cache_hits == hits_before
    assert sim.engine.pool.num_cached > 0  # the last request cached its blocks again


async def test_the_next_turn_of_a_chat_hits_the_previous_prompt_and_reply(sim: SimHandle) -> None:
    """The reply re-tokenizes to the generated ids, so its blocks are hits too (as in vLLM)."""
    messages = [
        {"role": "system", "content": "Answer briefly. " * 10},
        {"role": "user", "content": "Tell me about the fleet."},
    ]
    status, first = await post(
        f"{sim.url}/v1/chat/completions", {"messages": messages, "max_tokens": 40}
    )
    assert status == 200
    reply = first["choices"][0]["message"]["content"]
    followup = [
        *messages,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And?"},
    ]
    hits_before = sim.stats().prefix_cache_hits
    status, second = await post(
        f"{sim.url}/v1/chat/completions", {"messages": followup, "max_tokens": 1}
    )
    assert status == 200
    computed_by_first = first["usage"]["prompt_tokens"] + 40 - 1  # the last token is not fed back
    assert sim.stats().prefix_cache_hits - hits_before == computed_by_first // 16 * 16
    assert second["usage"]["prompt_tokens"] > computed_by_first
