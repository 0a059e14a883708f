"""The router's HTTP client for replicas: pooled keep-alive connections, answers read by httptools.

Every ``POST /v1/*`` a client sends is re-sent to a replica from here, and every replica's
health check and /metrics scrape (each second) is a ``get`` here; the rare calls (KV event
source discovery, LoRA loads) keep aiohttp's ClientSession. Why a client of our own:
aiohttp's builds a ClientRequest, its auto headers, a connection through the connector's
bookkeeping, a ClientResponse and its parser callbacks for every request, and it cost ~0.09 ms
of CPU a request at scenario 5's 64 in flight, a quarter of vllm-router's whole cost
(bench/findings.md, "Which half of aiohttp the floor pays for", issue 18). Here a request is
its head and body written in one call on a pooled connection, and the answer is parsed in C
(httptools, the parser uvicorn uses), the chunked framing included.

What the rest of the router reads is unchanged: an ``UpstreamResponse`` has the status, the
headers, and the body in aiohttp's StreamReader (which the relay, router.pump and the
watchdogs already know), and its failures are aiohttp's exception types, so failover counts
them as before. One read's body bytes are handed on in one piece: to the stream's Pump when
one relays it (written to the client in the same call), else to the reader.

Limits and choices, as aiohttp's session had them (router.app.upstream_session): no
connection limit (vLLM queues what it cannot batch), connections idle for more than
``keepalive_s`` are not reused (uvicorn closes them at 5 s), no redirects followed, no
decompression and no Accept-Encoding, no cookies; ``--upstream-api-key`` is sent as the
Authorization header. A connection whose answer was not read to its end is closed, not
pooled: closing it is what makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from vllm_fleet.router.bounded_read import read_capped, within
from vllm_fleet.router.upstream_connection import Origin, UpstreamConnection, UpstreamResponse

__all__ = [
    "ConnectFailed",
    "Fetched",
    "UpstreamClient",
    "UpstreamConnection",
    "UpstreamResponse",
    "origin_of",
]


class ConnectFailed(aiohttp.ClientConnectionError):
    """No connection to the replica: ``os_error`` says why (refused, unreachable, ...)."""

    def __init__(self, origin: str, os_error: OSError) -> None:
        super().__init__(f"cannot connect to {origin}: {os_error}")
        self.os_error = os_error


@dataclass(frozen=True, slots=True)
class Fetched:
    """A whole answer to a GET (UpstreamClient.get)."""

    status: int
    body: bytes


def origin_of(base: str) -> Origin:
    """The origin of a replica's base URL (``http://host:port``, ``https://...``)."""
    url = URL(base)
    if url.scheme not in ("http", "https") or not url.host or url.port is None:
        raise ValueError(f"not an http(s) URL with a host: {base!r}")
    context = ssl.create_default_context() if url.scheme == "https" else None
    default = 443 if url.scheme == "https" else 80
    host = url.raw_host or url.host
    shown = f"[{host}]" if ":" in host else host
    header = shown if url.port == default else f"{shown}:{url.port}"
    return Origin(url.host, url.port, context, header.encode("idna"))


