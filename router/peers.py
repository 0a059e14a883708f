"""Router peers: several routers in front of one fleet share what each sent where, so a prompt
prefix one router placed is found by the others.

Why: the approximate prefix index (vllm_fleet.router.prefix_index) records only the requests
its own router sent. With two routers (the chart's default) and requests spread over them,
each router paid the first miss of every prefix group and could cache a group on a second
replica: scenario 8's hit rate fell from 80 % to 64-68 % (docs/benchmarks.md). KV events
(precise matching) give every router the replicas' real block sets, but only where replicas
publish them and the router can tokenize as they do; this works with any replica.

How, the way sglang's model gateway mesh and Dynamo's router replica sync share their
routers' decisions: each router batches the (replica URL, prefix keys) of the requests it
sends, for FLUSH_S after the first one, and POSTs the batch to every peer's PEER_PATH; a peer
records those keys for that replica as if it had sent them itself (ReplicaPrefixes.record), so
its predicted and sent sides, and with them the trust and token-scale comparisons against the
replica's counters, cover every router's requests. The keys are the same in every router
process (prefix_keys hashes with crc32 and fixed multipliers), replicas are named by URL.

Peers are named (``--peer URL``) or found (``--discover-peers-dns NAME:PORT``, a Kubernetes
headless service over the router pods). A router finds itself among them by its random id,
which every answer carries, and stops sending to that address. A peer that fails is skipped
for RETRY_S; what it missed meanwhile is not replayed (a stale prefix record is worth little,
and the replicas' counters correct the trust anyway). Nothing waits on a peer: requests are
routed by what this router knows when they arrive.

Limits: with ``--workers N`` each worker is its own peer sender, and a peer's batch reaches
the one worker that accepts its connection (docs/prefix-routing.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vllm_fleet.router.discovery import Discovery
from vllm_fleet.router.state import Fleet

log = logging.getLogger("vllm_fleet.router")

#: Where a router takes its peers' batches.
PEER_PATH = "/fleet/peers/sent"
#: A batch goes out this long after its first request: a burst shares one POST, and a peer
#: learns of a placement ~20 ms after it was made (a new group's next request seldom follows
#: sooner; when it does, both routers still pick the group's rendezvous home on a tie).
FLUSH_S = 0.02
#: Requests a batch holds at most; past it the oldest are dropped (a peer that cannot keep up
#: must not grow this router's memory).
MAX_PENDING = 4096
#: A POST to a peer may take this long; a peer that failed is skipped for RETRY_S.
POST_TIMEOUT_S = 2.0
RETRY_S = 5.0
#: Peer names found by DNS are resolved again after this long.
RESOLVE_S = 10.0
#: Largest batch body a router accepts from a peer.
MAX_BATCH_BYTES = 16 << 20


class BadBatch(ValueError):
    """A peer's batch is not what encode_batch writes."""


def encode_batch(router_id: str, sent: Sequence[tuple[str, Sequence[int]]]) -> bytes:
    """The body of one POST: who sends it, and (replica URL, prefix keys) per request."""
    payload = {"router": router_id, "sent": [[url, list(keys)] for url, keys in sent]}
    return json.dumps(payload, separators=(",", ":")).encode()


def decode_batch(body: bytes) -> tuple[str, list[tuple[str, tuple[int, ...]]]]:
    """(sender id, entries) of a batch body; BadBatch naming what is wrong otherwise."""
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
    return payload["router"], entries


def apply_batch(fleet: Fleet, entries: Iterable[tuple[str, Sequence[int]]], now: float) -> int:
    """Record a peer's sent prefixes on the replicas this router knows; how many it recorded
    (a replica this router does not know, or not yet, is skipped)."""
    applied = 0
    for url, keys in entries:
        replica = fleet.replicas.get(url)
        if replica is not None and keys:
            replica.prefixes.record(keys, now)
            applied += 1
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
    pending: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    #: Peer URL -> monotonic time before which it is skipped (failed, or found to be us).
    skip_until: dict[str, float] = field(default_factory=dict)
    myself: set[str] = field(default_factory=set)
    peers: list[str] = field(default_factory=list)
    batches_sent: int = 0
    batches_failed: int = 0
    requests_dropped: int = 0
    batches_received: int = 0
    requests_received: int = 0
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

    def take(self) -> list[tuple[str, tuple[int, ...]]]:
        """Everything noted since the last take."""
        taken, self.pending = self.pending, []
        self._wake.clear()
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


async def _post(session: aiohttp.ClientSession, link: PeerLink, peer: str, body: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    if link.auth_key:
        headers["Authorization"] = f"Bearer {link.auth_key}"
    try:
        async with session.post(
            peer + PEER_PATH,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT_S),
            allow_redirects=False,
        ) as resp:
            answer = await resp.read()
            if resp.status != 200:
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message=answer[:200].decode()
                )
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        link.batches_failed += 1
        link.skip_until[peer] = time.monotonic() + RETRY_S
        log.warning("peer unreachable peer=%s error=%r (skipped %.0f s)", peer, exc, RETRY_S)
        return
    try:
        them = json.loads(answer).get("router")
    except (ValueError, AttributeError):
        them = None
    if them == link.router_id:
        link.myself.add(peer)
        log.info("peer is this router peer=%s", peer)
    else:
        link.batches_sent += 1


async def peer_loop(link: PeerLink, session: aiohttp.ClientSession) -> None:
    """Send what this router sent to its peers, a batch per FLUSH_S while requests flow;
    asleep (no timer) while none do."""
    while True:
        await link.wait()
        await asyncio.sleep(FLUSH_S)
        sent = link.take()
        peers = await link.refresh(time.monotonic())
        if not sent or not peers:
            continue
        body = encode_batch(link.router_id, sent)
        await asyncio.gather(*(_post(session, link, p, body) for p in peers))
