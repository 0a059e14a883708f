"""The replay socket of a KV-event publisher (vllm_fleet.router.kv_replay): a router that
subscribes after its replica cached prompts learns them at once, and a gap in the sequence
numbers is filled from the publisher's buffer instead of being lost."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from tests.support.ports import free_port
from tests.support.router import eventually, running_router
from tests.support.sim import SIM_MODEL, running_sim
from vllm_fleet.launcher.sim.config import KvEventsConfig
from vllm_fleet.launcher.sim.kv_events import KVEventBatch, to_wire
from vllm_fleet.launcher.sim.kvcache import StoredEvent
from vllm_fleet.router.kv_events import KvSource, source_from_sources, subscribe
from vllm_fleet.router.kv_replay import REPLAY_IDLE_S, replay
from vllm_fleet.router.precise import LiveBlockSet, live_events
from vllm_fleet.router.state import Fleet, ReplicaState


def test_kv_event_sources_answer_gives_both_addresses() -> None:
    """vLLM's GET /kv_event_sources as a replica started by vllm_args answers it."""
    answer = {
        "0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": "tcp://*:18432",
            "replay_endpoint": "tcp://*:19432",
        }
    }
    assert source_from_sources(answer, "http://10.1.2.3:8000") == KvSource(
        "tcp://10.1.2.3:18432", "tcp://10.1.2.3:19432"
    )
    plain = {"0": {"publisher": "zmq", "endpoint": "tcp://events.local:7000"}}
    assert source_from_sources(plain, "http://a:1") == KvSource("tcp://events.local:7000")
    bad_replay = {"0": {"endpoint": "tcp://*:1", "replay_endpoint": "ipc:///tmp/r"}}
    assert source_from_sources(bad_replay, "http://a:1") == KvSource("tcp://a:1")
    assert source_from_sources({}, "http://a:1") is None
    assert source_from_sources({"0": {"endpoint": "ipc:///tmp/x"}}, "http://a:1") is None


# --- a publisher of our own, which can leave batches out of its live stream ----------------


def _payload(block: int, tokens: int = 4) -> bytes:
    """One batch storing one block of ``tokens`` tokens whose hash is ``block`` (a child
    block: the router checks the hash of a prompt's first block, which these are not)."""
    stored = StoredEvent((block,), 1, tuple(range(1000, 1000 + tokens)), tokens)
    batch = KVEventBatch(ts=0.0, events=[to_wire(stored)], data_parallel_rank=0)
    return msgspec.msgpack.encode(batch)


class Publisher:
    """vLLM's wire format: PUB ``[topic, seq, payload]`` and a ROUTER replay socket answering
    from a buffer. ``send(seq, live=False)`` buffers a batch without publishing it (a batch
    lost at the high-water mark)."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.replay_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.pub.bind(self.endpoint)
        self.router.bind(self.replay_endpoint)
        self.buffer: list[tuple[int, bytes]] = []
        self.requests: list[int] = []

    async def send(self, seq: int, block: int, *, live: bool = True) -> None:
        payload = _payload(block)
        self.buffer.append((seq, payload))
        if live:
            await self.pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))

    async def serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            self.requests.append(first)
            for seq, payload in self.buffer:
                if seq >= first:
                    await self.router.send_multipart(
                        (client, b"", b"", seq.to_bytes(8, "big"), payload)
                    )
            await self.router.send_multipart(
                (client, b"", b"", (-1).to_bytes(8, "big", signed=True), b"")
            )

    def close(self) -> None:
        self.pub.close(linger=0)
        self.router.close(linger=0)
        self.ctx.term()


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@asynccontextmanager
async def publishing() -> AsyncIterator[Publisher]:
    publisher = Publisher()
    task = asyncio.create_task(publisher.serve_replay())
    try:
        yield publisher
    finally:
        await _cancelled(task)
        publisher.close()


@asynccontextmanager
async def subscribed(source: KvSource) -> AsyncIterator[ReplicaState]:
    """The router's subscriber following ``source`` for one replica."""
    fleet = Fleet()
    fleet.set_backends(["http://replica:1"])
    replica = fleet.replicas["http://replica:1"]
    ctx = zmq.asyncio.Context()
    task = asyncio.create_task(subscribe(ctx, replica, source, fleet))
    try:
        yield replica
    finally:
        await _cancelled(task)
        ctx.term()


