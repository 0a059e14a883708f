"""Router peers: several routers in front of one fleet share what each sent where, so a prompt
prefix one router placed is found by the others.

Why: the approximate prefix index (vllm_fleet.router.prefix_index) records only the requests
its own router sent. With two routers (the chart's default) and requests spread over them,
each router paid the first miss of every prefix group and could cache a group on a second
replica: scenario 8's hit rate fell from 80 % to 64-68 % (docs/benchmarks.md). KV events
(precise matching) give every router the replicas' real block sets, but only where replicas
publish them and the router can tokenize as they do; this works with any replica.

The same goes for load: each router counts only its own requests in flight, exactly and at
once, and sees the other routers' only in the engines' gauges, scraped once a second. With
requests alternating between two routers, half of every replica's recent sends were invisible
to each router for up to a second, and so was half of the prompt each replica still had to
prefill (vllm_fleet.router.prefill_backlog).

How, the way sglang's model gateway mesh and Dynamo's router replica sync share their
routers' decisions: each router sends the (replica URL, prefix keys) of the requests it
sends, at once after a quiet spell and batched to one message per FLUSH_S in a burst, to
every peer with its own counts per replica (requests in flight, prompt tokens sent); a request
that finishes sends the counts the same way, and while it has requests in flight a router
also sends its counts every LOAD_S when they changed.
Batches go over one WebSocket per peer (GET PEER_PATH, opened by the sender, kept open): a
message costs a frame, where a POST per batch cost a whole HTTP exchange on both sides (two
routers in scenario 8 spent 14.1 ms of CPU per request with POSTs, 11.9 over sockets and 10.8
unpeered). A peer

- records the keys for that replica as if it had sent them itself (ReplicaPrefixes.record),
  so its predicted and sent sides, and with them the trust and token-scale comparisons
  against the replica's counters, cover every router's requests. The keys are the same in
  every router process (prefix_keys hashes with crc32 and fixed multipliers), replicas are
  named by URL;
- adds the other routers' in-flight counts to its own (ReplicaState.peer_in_flight, for
  LOAD_TTL_S after the last count: a router that stopped answering stops counting), and the
  growth of their prompt-tokens-sent counters to the replica's (peer_prompt_sent, which the
  prefill backlog follows).

Peers are named (``--peer URL``) or found (``--discover-peers-dns NAME:PORT``, a Kubernetes
headless service over the router pods). A router finds itself among them by its random id,
the first message on every socket, and stops sending to that address. A peer that fails is
skipped for RETRY_S; what it missed meanwhile is not replayed (a stale prefix record is worth
little, and the replicas' counters correct the trust anyway). Nothing waits on a peer:
requests are routed by what this router knows when they arrive.

Workers of ``--workers N`` are each other's peers: each listens on a loopback port of its own
(vllm_fleet.router.workers) and names its siblings there. A batch from another router reaches
the one worker that accepted that router's socket (on the shared port), which relays its
entries to its siblings; a sibling's batch (on the worker's loopback port) is not relayed
again. Workers share prefixes only, not counts: their in-flight counts are already the whole
router's (vllm_fleet.router.shared_board), which every worker would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from vllm_fleet.router.bounded_read import within
from vllm_fleet.router.discovery import Discovery
from vllm_fleet.router.precise import note_sent
from vllm_fleet.router.state import Fleet, ReplicaState

log = logging.getLogger("vllm_fleet.router")

#: Where a router takes its peers' batches (a WebSocket).
PEER_PATH = "/fleet/peers/ws"
#: Batches go out at most this often. The first request after a quiet spell goes out at once
#: (with whatever was noted in the same turn of the event loop), the ones that follow it
#: within FLUSH_S share the next message: a burst costs one message per FLUSH_S, and a peer
#: learns of a new group's placement within a round trip, not FLUSH_S later. A trailing-only
#: flush (every batch FLUSH_S after its first request) let a group's next request reach the
#: other router first when requests are shorter than that: two peered routers in
#: test_two_peered_routers_find_what_one_router_finds placed a group twice 0-3 times a run.
FLUSH_S = 0.02
#: Requests a batch holds at most; past it the oldest are dropped (a peer that cannot keep up
#: must not grow this router's memory).
MAX_PENDING = 4096
#: Opening a socket to a peer (with its hello), or one send, may take this long; a peer that
#: failed is skipped for RETRY_S.
SEND_TIMEOUT_S = 2.0
RETRY_S = 5.0
#: Peer names found by DNS are resolved again after this long.
RESOLVE_S = 10.0
#: While this router has requests in flight, its counts go out this often when they changed
#: (finished requests send nothing themselves), and a peer's counts are dropped this long
#: after its last batch.
LOAD_S = 0.1
LOAD_TTL_S = 2.0
#: Largest message a router accepts from a peer.
MAX_BATCH_BYTES = 16 << 20


class BadBatch(ValueError):
    """A peer's batch is not what encode_batch writes."""