class UpstreamClient:
    """The pool of connections to every replica, and ``post`` over it."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        head_timeout_s: float,
        keepalive_s: float,
        api_key: str | None = None,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._head_timeout_s = head_timeout_s
        self._keepalive_s = keepalive_s
        self._auth = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        self._origins: dict[str, Origin] = {}
        self._idle: dict[Origin, deque[UpstreamConnection]] = {}
        self._open: set[UpstreamConnection] = set()
        self._closed = False

    async def post(
        self, base: str, path: str, headers: CIMultiDict[str], body: bytes
    ) -> UpstreamResponse:
        """POST ``body`` to ``base + path``; the answer once its head has come.

        Raises ConnectFailed (no connection), asyncio.TimeoutError (no connection or no
        head in time) or another aiohttp.ClientError (the connection broke, the answer is
        not HTTP).
        """
        origin = self._origin(base)
        head = self._head(origin, path, headers, len(body))
        connection = self._pooled(origin)
        if connection is None:
            connection = await self._connect(origin)
        return await connection.request(head, body, self._head_timeout_s)

    async def get(self, base: str, path: str, timeout_s: float, cap: int) -> Fetched:
        """GET ``base + path`` and read the whole answer, all within ``timeout_s``: the
        health checks' and scrapes' call (every replica, every second, so it shares the
        proxied requests' pool rather than paying aiohttp's client: bench/findings.md).

        Raises what ``post`` raises, asyncio.TimeoutError, and BodyTooLarge past ``cap``.
        """
        return await within(self._get(base, path, timeout_s, cap), timeout_s)

    async def _get(self, base: str, path: str, timeout_s: float, cap: int) -> Fetched:
        origin = self._origin(base)
        head = b"GET %s HTTP/1.1\r\nHost: %s\r\n%b\r\n" % (
            path.encode(),
            origin.host_header,
            self._auth,
        )
        pooled = self._pooled(origin)
        try:
            response = await (pooled or await self._connect(origin)).request(head, b"", timeout_s)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if pooled is None:
                raise
            # the replica closed the idle connection as it was reused: a GET is safe to send
            # again, once, on a new one (aiohttp's client does the same)
            response = await (await self._connect(origin)).request(head, b"", timeout_s)
        try:
            body = await read_capped(response, cap)
        except BaseException:
            response.close()
            raise
        response.release()
        return Fetched(response.status, body)

    def _origin(self, base: str) -> Origin:
        origin = self._origins.get(base)
        if origin is None:
            origin = self._origins[base] = origin_of(base)
        return origin

    def _head(self, origin: Origin, path: str, headers: CIMultiDict[str], length: int) -> bytes:
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("a header with a line break")  # aiohttp's server lets none in
        return b"POST %s HTTP/1.1\r\nHost: %s\r\n%b%bContent-Length: %d\r\n\r\n" % (
            path.encode(),
            origin.host_header,
            lines.encode("utf-8", "surrogateescape"),
            self._auth,
            length,
        )

    def _pooled(self, origin: Origin) -> UpstreamConnection | None:
        """The most recently used idle connection that is still usable, if any."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest = asyncio.get_running_loop().time() - self._keepalive_s
        while idle and (idle[0].idle_since <= oldest or not idle[0].reusable):
            idle.popleft().close()  # past keep-alive (the server may close it any moment)
        while idle:
            connection = idle.pop()
            if connection.reusable:
                return connection
        return None

    async def _connect(self, origin: Origin) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        connection = UpstreamConnection(self, origin, loop)
        shown = origin.host_header.decode()
        try:
            await within(
                loop.create_connection(
                    lambda: connection,
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                ),
                self._connect_timeout_s,
            )
        except asyncio.TimeoutError:
            raise asyncio.TimeoutError(
                f"no connection to {shown} in {self._connect_timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise ConnectFailed(shown, exc) from exc
        if self._closed:
            connection.close()
            raise aiohttp.ClientConnectionError("the router is shutting down")
        self._open.add(connection)
        return connection

    def forget(self, connection: UpstreamConnection) -> None:
        """A connection closed (its idle entry, if any, is skipped when reached)."""
        self._open.discard(connection)

    def put(self, connection: UpstreamConnection) -> None:
        """A connection whose answer ended: idle until the next request to its replica."""
        if self._closed:
            connection.close()
            return
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(connection.origin, deque()).append(connection)

    def counts(self) -> tuple[int, int]:
        """(idle, busy) open connections: what the pool holds, and what requests hold."""
        idle = sum(1 for queue in self._idle.values() for c in queue if c.reusable)
        return idle, len(self._open) - idle

    async def close(self) -> None:
        """Close every connection (the app's cleanup)."""
        self._closed = True
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()