def _held(replica: ReplicaState) -> set[int | bytes]:
    events = replica.prefixes.events
    return set() if events is None else events.hashes


async def test_a_replay_hands_over_the_buffered_batches_from_its_start() -> None:
    async with publishing() as publisher:
        for seq in range(3):
            await publisher.send(seq, 100 + seq, live=False)
        got: list[int] = []

        def take(seq: int, payload: bytes) -> None:
            got.append(seq)

        assert await replay(publisher.ctx, publisher.replay_endpoint, 1, take) == (True, 2)
        assert got == [1, 2]


#: vLLM's replay side in a process of its own, as in vLLM: a plain ROUTER socket with default
#: options, each request answered by sending every buffered batch from its start in a tight
#: loop (ZmqEventPublisher._service_replay). The batches LOST_FROM..LOST_TO are left out of
#: the first answer, as the ROUTER socket drops what its full send queue cannot take. Prints
#: the start of every request it answered, one per line, when its stdin closes.
_VLLM_REPLAY = """
import sys, threading, msgspec, zmq
from vllm_fleet.launcher.sim.kv_events import KVEventBatch, to_wire
from vllm_fleet.launcher.sim.kvcache import StoredEvent
endpoint, batches, tokens, lost_from, lost_to = sys.argv[1], *map(int, sys.argv[2:6])
encode = msgspec.msgpack.Encoder().encode
buffer = [
    encode(KVEventBatch(ts=0.0, events=[to_wire(StoredEvent(
        (100 + seq,), 1, tuple(range(1000, 1000 + tokens)), tokens))], data_parallel_rank=0))
    for seq in range(batches)
]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
ctx = zmq.Context()
socket = ctx.socket(zmq.ROUTER)
socket.bind(endpoint)
asked = []
print("ready", flush=True)
while not stop.is_set():
    if not socket.poll(50):
        continue
    client, _, start = socket.recv_multipart()
    first = int.from_bytes(start, "big")
    asked.append(first)
    for seq in range(first, batches):
        if len(asked) == 1 and lost_from <= seq < lost_to:
            continue
        socket.send_multipart((client, b"", b"", seq.to_bytes(8, "big"), buffer[seq]))
    socket.send_multipart((client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""))
print(*asked, sep="\\n", flush=True)
socket.close(linger=0)
"""


async def test_vllms_whole_default_buffer_is_replayed_whole_on_subscribing() -> None:
    """10,000 batches (vLLM's default buffer_steps) of ~3 KB, from another process sending
    them as fast as vLLM's thread does. Its ROUTER socket drops what its send queue cannot
    take, and the first answer here leaves 5,000-5,086 out anyway: the subscriber asks
    again from each first batch lost and ends up with every block, each batch applied once,
    none counted missed."""
    replay_endpoint = f"tcp://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-c", _VLLM_REPLAY, replay_endpoint, "10000", "1000", "5000", "5087"]
    server = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert server.stdin is not None and server.stdout is not None
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)  # the live socket: nothing is published on it
    live = f"tcp://127.0.0.1:{free_port()}"
    pub.bind(live)
    try:
        assert await asyncio.wait_for(server.stdout.readline(), 60) == b"ready\n"
        async with subscribed(KvSource(live, replay_endpoint)) as replica:
            await eventually(
                lambda: (e := replica.prefixes.events) is not None and e.replayed == 10_000,
                deadline_s=60,
                what="all 10,000 batches replayed",
            )
            events = replica.prefixes.events
            assert events is not None
            assert len(events.hashes) == events.batches == 10_000
            assert events.missed == 0
    finally:
        server.stdin.close()
        out, _ = await asyncio.wait_for(server.communicate(), 30)
        pub.close(linger=0)
        ctx.term()
    asked = [int(line) for line in out.split()]
    # asked again from each first batch lost (5,000 at the latest), always further on
    assert asked[0] == 0 and 0 < asked[1] <= 5_000
    assert asked == sorted(set(asked))


