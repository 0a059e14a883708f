"""KV-cache events on a ZMQ PUB socket, byte for byte as vLLM 0.32's ZmqEventPublisher sends them.

Why: a router's precise prefix index subscribes to these events on real vLLM; the simulator
must send the same thing so the index can be tested and benchmarked without a GPU.

The wire format (vllm/distributed/kv_events.py):

- each message is multipart ``[topic, seq, payload]``: `seq` counts batches from 0 as an 8-byte
  big-endian integer, `payload` is one msgpack-encoded `KVEventBatch`;
- `KVEventBatch` is an array ``[ts, events, data_parallel_rank]``; each event a map tagged with
  ``"type"`` (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`), fields left out when equal to
  their default (msgspec `omit_defaults`), block hashes as 64-bit ints;
- an optional ROUTER replay socket: a client sends ``[b"", start seq (8 bytes)]`` and gets every
  buffered batch from there as ``[b"", topic, seq, payload]``, then ``[b"", b"", -1, b""]``.

Sends never block: as vLLM's PUB socket, a subscriber that cannot keep up loses messages at the
high-water mark (and can ask the replay socket for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from vllm_fleet.launcher.sim.config import KvEventsConfig
from vllm_fleet.launcher.sim.kvcache import CacheEvent, ClearedEvent, RemovedEvent, StoredEvent

#: vLLM's medium of device blocks, and the attention kind of a plain decoder's single group.
MEDIUM_GPU = "GPU"
KV_CACHE_SPEC_KIND = "full_attention"
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged events: msgspec writes the class name under "type"."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def to_wire(event: CacheEvent) -> BlockStored | BlockRemoved | AllBlocksCleared:
    """The vLLM struct for one block-pool event, with the fields vLLM fills for a plain model."""
    if isinstance(event, StoredEvent):
        return BlockStored(
            block_hashes=list(event.block_hashes),
            parent_block_hash=event.parent_block_hash,
            token_ids=list(event.token_ids),
            block_size=event.block_size,
            lora_id=None,
            medium=MEDIUM_GPU,
            lora_name=None,
            extra_keys=[None] * len(event.block_hashes),
            group_idx=0,
            kv_cache_spec_kind=KV_CACHE_SPEC_KIND,
        )
    if isinstance(event, RemovedEvent):
        return BlockRemoved(block_hashes=list(event.block_hashes), medium=MEDIUM_GPU, group_idx=0)
    assert isinstance(event, ClearedEvent)
    return AllBlocksCleared()


def decode_batch(payload: bytes) -> KVEventBatch:
    """Parse one payload (tests and tools; a router should accept vLLM's older forms too)."""
    return msgspec.msgpack.decode(payload, type=KVEventBatch)


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: bind wildcard and ipc/inproc endpoints, connect to the rest."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KvEventPublisher:
    """One PUB socket (and optional ROUTER replay socket) per simulated replica.

    Built and closed by the app's cleanup context (`open_publisher`); `publish` is called from
    the engine loop once per step that changed the prefix cache.
    """

    def __init__(self, config: KvEventsConfig, data_parallel_rank: int = 0) -> None:
        self.config = config
        self.data_parallel_rank = data_parallel_rank
        # A plain socket for PUB (sends never wait), an asyncio one for the replay ROUTER.
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self.endpoint = self._open(self._pub, config.endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        if config.replay_endpoint is not None:
            self._replay = self._actx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self.replay_endpoint = self._open(self._replay, config.replay_endpoint, bind=True)
        self._encoder = msgspec.msgpack.Encoder()
        self._seq = itertools.count()
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self.published = 0
        self.dropped = 0

    @staticmethod
    def _open(socket: zmq.Socket[Any], endpoint: str, *, bind: bool = False) -> str:
        """Bind or connect; returns the endpoint in use (a bound port 0 resolved)."""
        if bind or is_bind_endpoint(endpoint):
            socket.bind(endpoint)
            resolved = socket.getsockopt_string(zmq.LAST_ENDPOINT)
            return resolved.replace("0.0.0.0", "*") if "*" in endpoint else resolved
        socket.connect(endpoint)
        return endpoint

    def publish(self, events: Sequence[CacheEvent]) -> None:
        """Send one batch now, without waiting (a full queue drops it, as vLLM's PUB does)."""
        batch = KVEventBatch(
            ts=time.time(),
            events=[to_wire(event) for event in events],
            data_parallel_rank=self.data_parallel_rank,
        )
        seq = next(self._seq)
        payload = self._encoder.encode(batch)
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), zmq.NOBLOCK)
            self.published += 1
        except zmq.Again:
            self.dropped += 1

    async def serve_replay(self) -> None:
        """Answer replay requests until cancelled (runs only with a replay endpoint)."""
        replay = self._replay
        if replay is None:
            return
        while True:
            frames = await replay.recv_multipart()
            if len(frames) != 3:
                continue  # vLLM logs and ignores malformed requests too
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await replay.send_multipart(
                        (client, b"", self._topic, seq.to_bytes(8, "big"), payload)
                    )
            await replay.send_multipart((client, b"", b"", END_SEQ, b""))

    def source(self) -> dict[str, Any]:
        """This publisher as vLLM's `GET /kv_event_sources` describes one (resolved endpoints)."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "buffer_steps": self.config.buffer_steps,
            "hwm": self.config.hwm,
            "max_queue_size": 100_000,
            "topic": self.config.topic,
        }

    def close(self) -> None:
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()
        self._actx.term()


@contextlib.asynccontextmanager
async def open_publisher(config: KvEventsConfig | None) -> AsyncIterator[KvEventPublisher | None]:
    """The publisher for an app's lifetime (None when events are off); always closed."""
    if config is None:
        yield None
        return
    publisher = KvEventPublisher(config)
    replay = asyncio.create_task(publisher.serve_replay(), name="sim-kv-replay")
    try:
        yield publisher
    finally:
        replay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replay
        publisher.close()
