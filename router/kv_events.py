"""vLLM KV events: each replica's real prefix cache, block by block, over ZMQ.

A replica started with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher":
"zmq", "endpoint": "tcp://*:PORT"}'`` publishes, after every engine step that changed its
cache, a msgpack ``KVEventBatch`` as three frames (topic, 8-byte big-endian sequence number,
payload): ``[ts, [event, ...], data_parallel_rank]``, each event ``BlockStored`` (block hashes,
parent hash, token ids, block size, LoRA name, medium), ``BlockRemoved`` (block hashes,
medium) or ``AllBlocksCleared``. vLLM 0.32 encodes events as maps with a ``type`` key; older
versions as arrays led by the type name: both are read.

The router subscribes once per replica (``--kv-events``) and keeps the replica's block set
(LiveBlockSet, a vllm_fleet.router.prefix_index.KvBlockSet that also knows the replica's models
and whether its hashes are the ones the router computes). Two uses:

- precise matching (vllm_fleet.router.prompt_tokens computes vLLM's block hashes of a request
  with the model's tokenizer; cached_prefix_tokens looks them up here): for replicas whose
  events are live, the leading run of the request's blocks the replica holds replaces the
  approximate prediction;
- the events CORRECT the approximate record the router keeps per replica
  (ReplicaPrefixes.correct): AllBlocksCleared drops it, BlockRemoved evicts the same share of
  it, BlockStored confirms. The correction comes within a step of the eviction, not after a
  window of misses, and it covers evictions caused by other routers' and clients' traffic.

Each replica's root blocks (a BlockStored without parent, LoRA or extra keys) are re-hashed
here: a replica that hashes with another algorithm or seed (``--prefix-caching-hash-algo
xxhash``, a PYTHONHASHSEED) is matched approximately instead, with one warning.

Only device blocks count (medium GPU, or none given): blocks offloaded to CPU or disk are not
what the prefix cache of the engine reuses without a transfer. Where the replica has a replay
socket (``replay_endpoint``, found by ``--kv-events auto``), the subscriber asks it for the
publisher's buffered history when it subscribes and for the batches of any gap in the sequence
numbers (vllm_fleet.router.kv_replay); what no replay brought is counted in ``missed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import zmq
import zmq.asyncio

from vllm_fleet.router.bounded_read import fetch_json
from vllm_fleet.router.kv_batches import apply_batch, decode_batch
from vllm_fleet.router.kv_replay import replay
from vllm_fleet.router.precise import LiveBlockSet, ModelCard, fetch_models
from vllm_fleet.router.state import Fleet, ReplicaState

log = logging.getLogger("vllm_fleet.router")

#: Replays one catch-up may ask for, each from the first batch the one before it lost (vLLM's
#: ROUTER socket queues 1,000 messages per peer: a replay of its whole 10,000-batch buffer lost
#: some past the first 1,000-2,500 in most tries on a loaded 2-core box). It stops early when a
#: round brings nothing new.
REPLAY_ROUNDS = 16
#: Live batches the SUB socket queues while a replay runs (vLLM's publisher queues as many).
LIVE_QUEUE = 100_000
#: How long one receive waits before the loop looks at the fleet again (seconds).
RECEIVE_TIMEOUT_S = 1.0
#: GET /kv_event_sources (``--kv-events auto``): its timeout, answer cap, and how often a
#: replica that publishes nothing (or was down) is asked again.
DISCOVERY_TIMEOUT_S = 2.0
MAX_SOURCES_BYTES = 64 << 10
REDISCOVER_S = 30.0


#: Called with a subscribed replica's model cards each time they are read.
ModelsHook = Callable[[dict[str, ModelCard]], None]


@dataclass(frozen=True)
class KvEventsSpec:
    """Where replicas publish events: one port on every replica's host, explicit endpoints
    per replica URL, and/or ``auto``: ask each replica (vLLM's GET /kv_event_sources)."""

    port: int | None = None
    endpoints: dict[str, str] = field(default_factory=dict)
    auto: bool = False

    def endpoint(self, replica_url: str) -> str | None:
        """The ZMQ endpoint to subscribe to for ``replica_url``; None when it has none."""
        named = self.endpoints.get(replica_url.rstrip("/"))
        if named is not None:
            return named
        if self.port is None:
            return None
        host = urlsplit(replica_url).hostname
        if not host:
            return None
        return f"tcp://[{host}]:{self.port}" if ":" in host else f"tcp://{host}:{self.port}"


def parse_kv_events_spec(values: Sequence[str]) -> KvEventsSpec:
    """``auto``, ``PORT`` or ``REPLICA_URL=tcp://HOST:PORT`` entries; ValueError naming the
    bad one."""
    port: int | None = None
    endpoints: dict[str, str] = {}
    auto = False
    for value in values:
        if value == "auto":
            auto = True
            continue
        url, sep, endpoint = value.partition("=")
        if not sep:
            try:
                port = int(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not auto, a PORT or REPLICA_URL=tcp://HOST:PORT"
                ) from None
            if not 0 < port <= 65535:
                raise ValueError(f"{value!r}: a port is 1-65535")
            continue
        parts = urlsplit(endpoint)
        if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
            raise ValueError(f"{value!r}: the endpoint must be tcp://HOST:PORT")
        endpoints[url.rstrip("/")] = endpoint
    return KvEventsSpec(port=port, endpoints=endpoints, auto=auto)


@dataclass(frozen=True)
class KvSource:
    """Where one replica publishes: its PUB endpoint, and its replay socket when it has one."""

    endpoint: str
    replay: str | None = None


def _address(endpoint: object, replica_url: str) -> str | None:
    """A tcp:// address as vLLM reports it, a bound wildcard host made the replica's own."""
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        return None
    parts = urlsplit(endpoint.replace("*", "0.0.0.0", 1))
    if parts.port is None:
        return None
    host = parts.hostname
    if host in (None, "0.0.0.0", "::"):
        return KvEventsSpec(port=parts.port).endpoint(replica_url)
    return f"tcp://[{host}]:{parts.port}" if ":" in str(host) else f"tcp://{host}:{parts.port}"


def source_from_sources(payload: Any, replica_url: str) -> KvSource | None:
    """The addresses in a GET /kv_event_sources answer (``{"0": {"endpoint": "tcp://*:5557",
    "replay_endpoint": "tcp://*:5558", "publisher": "zmq", ...}}``, one entry per
    data-parallel rank; rank 0 is used): a bound wildcard address means the replica's host."""
    if not isinstance(payload, dict):
        return None
    source = payload.get("0")
    if not isinstance(source, dict) or source.get("publisher", "zmq") != "zmq":
        return None
    endpoint = _address(source.get("endpoint"), replica_url)
    if endpoint is None:
        return None
    return KvSource(endpoint, _address(source.get("replay_endpoint"), replica_url))


async def discover_source(
    session: aiohttp.ClientSession, replica_url: str, timeout_s: float = DISCOVERY_TIMEOUT_S
) -> KvSource | None:
    """Ask the replica where it publishes KV events; None when it does not (or cannot say)."""
    url = f"{replica_url}/kv_event_sources"
    payload = await fetch_json(session, url, timeout_s, MAX_SOURCES_BYTES)
    return source_from_sources(payload, replica_url)


async def subscribe(
    ctx: zmq.asyncio.Context,
    replica: ReplicaState,
    source: KvSource,
    fleet: Fleet,
    session: aiohttp.ClientSession | None = None,
    on_models: ModelsHook | None = None,
) -> None:
    """Receive ``replica``'s events until it leaves the fleet or the task is cancelled.

    ZMQ reconnects by itself when the replica restarts; a restarted engine's first batch
    has a lower sequence number, which starts the count again (its cache is empty: vLLM
    publishes no AllBlocksCleared for a fresh engine, so the block set is dropped here).
    With a replay socket the publisher's buffered history is read first (blocks cached before
    we subscribed), and a gap in the sequence numbers is filled from it; without one what the
    replica held before is unknown, so precise matching under-predicts until its blocks are
    stored again. With a ``session`` its GET /v1/models is read every REDISCOVER_S (model
    roots and LoRA paths for precise matching), and handed to ``on_models``.
    """
    prefixes = replica.prefixes
    live = prefixes.events
    if not isinstance(live, LiveBlockSet):
        live = LiveBlockSet()
        if prefixes.events is not None:
            live.hashes, live.block_size = prefixes.events.hashes, prefixes.events.block_size
        prefixes.events = live
    socket = ctx.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, LIVE_QUEUE)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(source.endpoint)
    log.info("kv events subscribed url=%s endpoint=%s", replica.url, source.endpoint)
    order = BatchOrder(replica, source.replay)
    loop = asyncio.get_running_loop()
    models_at = -1e9
    try:
        live.synced = False  # approximate until the history is read
        await order.catch_up(ctx, 0, history=True)  # what it cached before we subscribed
        live.synced = True
        while fleet.replicas.get(replica.url) is replica:
            events = prefixes.events
            if session is not None and loop.time() - models_at > REDISCOVER_S:
                cards = await fetch_models(session, replica.url)
                if cards is not None and isinstance(events, LiveBlockSet):
                    events.models, models_at = cards, loop.time()
                    if on_models is not None:
                        on_models(cards)
            if not await socket.poll(int(RECEIVE_TIMEOUT_S * 1000)):
                continue
            frames = await socket.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                log.warning(
                    "kv events: unexpected message url=%s frames=%d", replica.url, len(frames)
                )
                continue
            seq, payload = int.from_bytes(frames[1], "big", signed=True), frames[2]
            order.check_restart(seq, payload)
            if order.gap_before(seq):
                await order.catch_up(ctx, order.next_seq)
            order.take(seq, payload)
    finally:
        socket.close(linger=0)


