"""KV events as a real zmq subscriber sees them: vLLM 0.32's framing and msgpack layout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from tests.support.ports import free_port
from tests.support.sim import running_sim
from vllm_fleet.launcher.cli import main
from vllm_fleet.launcher.sim.config import KvEventsConfig
from vllm_fleet.launcher.sim.tokens import block_hashes, chat_token_ids, external_hash

RECV_TIMEOUT_MS = 5000


#: Probes before a subscriber counts as joined (each waits PROBE_WAIT_S for its batch).
PROBES = 100
PROBE_WAIT_S = 0.1


@dataclass
class Subscription:
    """A SUB socket on every topic."""

    sub: zmq.asyncio.Socket

    async def joined(self, url: str) -> int:
        """Readiness: a PUB drops what it sends before the subscription reached it (zmq's "slow
        joiner", real vLLM included), so probe with `POST /reset_prefix_cache` (it publishes
        AllBlocksCleared) until one arrives. Returns the probe's sequence number."""
        for _ in range(PROBES):
            await reset_prefix_cache(url)
            try:
                frames = await asyncio.wait_for(self.sub.recv_multipart(), PROBE_WAIT_S)
            except TimeoutError:
                continue
            while True:  # drain probes that arrived late
                try:
                    frames = await asyncio.wait_for(self.sub.recv_multipart(), PROBE_WAIT_S)
                except TimeoutError:
                    return int.from_bytes(frames[1], "big")
        raise AssertionError(f"no KV event batch reached the subscriber in {PROBES} probes")


@asynccontextmanager
async def subscriber(endpoint: str, *, bind: bool) -> AsyncIterator[Subscription]:
    """Subscribe to every topic; closed on exit."""
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    sub.setsockopt(zmq.LINGER, 0)
    if bind:
        sub.bind(endpoint)
    else:
        sub.connect(endpoint)
    try:
        yield Subscription(sub)
    finally:
        sub.close(linger=0)
        ctx.term()


async def next_batch(sub: zmq.asyncio.Socket) -> tuple[bytes, int, list[Any]]:
    """(topic, seq, decoded KVEventBatch) of the next message, decoded without our structs."""
    frames = await sub.recv_multipart()
    assert len(frames) == 3
    topic, seq, payload = frames
    assert len(seq) == 8
    batch = msgspec.msgpack.decode(payload)
    assert isinstance(batch, list)
    return topic, int.from_bytes(seq, "big"), batch


async def chat(url: str, messages: list[dict[str, str]], max_tokens: int = 1) -> None:
    body = {"messages": messages, "max_tokens": max_tokens}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", data=json.dumps(body)) as response,
    ):
        assert response.status == 200


def events_config(endpoint: str, **extra: Any) -> KvEventsConfig:
    config = KvEventsConfig.parse(
        json.dumps({"enable_kv_cache_events": True, "endpoint": endpoint, **extra})
    )
    assert config is not None
    return config


SYSTEM = {"role": "system", "content": "Route every request to the replica that caches it. " * 8}


async def test_block_stored_batches_have_vllms_layout_and_hashes() -> None:
    port = free_port()
    async with subscriber(f"tcp://127.0.0.1:{port}", bind=True) as sub:
        config = events_config(f"tcp://127.0.0.1:{port}", topic="kv")
        async with running_sim(kv_events=config) as sim:
            probe = await sub.joined(sim.url)
            messages = [SYSTEM, {"role": "user", "content": "first"}]
            await chat(sim.url, messages)
            topic, seq, batch = await next_batch(sub.sub)
            await chat(sim.url, [SYSTEM, {"role": "user", "content": "second question"}])
            _, seq2, batch2 = await next_batch(sub.sub)
    assert (topic, seq, seq2) == (b"kv", probe + 1, probe + 2)
    ts, events, rank = batch
    assert isinstance(ts, float)
    assert rank == 0
    ids = chat_token_ids((m["role"], m["content"]) for m in messages)
    expected = [external_hash(h) for h in block_hashes(ids, 16)]
    assert events == [
        {
            "type": "BlockStored",
            "block_hashes": expected,
            "parent_block_hash": None,
            "token_ids": ids[: len(expected) * 16],
            "block_size": 16,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "extra_keys": [None] * len(expected),
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
        }
    ]
    # the second prompt shares the system blocks: only its own blocks are stored, chained on
    (stored,) = batch2[1]
    assert stored["parent_block_hash"] in expected
    assert set(stored["block_hashes"]).isdisjoint(expected)


