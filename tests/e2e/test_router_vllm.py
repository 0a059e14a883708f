"""The router in front of two real vLLM CPU replicas, driven by the official OpenAI client.

Random weights make the text meaningless, so the tests check what vLLM guarantees instead:
token counts (``ignore_eos`` makes every request run to ``max_tokens``), finish reasons, the
streaming protocol, and where the requests went (the router's and vLLM's own counters).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence

import aiohttp
import pytest
from openai import AsyncOpenAI

from tests.e2e.support import MODEL, Server, get_json, vllm_successes, wait_until

pytestmark = pytest.mark.e2e

#: run to max_tokens even if the random model picks EOS: counts become exact.
RUN_TO_LENGTH = {"ignore_eos": True}
#: the router may be this much slower than a client that splits the load evenly by itself.
MAX_SLOWDOWN = 1.5


def openai_client(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
async def client(router: Server) -> AsyncIterator[AsyncOpenAI]:
    async with openai_client(router.url) as c:
        yield c


def served(router: Server) -> dict[str, int]:
    return {r["url"]: r["served"] for r in get_json(router.url + "/fleet/replicas")}


async def test_models_are_the_replicas_model(client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_chat_completion(client: AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        extra_body=RUN_TO_LENGTH,
    )
    assert resp.model == MODEL
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 8
    # the chat template wraps the message in role markers: more tokens than the bare text.
    assert resp.usage.prompt_tokens > 4


async def test_completion(client: AsyncOpenAI) -> None:
    resp = await client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, extra_body=RUN_TO_LENGTH
    )
    assert resp.model == MODEL
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 12


async def test_streaming_chat_arrives_in_chunks(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=RUN_TO_LENGTH,
    )
    chunks = [chunk async for chunk in stream]
    with_text = [c for c in chunks if c.choices and c.choices[0].delta.content]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert len(with_text) >= 2, f"expected many chunks, got {len(chunks)}"
    assert [f for f in finishes if f] == ["length"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16


async def test_streaming_completion_ends_with_done(router: Server) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "stream": True, **RUN_TO_LENGTH}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{router.url}/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    data = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert len(events) >= 2
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def _complete_all(urls: Sequence[str], max_tokens: int) -> float:
    """Send one completion to each url in `urls` at once; seconds until all have finished."""
    clients = {url: openai_client(url) for url in set(urls)}
    try:
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                clients[url].completions.create(
                    model=MODEL, prompt=f"Request {i}:", max_tokens=max_tokens,
                    extra_body=RUN_TO_LENGTH,
                )
                for i, url in enumerate(urls)
            )
        )  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        for c in clients.values():
            await c.close()
    assert all(r.usage is not None and r.usage.completion_tokens == max_tokens for r in results)
    return elapsed


async def test_both_replicas_serve_and_counts_agree(
    router: Server, vllm_pair: list[Server]
) -> None:
    requests = 16
    vllm_before = {s.url: vllm_successes(s.url) for s in vllm_pair}
    router_before = served(router)

    await _complete_all([router.url] * requests, max_tokens=32)

    vllm_delta = {s.url: vllm_successes(s.url) - vllm_before[s.url] for s in vllm_pair}
    router_delta = {url: n - router_before[url] for url, n in served(router).items()}
    assert sum(vllm_delta.values()) == requests
    assert all(n > 0 for n in vllm_delta.values()), f"a replica got nothing: {vllm_delta}"
    assert router_delta == {url: round(n) for url, n in vllm_delta.items()}


def router_sees_idle_replicas(router: Server) -> bool:
    """True once the router's last scrape of every replica shows nothing running or waiting."""
    return all(
        r["in_flight"] == 0 and r["running"] == 0 and r["waiting"] == 0
        for r in get_json(router.url + "/fleet/replicas")
    )


async def test_router_keeps_up_with_an_even_client_side_split(
    router: Server, vllm_pair: list[Server]
) -> None:
    """Not a speed-up (two replicas share two cores): the router must not cost much.

    Rounds alternate so background load hits both sides alike; the best round of each side
    is compared, because on a shared machine noise only ever adds time. Every round starts once
    the router's scrapes show both replicas idle: otherwise the client-side round just before
    looks like other clients' load on one replica for up to a scrape interval, and the router
    rightly steers around load that is no longer there. Requests are long enough (~1 s a round)
    that the extra hop's fixed cost does not dominate.
    """
    requests, max_tokens, rounds = 64, 128, 6
    even = [vllm_pair[i % 2].url for i in range(requests)]
    routed = [router.url] * requests
    await _complete_all(even, max_tokens)  # warm both replicas' caches and connections
    even_s: list[float] = []
    routed_s: list[float] = []
    splits: list[list[int]] = []
    for _ in range(rounds):
        wait_until(lambda: router_sees_idle_replicas(router), 30.0, "both replicas idle")
        even_s.append(await _complete_all(even, max_tokens))
        wait_until(lambda: router_sees_idle_replicas(router), 30.0, "both replicas idle")
        before = served(router)
        routed_s.append(await _complete_all(routed, max_tokens))
        splits.append(sorted(n - before[url] for url, n in served(router).items()))
    timings = (
        f"even split {[f'{t:.2f}' for t in even_s]}s, "
        f"router {[f'{t:.2f}' for t in routed_s]}s (its splits {splits})"
    )
    print(timings, file=sys.stderr)
    assert min(routed_s) <= MAX_SLOWDOWN * min(even_s), timings