class BatchOrder:
    """One replica's batches applied once each and in sequence order, live or replayed.

    A replay and the live socket overlap: the SUB socket queues what is published while the
    replay is answered, so some batches arrive twice. A live batch numbered at or below the
    last one applied is skipped when it is the copy of a replayed one (the same bytes, by
    checksum); any other is a restarted engine counting from 0 again (its batches carry a
    later timestamp, so they never equal the old ones).

    A replay can itself lose batches: vLLM's ROUTER socket drops what its send queue cannot
    take when a long replay outruns its I/O thread (a replay of 10,000 batches lost some past
    the first 1,000-2,500 in 3 of 10 tries on a loaded 2-core box). Past such a hole the
    replay's batches are not applied, and the replay is asked again from the hole (also when
    its end marker was the message dropped), up to REPLAY_ROUNDS times; the first batch of a
    round may jump ahead (the buffer no longer reaches back that far: counted missed).
    """

    def __init__(self, replica: ReplicaState, replay_endpoint: str | None) -> None:
        self.replica = replica
        #: The replay socket; None when there is none or it stopped answering.
        self.replay_endpoint = replay_endpoint
        #: Checksums of the batches replayed since the last live one: what may arrive again.
        self._replayed: dict[int, int] = {}
        #: Within one replay round: no batch seen yet; a batch missing before the last seen.
        self._round_start = True
        self._hole = False
        #: The replay being read is the replica's history (catch_up).
        self._history = False

    @property
    def next_seq(self) -> int:
        events = self.replica.prefixes.events
        return 0 if events is None else events.last_seq + 1

    def gap_before(self, seq: int) -> bool:
        """Whether batches before ``seq`` are missing and a replay socket may have them."""
        return self.replay_endpoint is not None and seq > self.next_seq

    async def catch_up(
        self, ctx: zmq.asyncio.Context, start: int, *, history: bool = False
    ) -> None:
        """Apply the publisher's buffered batches from ``start`` (nothing without a replay
        socket); ``history``: the replica's past on subscribing (apply_batch says why it is
        told apart). A publisher that does not answer in time is not asked again."""
        endpoint = self.replay_endpoint
        if endpoint is None:
            return
        self._history = history
        answered = True
        for _ in range(REPLAY_ROUNDS):
            self._round_start, self._hole = True, False
            ended, received = await replay(ctx, endpoint, start, self._take_replayed)
            answered = ended or received > 0
            if not answered or (ended and not self._hole) or self.next_seq == start:
                break
            start = self.next_seq  # the first batch (or the end marker) the socket dropped
        if not answered:
            self.replay_endpoint = None
            log.warning(
                "kv events: replay socket did not answer url=%s endpoint=%s; "
                "gaps are counted as missed from now on",
                self.replica.url,
                endpoint,
            )

    def _take_replayed(self, seq: int, payload: bytes) -> None:
        expected = self.next_seq
        first, self._round_start = self._round_start, False
        if seq < expected or self._hole:
            return  # had it already, or past a hole (asked again from the hole)
        if seq > expected and not first:
            self._hole = True
            return
        self._apply(seq, payload, history=self._history)
        self._replayed[seq] = zlib.crc32(payload)
        events = self.replica.prefixes.events
        if events is not None:
            events.replayed += 1

    def check_restart(self, seq: int, payload: bytes) -> None:
        """Before a live batch: when it says the engine restarted, start the count again (its
        cache is empty; a gap before ``seq`` is then asked from the new engine's replay)."""
        events = self.replica.prefixes.events
        if events is None or not 0 <= seq <= events.last_seq:
            return
        if self._replayed.get(seq) == zlib.crc32(payload):
            return  # a replay brought it: a copy, not a restart
        self.replica.prefixes.correct("AllBlocksCleared", ())
        events.last_seq = -1
        self._replayed.clear()

    def take(self, seq: int, payload: bytes) -> None:
        """One live batch (after check_restart): skipped when a replay brought it already."""
        events = self.replica.prefixes.events
        if events is not None and 0 <= seq <= events.last_seq:
            return
        self._replayed.clear()  # the live stream is past the replay: no copy comes after this
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes, *, history: bool = False) -> None:
        replica = self.replica
        try:
            events = decode_batch(payload)
        except ValueError as exc:
            log.warning("kv events: bad batch url=%s error=%s", replica.url, exc)
            events = []  # counted as received: a replay would bring the same bytes
        apply_batch(replica, seq, events, history=history)


