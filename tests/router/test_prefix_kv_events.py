"""vLLM KV events in the router: the flag, both event encodings, what the events do to the
prefix record, and a subscriber following a simulated replica that publishes them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from tests.support.ports import free_port
from tests.support.router import RouterHandle, eventually, running_router
from tests.support.sim import SIM_MODEL, running_sim
from vllm_fleet.launcher.sim.config import KvEventsConfig
from vllm_fleet.router.config import RouterConfig
from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.kv_batches import Event, apply_batch, block_hashes, decode_batch
from vllm_fleet.router.kv_events import KvEventsSpec, parse_kv_events_spec
from vllm_fleet.router.prefix_index import MAX_EVENT_BLOCKS, prefix_keys
from vllm_fleet.router.state import ReplicaState

# --- the flag -------------------------------------------------------------------------------


def test_spec_port_named_endpoints_and_auto() -> None:
    spec = parse_kv_events_spec(["5557", "http://b:8000/=tcp://10.0.0.2:6000", "auto"])
    assert spec.endpoint("http://a:8000") == "tcp://a:5557"
    assert spec.endpoint("http://b:8000") == "tcp://10.0.0.2:6000"
    assert spec.endpoint("http://[::1]:8000") == "tcp://[::1]:5557"
    assert spec.auto
    assert KvEventsSpec().endpoint("http://a:8000") is None


@pytest.mark.parametrize("bad", ["x", "70000", "http://a:1=udp://h:1", "http://a:1=tcp://h"])
def test_a_bad_spec_names_the_flag(bad: str) -> None:
    with pytest.raises(ConfigError, match="--kv-events"):
        RouterConfig(backends=("http://a:1",), kv_events=(bad,))


# --- decoding -------------------------------------------------------------------------------


def test_both_event_encodings_decode() -> None:
    named = [
        {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
         "token_ids": [0] * 32, "block_size": 16, "lora_id": None, "medium": "GPU"},
        {"type": "BlockRemoved", "block_hashes": [b"\x01" * 32], "medium": "GPU"},
        {"type": "AllBlocksCleared"},
    ]  # fmt: skip
    arrays = [
        ["BlockStored", [3], None, [0] * 16, 16, None, "CPU"],
        ["BlockRemoved", [3], None],
        ["AllBlocksCleared"],
        ["SomethingNew", 1],
    ]
    events = decode_batch(msgspec.msgpack.encode([1.0, named, None]))
    assert events == [
        Event("BlockStored", (1, 2), 16, "GPU", root_tokens=(0,) * 16),
        Event("BlockRemoved", (b"\x01" * 32,), 0, "GPU"),
        Event("AllBlocksCleared"),
    ]
    events = decode_batch(msgspec.msgpack.encode([1.0, arrays, 0]))
    assert events == [
        Event("BlockStored", (3,), 16, "CPU", root_tokens=(0,) * 16),
        Event("BlockRemoved", (3,), 0, None),
        Event("AllBlocksCleared"),
    ]
    assert list(block_hashes(events)) == []  # CPU-tier blocks are not the device cache


@pytest.mark.parametrize("payload", [b"\xc1", msgspec.msgpack.encode({"a": 1}), b""])
def test_garbage_is_not_a_batch(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_batch(payload)


# --- what events do to the record -----------------------------------------------------------


def test_events_keep_the_block_set_and_correct_the_record() -> None:
    replica = ReplicaState(url="http://a:1")
    keys = prefix_keys("m", "x" * 128 * 40)  # 22 keys
    replica.prefixes.record(keys, 0.0)
    apply_batch(replica, 0, [Event("BlockStored", (1, 2, 3, 4), 16, "GPU")])
    events = replica.prefixes.events
    assert events is not None and events.hashes == {1, 2, 3, 4} and events.block_size == 16
    # the replica evicted half its blocks: half the record goes, oldest first
    apply_batch(replica, 1, [Event("BlockRemoved", (1, 2), 0, "GPU")])
    assert events.hashes == {3, 4}
    assert len(replica.prefixes) == len(keys) // 2
    # CPU-tier events do not touch the device block set; a skipped batch is counted
    apply_batch(replica, 3, [Event("BlockRemoved", (3,), 0, "CPU")])
    assert events.hashes == {3, 4} and events.missed == 1
    apply_batch(replica, 4, [Event("AllBlocksCleared")])
    assert events.hashes == set() and len(replica.prefixes) == 0 and events.cleared == 1


def test_the_replayed_history_fills_the_block_set_and_leaves_the_record() -> None:
    """What a replica did before the router subscribed (a reset, evictions) is older than
    what the router sent it since: the history corrects nothing, the live stream does."""
    replica = ReplicaState(url="http://a:1")
    keys = prefix_keys("m", "x" * 128 * 40)
    replica.prefixes.record(keys, 0.0)
    history = [Event("AllBlocksCleared"), Event("BlockStored", (1, 2), 16, "GPU")]
    apply_batch(replica, 0, history, history=True)
    apply_batch(replica, 1, [Event("BlockRemoved", (1,), 0, "GPU")], history=True)
    events = replica.prefixes.events
    assert events is not None and events.hashes == {2} and events.cleared == 1
    assert len(replica.prefixes) == len(keys)  # the record kept every key
    apply_batch(replica, 2, [Event("AllBlocksCleared")])
    assert len(replica.prefixes) == 0


def test_a_block_set_that_outgrows_any_cache_is_dropped() -> None:
    replica = ReplicaState(url="http://a:1")
    apply_batch(replica, 0, [Event("BlockStored", tuple(range(MAX_EVENT_BLOCKS)), 16, "GPU")])
    events = replica.prefixes.events
    assert events is not None and len(events.hashes) == MAX_EVENT_BLOCKS
    apply_batch(replica, 1, [Event("BlockStored", (-1,), 16, "GPU")])
    assert events.hashes == set() and events.overflows == 1


# --- against a simulated replica that publishes events --------------------------------------


@dataclass
class Tally:
    """What an independent subscriber received: the device blocks held, batches seen."""

    held: set[int | bytes] = field(default_factory=set)
    batches: int = 0
    cleared: int = 0


@asynccontextmanager
async def independent_subscriber(endpoint: str) -> AsyncIterator[Tally]:
    """A subscriber of our own, to compare the router's block set with: it keeps the stored
    minus removed device blocks of every batch it receives."""
    tally = Tally()
    held = tally.held
    ctx = zmq.asyncio.Context()
    socket = ctx.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(endpoint)

    async def receive() -> None:
        while True:
            _, _, payload = await socket.recv_multipart()
            tally.batches += 1
            for e in decode_batch(payload):
                if e.kind == "BlockStored":
                    held.update(e.hashes)
                elif e.kind == "BlockRemoved":
                    held.difference_update(e.hashes)
                else:
                    held.clear()
                    tally.cleared += 1

    task = asyncio.create_task(receive())
    try:
        yield tally
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        socket.close(linger=0)
        ctx.term()


async def chats(router: RouterHandle, groups: int, per_group: int) -> None:
    async with aiohttp.ClientSession() as session:
        for q in range(per_group):
            for g in range(groups):
                body: dict[str, Any] = {
                    "model": SIM_MODEL,
                    "messages": [
                        {"role": "system", "content": f"Group {g} system prompt. " * 20},
                        {"role": "user", "content": f"question {q}"},
                    ],
                    "max_tokens": 2,
                }
                async with session.post(f"{router.url}/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()


async def reset(url: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/reset_prefix_cache") as resp,
    ):
        assert resp.status == 200


async def aligned(router: RouterHandle, theirs: Tally) -> None:
    """Until both subscribers get batches, then a reset of the prefix cache, so both count
    from the same AllBlocksCleared. A ZMQ SUB joins a little after connect() and misses what
    was published before (the slow joiner): the sim is poked with a chat until it joined."""
    replica = next(iter(router.fleet.replicas.values()))
    deadline = time.monotonic() + 10
    i = 0
    while (
        replica.prefixes.events is None or not replica.prefixes.events.batches or not theirs.batches
    ):
        assert time.monotonic() < deadline, "a subscriber never received a KV event batch"
        await chats(router, 1, 1) if i == 0 else await asyncio.sleep(0.05)
        i = (i + 1) % 10
    await reset(replica.url)
    events = replica.prefixes.events
    await eventually(lambda: events.cleared == 1 and not theirs.held, what="both cleared")


@pytest.mark.parametrize("spec", ["port", "auto"])
async def test_the_router_block_set_matches_the_replica_events(spec: str) -> None:
    """A small KV cache (24 blocks of 16 tokens) so blocks get evicted; the router's block set
    from events must equal an independent subscriber's, through stores, evictions and a
    reset of the prefix cache (which also drops the router's approximate record)."""
    port = free_port()
    events = KvEventsConfig(endpoint=f"tcp://*:{port}")
    async with running_sim(
        step_ms=1.0, kv_cache_tokens=24 * 16, max_model_len=256, kv_events=events
    ) as sim:
        flag = "auto" if spec == "auto" else str(port)
        async with (
            independent_subscriber(f"tcp://127.0.0.1:{port}") as theirs,
            running_router([sim.url], kv_events=(flag,)) as router,
        ):
            await aligned(router, theirs)
            await chats(router, groups=4, per_group=3)  # 4 groups of ~8 blocks: evicts
            replica = router.fleet.replicas[sim.url]
            ours = replica.prefixes.events
            assert ours is not None
            await eventually(lambda: ours.hashes == theirs.held, what="the same block set")
            assert ours.removed > 0, "the small cache should have evicted blocks"
            assert ours.missed == 0
            await reset(sim.url)
            # the independent subscriber hears the reset on its own socket, maybe later
            await eventually(
                lambda: ours.cleared == 2 and not theirs.held, what="AllBlocksCleared, both"
            )
            assert ours.hashes == set() == theirs.held
            assert len(replica.prefixes) == 0