#: A router's own counts per replica URL: (requests in flight, prompt tokens sent, ever).
Counts = dict[str, tuple[int, int]]


@dataclass
class Batch:
    """What one message carries: who sends it, (replica URL, prefix keys) per request it sent,
    and its own counts per replica (None: a router that shares prefixes only)."""

    router: str
    sent: list[tuple[str, tuple[int, ...]]]
    counts: Counts | None = None


def encode_batch(
    router_id: str, sent: Sequence[tuple[str, Sequence[int]]], counts: Counts | None = None
) -> bytes:
    """One message on a peer socket (see Batch)."""
    payload: dict[str, Any] = {"router": router_id, "sent": [[u, list(k)] for u, k in sent]}
    if counts is not None:
        payload["counts"] = {url: list(c) for url, c in counts.items()}
    return json.dumps(payload, separators=(",", ":")).encode()


def _counts(value: Any) -> Counts | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(c, list) and len(c) == 2 and all(type(x) is int and x >= 0 for x in c)
        for c in value.values()
    ):
        raise BadBatch("'counts' must map replica URLs to [in flight, prompt tokens sent]")
    return {str(url): (c[0], c[1]) for url, c in value.items()}


def decode_batch(body: bytes) -> Batch:
    """The batch a body holds; BadBatch naming what is wrong otherwise."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBatch(f"the body is not JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("router"), str):
        raise BadBatch("the body must be an object with a string 'router'")
    sent = payload.get("sent")
    if not isinstance(sent, list):
        raise BadBatch("'sent' must be a list of [replica URL, [keys]]")
    entries: list[tuple[str, tuple[int, ...]]] = []
    for item in sent:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], list)
            or not all(type(k) is int for k in item[1])
        ):
            raise BadBatch("each entry of 'sent' must be [replica URL, [integer keys]]")
        entries.append((item[0], tuple(item[1])))
    return Batch(payload["router"], entries, _counts(payload.get("counts")))


def apply_batch(fleet: Fleet, entries: Iterable[tuple[str, Sequence[int]]], now: float) -> int:
    """Record a peer's sent prefixes on the replicas this router knows; how many it recorded
    (a replica this router does not know, or not yet, is skipped). A peer's request is, to
    this router, one sent without its block hashes: where the replica is matched precisely,
    the record joins its match until the request's blocks are stored (note_sent)."""
    applied = 0
    for url, keys in entries:
        replica = fleet.replicas.get(url)
        if replica is not None and keys:
            replica.prefixes.record(keys, now)
            note_sent(replica, None)
            applied += 1
    return applied


@dataclass
class PeerCounts:
    """The other routers' last counts, by router id, and what they add to each replica."""

    #: Router id -> (monotonic time received, its counts).
    by_router: dict[str, tuple[float, Counts]] = field(default_factory=dict)

    def update(self, fleet: Fleet, router: str, counts: Counts, now: float) -> None:
        """Take ``router``'s counts: the growth of its prompt-tokens-sent counters joins each
        replica's ``peer_prompt_sent`` (a router's first counts only set the baseline), and
        every replica's ``peer_in_flight`` becomes the sum over the routers heard from
        within LOAD_TTL_S."""
        last = self.by_router.get(router)
        if last is not None:
            for url, (_, sent) in counts.items():
                before = last[1].get(url)
                replica = fleet.replicas.get(url)
                if before is not None and replica is not None and sent > before[1]:
                    replica.peer_prompt_sent += sent - before[1]
                    replica.peer_prompt_at = now
        self.by_router[router] = (now, counts)
        for gone in [r for r, (at, _) in self.by_router.items() if now - at > LOAD_TTL_S]:
            del self.by_router[gone]
        for url, replica in fleet.replicas.items():
            replica.peer_in_flight = sum(c.get(url, (0, 0))[0] for _, c in self.by_router.values())
            replica.peer_counts_at = now


def peer_in_flight(replica: ReplicaState, now: float) -> int:
    """The other routers' requests in flight on ``replica``, while their counts are fresh."""
    return replica.peer_in_flight if now - replica.peer_counts_at <= LOAD_TTL_S else 0


