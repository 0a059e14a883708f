"""Read an upstream response body with a size cap.

Health checks and scrapes talk to replicas we do not control; a broken or hostile one must not
make the router buffer gigabytes. ``StreamReader.read(n)`` returns whatever is buffered (often a
partial body), so the cap is enforced over the whole stream instead.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

import aiohttp

CHUNK_BYTES = 64 << 10
T = TypeVar("T")


class BodyTooLarge(ValueError):
    """The body exceeded the cap; raised before reading more than the cap (plus one chunk)."""


class Answer(Protocol):
    """What read_capped reads: aiohttp's ClientResponse, or router.upstream_connection's."""

    @property
    def content_length(self) -> int | None: ...

    @property
    def content(self) -> aiohttp.StreamReader: ...


async def read_capped(resp: Answer, cap: int) -> bytes:
    """The whole body of ``resp``, or BodyTooLarge once it exceeds ``cap`` bytes."""
    if resp.content_length is not None and resp.content_length > cap:
        raise BodyTooLarge(f"body of {resp.content_length} bytes is over the {cap}-byte cap")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge(f"body is over the {cap}-byte cap")
        chunks.append(chunk)
    return b"".join(chunks)


async def fetch_json(
    session: aiohttp.ClientSession, url: str, timeout_s: float, cap: int
) -> Any | None:
    """A replica's small JSON answer to a GET (model cards, KV event sources), decoded; None
    when the replica cannot say now: not reachable, slow, not 200, over ``cap`` bytes or not
    JSON. Redirects are not followed (a replica's answer comes from the replica)."""
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.get(url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            return json.loads(await read_capped(resp, cap))
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


async def within(work: Awaitable[T], seconds: float) -> T:
    """``await work`` for at most ``seconds`` (asyncio.TimeoutError after), in this task: no
    task of its own whose failure could go unretrieved when this one is cancelled."""
    if sys.version_info < (3, 11):  # no asyncio.timeout yet
        return await asyncio.wait_for(work, seconds)
    async with asyncio.timeout(seconds):
        return await work


async def read_bounded(read: Awaitable[bytes], idle_s: float) -> bytes:
    """``await read`` for at most ``idle_s`` seconds (asyncio.TimeoutError after).

    Used for client bodies (--body-timeout) and whole upstream bodies: router.upstream_client
    bounds only the wait for an answer's head, and a replica that sends a head and then
    nothing would otherwise hold the read forever (tests/chaos/test_network_faults.py).
    """
    return await within(read, idle_s)