async def test_a_replay_socket_that_never_answers_is_given_up_after_the_default_idle_time() -> None:
    ctx = zmq.asyncio.Context()
    started = time.monotonic()
    try:
        answer = await replay(ctx, f"tcp://127.0.0.1:{free_port()}", 0, lambda s, p: None)
    finally:
        ctx.term()
    assert answer == (False, 0)
    assert REPLAY_IDLE_S <= time.monotonic() - started < REPLAY_IDLE_S + 2


async def test_the_block_set_is_used_only_once_the_history_is_read() -> None:
    """Precise matching waits for the replay: while the replay socket has not answered, the
    block set lacks the replica's history (vllm_fleet.router.precise.live_events)."""
    publisher = Publisher()
    try:
        await publisher.send(0, 100, live=False)
        source = KvSource(publisher.endpoint, publisher.replay_endpoint)
        async with subscribed(source) as replica:
            await eventually(
                lambda: isinstance(replica.prefixes.events, LiveBlockSet), what="the block set"
            )
            events = replica.prefixes.events
            assert isinstance(events, LiveBlockSet)
            assert events.synced is False and live_events(replica) is None
            serving = asyncio.create_task(publisher.serve_replay())  # the replay answers now
            try:
                await eventually(lambda: events.synced, what="the history read")
                assert events.hashes == {100}
                assert live_events(replica) is events
            finally:
                await _cancelled(serving)
    finally:
        publisher.close()


async def test_history_on_subscribing_and_a_gap_are_replayed_and_duplicates_skipped() -> None:
    """Batches 0-1 were published before the router subscribed; then the live stream skips
    3-4 (lost at the high-water mark). Every block is held, none counted missed, and the
    live copies of replayed batches are not applied twice."""
    async with publishing() as publisher:
        await publisher.send(0, 100, live=False)
        await publisher.send(1, 101, live=False)
        source = KvSource(publisher.endpoint, publisher.replay_endpoint)
        async with subscribed(source) as replica:
            await eventually(lambda: _held(replica) == {100, 101}, what="the history")
            events = replica.prefixes.events
            assert events is not None
            # the SUB socket joins a little after connect(): publish until it hears one (what
            # it missed meanwhile is a gap too, filled by a replay)
            seq = 1
            while events.last_seq < seq:
                seq += 1
                assert seq < 200, "the subscriber never heard a live batch"
                await publisher.send(seq, 100 + seq)
                await asyncio.sleep(0.05)
            await publisher.send(seq + 1, 100 + seq + 1, live=False)
            await publisher.send(seq + 2, 100 + seq + 2, live=False)
            await publisher.send(seq + 3, 100 + seq + 3)
            await eventually(lambda: 100 + seq + 3 in _held(replica), what="the live batch")
            assert _held(replica) == {100 + s for s in range(seq + 4)}
            assert events.missed == 0
            assert events.replayed >= 4  # 0-1 on subscribing, seq+1 and seq+2 for the gap
            assert events.batches == seq + 4  # each batch applied once
            assert publisher.requests[0] == 0 and publisher.requests[-1] == seq + 1


async def test_an_engine_restarted_right_after_the_replay_starts_the_block_set_again() -> None:
    """The replica's history (batches 0-9) is replayed when the router subscribes; then the
    engine restarts before any live batch came (an empty cache, its count from 0 again). Its
    batches 1, 2, ... are numbered below the last one applied but are not copies of replayed
    ones: the router drops the old blocks and reads the new engine's from its replay."""
    async with publishing() as publisher:
        for seq in range(10):
            await publisher.send(seq, 100 + seq, live=False)
        source = KvSource(publisher.endpoint, publisher.replay_endpoint)
        async with subscribed(source) as replica:
            await eventually(lambda: len(_held(replica)) == 10, what="the history")
            publisher.buffer.clear()  # the engine restarts
            await publisher.send(0, 200, live=False)
            seq = 0
            while not _held(replica) & {200 + s for s in range(seq + 1)}:
                seq += 1
                assert seq < 10, "the subscriber heard none of the new engine's batches"
                await publisher.send(seq, 200 + seq)
                await asyncio.sleep(0.05)
            await eventually(
                lambda: _held(replica) == {200 + s for s in range(seq + 1)},
                what="only the new engine's blocks",
            )
            events = replica.prefixes.events
            assert events is not None and events.missed == 0 and events.last_seq == seq
            assert publisher.requests[-1] == 0  # the new engine's history, from its start


