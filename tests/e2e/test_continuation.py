"""Streams that survive their replica, with two real vLLM CPU replicas
(vllm_fleet.router.continuation).

First what the router relies on, asked of real vLLM 0.32 directly: it takes the continuation
requests (a chat's partial assistant message with ``continue_final_message: true`` and
``add_generation_prompt: false`` under the tiny model's chat template; a prompt extended by
the text so far), puts running usage in every chunk with ``continuous_usage_stats``, and
serializes token events the way the Stitcher's fast path expects. Then the real thing: a
replica SIGKILLed mid-stream, and the official client still reads ``max_tokens`` tokens under
one id with the usage of the whole answer. This module kills a replica of its own pair, so its
kill test runs last.
"""

from __future__ import annotations

import json
import signal
from typing import Any
from unittest.mock import patch

import aiohttp
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.support import MODEL, Server, get_json, http_get
from vllm_fleet.launcher.runtime.process import signal_group
from vllm_fleet.router.continuable import Kind, Plan, plan_for
from vllm_fleet.router.stitcher import Stitcher, fast_match

pytestmark = pytest.mark.e2e

#: Long enough that the stream is mid-way when its replica dies (the tiny model on 2 busy
#: cores makes tens of tokens a second), short of the replicas' 1024-token context.
MAX_TOKENS = 400
READ_BEFORE_KILL = 20
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me everything about lighthouses."}
]
RUNNING_USAGE = {"include_usage": True, "continuous_usage_stats": True}


async def stream_events(url: str, path: str, body: dict[str, Any]) -> list[bytes]:
    """POST a streaming request straight to a replica; its SSE events, as sent."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        session.post(url + path, json=body) as resp,
    ):
        raw = await resp.read()
        assert resp.status == 200, raw[:500]
    return [e for e in raw.split(b"\n\n") if e]


def check_continuation_stream(kind: Kind, events: list[bytes], tokens: int) -> None:
    """Running usage on every chunk, every event on the fast path, and a Stitcher that
    counts ``tokens`` and could continue the stream again."""
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert events[-1] == b"data: [DONE]"
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert counts == sorted(counts) and counts[-1] == tokens
    token_events = [e for e, c in zip(events, chunks, strict=False) if c["choices"]]
    if kind == "chat":
        token_events = token_events[1:]  # the role chunk has a pattern of its own
    assert all(fast_match(kind, e) for e in token_events), token_events[:2]
    request = {"model": MODEL, "stream": True, "max_tokens": tokens + 10}
    request |= {"prompt": "p"} if kind == "completion" else {"messages": MESSAGES}
    plan = plan_for(kind, request)
    assert isinstance(plan, Plan)
    stitcher = Stitcher(plan)
    # every event of real vLLM's stream, the first and the usage one too, is read by a match
    with patch.object(json, "loads", side_effect=AssertionError("parsed")):
        stitcher.feed(b"".join(e + b"\n\n" for e in events))
    assert stitcher.sent == tokens and not stitcher.spoiled


async def test_real_vllm_continues_a_partial_assistant_message(vllm_pair: list[Server]) -> None:
    body = {
        "model": MODEL,
        "messages": [*MESSAGES, {"role": "assistant", "content": "Lighthouses are"}],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": 6,
        "ignore_eos": True,
        "stream": True,
        "stream_options": RUNNING_USAGE,
    }
    events = await stream_events(vllm_pair[0].url, "/v1/chat/completions", body)
    check_continuation_stream("chat", events, 6)
    # The partial message is the end of the prompt: no end-of-turn marker, no new header.
    plain = {**body, "continue_final_message": False, "add_generation_prompt": True}
    reference = await stream_events(vllm_pair[0].url, "/v1/chat/completions", plain)
    continued_prompt = json.loads(events[0][6:])["usage"]["prompt_tokens"]
    assert continued_prompt < json.loads(reference[0][6:])["usage"]["prompt_tokens"]


async def test_real_vllm_continues_a_prompt_with_running_usage(vllm_pair: list[Server]) -> None:
    body = {
        "model": MODEL,
        "prompt": "Lighthouses are tall towers that",
        "max_tokens": 6,
        "ignore_eos": True,
        "stream": True,
        "stream_options": RUNNING_USAGE,
    }
    events = await stream_events(vllm_pair[1].url, "/v1/completions", body)
    check_continuation_stream("completion", events, 6)


def router_counter(router: Server, name: str) -> float:
    status, body = http_get(router.url + "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in the router's /metrics")


async def test_a_chat_stream_survives_its_replica_killed(
    vllm_pair: list[Server], router: Server
) -> None:
    async with AsyncOpenAI(
        base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        whole = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=1, extra_body={"ignore_eos": True}
        )
        assert whole.usage is not None
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks: list[ChatCompletionChunk] = []
        victim: Server | None = None
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == READ_BEFORE_KILL:
                busy = [
                    r["url"] for r in get_json(router.url + "/fleet/replicas") if r["in_flight"]
                ]
                assert len(busy) == 1, busy
                victim = next(s for s in vllm_pair if s.url == busy[0])
                assert signal_group(victim.proc.pid, signal.SIGKILL)
    assert victim is not None and victim.proc.wait(timeout=30) is not None

    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.created for c in chunks} == {chunks[0].created}
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["length"]
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == MAX_TOKENS
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.total_tokens == whole.usage.prompt_tokens + MAX_TOKENS
    assert router_counter(router, "vllm_fleet_stream_continuations_succeeded_total") == 1
    assert router_counter(router, "vllm_fleet_stream_continuations_attempted_total") == 1