async def kv_events_loop(
    fleet: Fleet,
    spec: KvEventsSpec,
    session: aiohttp.ClientSession | None = None,
    interval_s: float = 1.0,
    on_models: ModelsHook | None = None,
) -> None:
    """One subscriber task per replica that has an endpoint, following fleet changes; cancel
    the task to stop (every subscriber is cancelled and its socket closed). With
    ``spec.auto`` a reachable replica without a configured endpoint is asked for it at most
    every REDISCOVER_S. ``on_models`` gets each subscribed replica's model cards (the
    router starts loading their tokenizers then, not at the first request)."""
    ctx = zmq.asyncio.Context()
    tasks: dict[str, asyncio.Task[None]] = {}
    found: dict[str, KvSource] = {}
    asked: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    try:
        while True:
            for url, replica in list(fleet.replicas.items()):
                auto = spec.auto and session is not None and url not in found
                if auto and replica.check_ok and loop.time() - asked.get(url, -1e9) > REDISCOVER_S:
                    asked[url] = loop.time()
                    assert session is not None
                    if (discovered := await discover_source(session, url)) is not None:
                        found[url] = discovered
                task = tasks.get(url)
                if task is not None and not task.done():
                    continue
                if task is not None and not task.cancelled() and task.exception() is not None:
                    log.warning(
                        "kv events: subscriber failed url=%s error=%r", url, task.exception()
                    )
                named = spec.endpoint(url)
                source = KvSource(named) if named is not None else found.get(url)
                if source is not None:
                    tasks[url] = asyncio.create_task(
                        subscribe(ctx, replica, source, fleet, session, on_models),
                        name=f"kv-events {url}",
                    )
            for url in [u for u in tasks if u not in fleet.replicas]:
                tasks.pop(url).cancel()
                found.pop(url, None)
            await asyncio.sleep(interval_s)
    finally:
        for task in tasks.values():
            task.cancel()
        for task in tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        ctx.term()