async def test_a_publisher_without_replay_counts_the_gap_as_missed() -> None:
    """The same gap with no replay socket known: the batches are lost and counted."""
    async with publishing() as publisher, subscribed(KvSource(publisher.endpoint)) as replica:
        seq = 0
        while not _held(replica):
            await publisher.send(seq, 100 + seq)
            await asyncio.sleep(0.05)
            seq += 1
            assert seq < 200, "the subscriber never heard a live batch"
        await eventually(
            lambda: (e := replica.prefixes.events) is not None and e.last_seq == seq - 1,
            what="every live batch heard",
        )
        await publisher.send(seq, 100 + seq, live=False)
        await publisher.send(seq + 1, 100 + seq + 1)
        await eventually(lambda: 100 + seq + 1 in _held(replica), what="the live batch")
        events = replica.prefixes.events
        assert events is not None and events.missed == 1 and events.replayed == 0
        assert 100 + seq not in _held(replica)
        assert publisher.requests == []


# --- a router that starts after its replica cached prompts ----------------------------------


async def _chat(url: str, group: int) -> None:
    body: dict[str, Any] = {
        "model": SIM_MODEL,
        "messages": [{"role": "system", "content": f"Group {group} system prompt. " * 20}],
        "max_tokens": 2,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("with_replay", [True, False])
async def test_a_router_started_after_the_replica_cached_prompts(with_replay: bool) -> None:
    """Three prompts cached on the replica before the router exists. With the replica's
    replay socket (as vllm_args starts vLLM) the router's block set is the replica's whole
    cache as soon as it subscribed, with no request since; without it, only what is stored
    afterwards."""
    port = free_port()
    replay_endpoint = f"tcp://*:{free_port()}" if with_replay else None
    events = KvEventsConfig(endpoint=f"tcp://*:{port}", replay_endpoint=replay_endpoint)
    async with running_sim(
        step_ms=1.0, kv_cache_tokens=64 * 16, max_model_len=512, kv_events=events
    ) as sim:
        for group in range(3):
            await _chat(sim.url, group)
        pool = sim.state.engine.pool
        before = pool.num_cached
        assert before > 0
        async with running_router([sim.url], kv_events=("auto",)) as router:
            replica = router.fleet.replicas[sim.url]
            if with_replay:
                # no request since the router started: what it holds, the replay brought
                # (the replay's batches are applied as they come: wait for all of them)
                await eventually(
                    lambda: len(_held(replica)) == before,
                    deadline_s=15,
                    what="the replica's buffered events replayed",
                )
                block_set = replica.prefixes.events
                assert block_set is not None and block_set.replayed > 0
                assert pool.num_cached == before
            else:
                # a fresh prompt after subscribing: the router hears it once its SUB joined
                group, deadline = 100, time.monotonic() + 15
                while not (replica.prefixes.events and replica.prefixes.events.batches):
                    assert time.monotonic() < deadline, "the router never received a KV batch"
                    await _chat(sim.url, group)
                    await asyncio.sleep(0.05)
                    group += 1
                await eventually(lambda: len(_held(replica)) > 0, what="blocks held")
                assert len(_held(replica)) <= pool.num_cached - before
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{router.url}/metrics") as resp,
            ):
                text = await resp.text()
            line = f'vllm_fleet_kv_event_batches_replayed_total{{replica="{sim.url}"}}'
            (value,) = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)]
            assert (value > 0) is with_replay