def own_counts(fleet: Fleet) -> Counts:
    """This router's counts per replica, as its peers take them."""
    return {url: (max(0, r.in_flight), r.prompt_sent) for url, r in fleet.replicas.items()}


def take_batch(fleet: Fleet, link: PeerLink, batch: Batch, now: float) -> int:
    """Apply a peer's batch (prefixes, and counts where this router takes them); how many
    requests it recorded. A batch of this router's own (it reached itself) changes nothing."""
    if batch.router == link.router_id:
        return 0
    applied = apply_batch(fleet, batch.sent, now)
    if batch.counts is not None and link.share_counts:
        link.received.update(fleet, batch.router, batch.counts, now)
    link.batches_received += 1
    link.requests_received += applied
    return applied


@dataclass
class PeerLink:
    """This router's side of the peer exchange: what it sent and has not told its peers yet,
    who its peers are, and counts for operators (GET /fleet/peers)."""

    #: Named peers (--peer) and DNS names of peers (--discover-peers-dns).
    static: tuple[str, ...] = ()
    sources: list[Discovery] = field(default_factory=list)
    #: Sent with every batch and every answer; random per process.
    router_id: str = field(default_factory=lambda: secrets.token_hex(8))
    #: Bearer key for the peers' /fleet/* (their admin key, or client key, is ours too).
    auth_key: str | None = field(default=None, repr=False)
    #: Send and take counts (off for --workers N, see the module docstring).
    share_counts: bool = True
    #: The other workers of this router (--workers N), and this worker's loopback port where
    #: they connect: batches arriving anywhere else came from other routers and are relayed.
    siblings: frozenset[str] = frozenset()
    sibling_port: int | None = None
    received: PeerCounts = field(default_factory=PeerCounts)
    pending: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    #: Other routers' entries this worker took, for its siblings.
    relayed: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    #: Peer URL -> monotonic time before which it is skipped (failed, or found to be us).
    skip_until: dict[str, float] = field(default_factory=dict)
    myself: set[str] = field(default_factory=set)
    peers: list[str] = field(default_factory=list)
    batches_sent: int = 0
    batches_failed: int = 0
    requests_dropped: int = 0
    batches_received: int = 0
    requests_received: int = 0
    #: Open sockets: to each peer (this router sends), and from peers (this router takes).
    outbound: dict[str, aiohttp.ClientWebSocketResponse[bool]] = field(default_factory=dict)
    inbound: set[web.WebSocketResponse] = field(default_factory=set)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _resolved_at: float = field(default=-RESOLVE_S, repr=False)

    def note(self, replica_url: str, keys: Sequence[int]) -> None:
        """A request with these prefix keys was sent to ``replica_url``."""
        if not keys:
            return
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            del pending[: len(pending) - MAX_PENDING + 1]
            self.requests_dropped += 1
        pending.append((replica_url, tuple(keys)))
        self._wake.set()

    def count_changed(self) -> None:
        """A request of this router's finished: its counts go out with the next message (at
        once after a quiet spell, within FLUSH_S in a burst) rather than LOAD_S later. A peer
        that still counted the request in flight sent the next request for the same prefix
        elsewhere when it came within LOAD_S."""
        if self.share_counts:
            self._wake.set()

    def relay(self, sent: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        """Another router's entries, taken by this worker: its siblings get them too."""
        room = MAX_PENDING - len(self.relayed)
        self.relayed.extend(sent[:room])
        self.requests_dropped += max(0, len(sent) - room)
        self._wake.set()

    def take(self) -> list[tuple[str, tuple[int, ...]]]:
        """Everything noted since the last take."""
        taken, self.pending = self.pending, []
        self._wake.clear()
        return taken

    def take_relayed(self) -> list[tuple[str, tuple[int, ...]]]:
        taken, self.relayed = self.relayed, []
        return taken

    async def wait(self) -> None:
        """Until something was noted."""
        await self._wake.wait()

    async def refresh(self, now: float) -> list[str]:
        """The peers to send to now: named and resolved ones, less this router and the ones
        resting after a failure."""
        if self.sources and now - self._resolved_at >= RESOLVE_S:
            self._resolved_at = now
            found: set[str] = set(self.static)
            for source in self.sources:
                found.update(await source.urls())
            self.peers = sorted(found)
        elif not self.sources:
            self.peers = sorted(set(self.static))
        return [
            p for p in self.peers if p not in self.myself and self.skip_until.get(p, 0.0) <= now
        ]

    def view(self) -> dict[str, Any]:
        return {
            "router": self.router_id,
            "peers": [p for p in self.peers if p not in self.myself],
            "myself": sorted(self.myself),
            "resting": sorted(p for p, t in self.skip_until.items() if t > time.monotonic()),
            "batches_sent": self.batches_sent,
            "batches_failed": self.batches_failed,
            "requests_dropped": self.requests_dropped,
            "batches_received": self.batches_received,
            "requests_received": self.requests_received,
        }


def flush_delay(last_flush: float, now: float) -> float:
    """How long a batch noted at ``now`` waits: nothing after a quiet spell, else until
    FLUSH_S after the last message (what is noted meanwhile goes with it)."""
    return max(0.0, last_flush + FLUSH_S - now)


def hello(link: PeerLink) -> str:
    """The first message on a peer socket: who answers it."""
    return json.dumps({"router": link.router_id})


async def _connect(
    session: aiohttp.ClientSession, link: PeerLink, peer: str
) -> aiohttp.ClientWebSocketResponse[bool] | None:
    """A socket to ``peer``, or None when the peer turned out to be this router."""
    headers = {"Authorization": f"Bearer {link.auth_key}"} if link.auth_key else None
    ws = await session.ws_connect(
        peer + PEER_PATH, headers=headers, autoping=True, heartbeat=None, max_msg_size=1 << 16
    )
    try:
        first = await ws.receive()
        them = json.loads(first.data).get("router") if first.type is WSMsgType.TEXT else None
    except BaseException:
        await ws.close()
        raise
    if them == link.router_id:
        await ws.close()
        link.myself.add(peer)
        log.info("peer is this router peer=%s", peer)
        return None
    if not isinstance(them, str):
        await ws.close()
        raise aiohttp.ClientError(f"no router hello from {peer}")
    link.outbound[peer] = ws
    return ws


async def _connect_and_send(
    session: aiohttp.ClientSession, link: PeerLink, peer: str, body: bytes
) -> bool:
    """Send ``body`` on the peer's socket, connecting first if needed; False when the peer
    is this router."""
    ws = link.outbound.get(peer)
    if ws is None or ws.closed:
        ws = await _connect(session, link, peer)
        if ws is None:
            return False
    await ws.send_bytes(body)
    return True


async def _send(session: aiohttp.ClientSession, link: PeerLink, peer: str, body: bytes) -> None:
    try:
        if not await within(_connect_and_send(session, link, peer, body), SEND_TIMEOUT_S):
            return
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        link.batches_failed += 1
        link.skip_until[peer] = time.monotonic() + RETRY_S
        stale = link.outbound.pop(peer, None)
        if stale is not None:
            await stale.close()
        log.warning("peer unreachable peer=%s error=%r (skipped %.0f s)", peer, exc, RETRY_S)
        return
    link.batches_sent += 1


async def close_sockets(link: PeerLink) -> None:
    """Close every peer socket, both ways (at shutdown: an open socket would hold the
    server's graceful stop for its whole timeout)."""
    for ws in list(link.outbound.values()):
        await ws.close()
    link.outbound.clear()
    for inbound in list(link.inbound):
        await inbound.close(code=WSCloseCode.GOING_AWAY, message=b"router shutting down")


async def peer_loop(link: PeerLink, fleet: Fleet) -> None:
    """Send what this router sent, and its counts, to its peers: a batch as soon as a request
    was sent or finished but at most one every FLUSH_S, and every LOAD_S while requests are
    in flight when the counts changed (the last time after the last request ended); asleep
    (no timer) otherwise. Its own session: the upstream one carries the replicas' key as a
    default header."""
    last_counts: Counts | None = None
    last_flush = -math.inf
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=SEND_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            while True:
                busy = link.share_counts and (
                    any(c[0] > 0 for c in (last_counts or {}).values())
                    or any(r.in_flight > 0 for r in fleet.replicas.values())
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(link.wait(), LOAD_S if busy else None)
                # 0 still yields once: the notes of requests routed in this turn go together
                await asyncio.sleep(flush_delay(last_flush, time.monotonic()))
                last_flush = time.monotonic()
                sent, relayed = link.take(), link.take_relayed()
                peers = await link.refresh(time.monotonic())
                if not peers:
                    continue
                counts = own_counts(fleet) if link.share_counts else None
                sends = []
                if sent or counts != last_counts:
                    last_counts = counts
                    body = encode_batch(link.router_id, sent, counts)
                    sends += [_send(session, link, p, body) for p in peers]
                if relayed:
                    body = encode_batch(link.router_id, relayed, None)
                    sends += [_send(session, link, p, body) for p in peers if p in link.siblings]
                await asyncio.gather(*sends)
        finally:
            await close_sockets(link)