async def test_eviction_and_reset_send_block_removed_and_all_blocks_cleared() -> None:
    """A cache of 8 blocks: a second long prompt evicts the first one's blocks."""
    path = f"ipc:///tmp/vllm-fleet-sim-kv-{free_port()}"  # ipc: the simulator binds
    config = events_config(path)
    async with (
        running_sim(kv_events=config, kv_cache_tokens=128, max_model_len=128) as sim,
        subscriber(path, bind=False) as sub,
    ):
        await sub.joined(sim.url)
        await chat(sim.url, [{"role": "user", "content": "a" * 300}])
        (_, _, first) = await next_batch(sub.sub)
        await chat(sim.url, [{"role": "user", "content": "b" * 300}])
        kinds: list[str] = []
        while "BlockStored" not in kinds:
            (_, _, batch) = await next_batch(sub.sub)
            kinds += [event["type"] for event in batch[1]]
        await reset_prefix_cache(sim.url)
        (_, _, cleared) = await next_batch(sub.sub)
    assert len(first[1][0]["block_hashes"]) == 5  # 2 + 75 + 2 + 2 tokens: 5 full blocks
    assert "BlockRemoved" in kinds
    assert cleared[1] == [{"type": "AllBlocksCleared"}]


async def reset_prefix_cache(url: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/reset_prefix_cache") as response,
    ):
        assert response.status == 200


async def test_replay_socket_resends_buffered_batches_then_the_end_marker() -> None:
    port, replay_port = free_port(), free_port()
    config = events_config(
        f"tcp://127.0.0.1:{port}", replay_endpoint=f"tcp://127.0.0.1:{replay_port}"
    )
    async with running_sim(kv_events=config) as sim:
        for question in ("one", "two"):
            await chat(sim.url, [SYSTEM, {"role": "user", "content": question}])
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{sim.url}/kv_event_sources") as response,
        ):
            sources = await response.json()
        ctx = zmq.asyncio.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(f"tcp://127.0.0.1:{replay_port}")
            await dealer.send_multipart((b"", (0).to_bytes(8, "big")))
            replies = [await dealer.recv_multipart() for _ in range(3)]
        finally:
            dealer.close(linger=0)
            ctx.term()
    assert sources["0"]["endpoint"] == f"tcp://127.0.0.1:{port}"
    assert sources["0"]["replay_endpoint"] == f"tcp://127.0.0.1:{replay_port}"
    assert [int.from_bytes(r[2], "big", signed=True) for r in replies] == [0, 1, -1]
    assert msgspec.msgpack.decode(replies[0][3])[1][0]["type"] == "BlockStored"


async def test_without_the_flag_there_is_no_event_source() -> None:
    async with (
        running_sim() as sim,
        aiohttp.ClientSession() as session,
        session.get(f"{sim.url}/kv_event_sources") as response,
    ):
        assert await response.json() == {}
    assert sim.engine.pool.take_events() == []  # nothing piles up unpublished


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("{not json", "kv_events_config"),
        ('{"enable_kv_cache_events": true, "endpoint": 5}', "kv_events_config.endpoint"),
        ('{"enable_kv_cache_events": true, "endpont": "tcp://*:1"}', "kv_events_config.endpont"),
        ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "kv_events_config.publisher"),
        ('{"enable_kv_cache_events": true, "endpoint": "tcp://127.0.0.1:0"}', "tcp://*:0"),
    ],
)
def test_a_bad_kv_events_config_is_one_line_naming_the_key(
    value: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["sim", "--port", "1", "--model", "m", "--kv-events-config", value])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1
    assert named in err


def test_events_off_in_the_json_means_no_publisher() -> None:
    assert KvEventsConfig.parse('{"enable_kv_cache_events": false}') is None
    assert KvEventsConfig.parse('{"enable_kv_cache_events": true, "publisher": "null"}') is None
