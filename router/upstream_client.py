"""The proxied requests' HTTP client: pooled keep-alive connections, answers read with httptools.

Every ``POST /v1/*`` a client sends is re-sent to a replica from here; health checks, scrapes
and the other GETs keep aiohttp's ClientSession. Why a client of our own for this one call:
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
from typing import cast

import aiohttp
import httptools
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from vllm_fleet.router.pump import pump_of

#: Bytes an answer's reader buffers before the connection stops reading (aiohttp's default).
READ_LIMIT = 1 << 16
#: Request bodies shorter than this are sent in one buffer with the head.
ONE_WRITE_BYTES = 1 << 16
#: Most bytes of response head (status line and headers) accepted.
MAX_HEAD_BYTES = 1 << 16


class ConnectFailed(aiohttp.ClientConnectionError):
    """No connection to the replica: ``os_error`` says why (refused, unreachable, ...)."""

    def __init__(self, origin: str, os_error: OSError) -> None:
        super().__init__(f"cannot connect to {origin}: {os_error}")
        self.os_error = os_error


class BadAnswer(aiohttp.ClientError):
    """The replica's answer is not HTTP this client reads (a parse error, an upgrade)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a replica's base URL connects, and the Host header it is sent."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: bytes


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


class UpstreamResponse:
    """A replica's answer: status and headers read, the body arriving in ``content``."""

    __slots__ = ("_connection", "content", "headers", "status")

    def __init__(
        self,
        connection: UpstreamConnection,
        status: int,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
    ) -> None:
        self._connection = connection
        self.status = status
        self.headers = headers
        self.content = content

    @property
    def protocol(self) -> UpstreamConnection:
        """The connection the body is read from (router.pump pauses and resumes it)."""
        return self._connection

    @property
    def content_type(self) -> str:
        """The media type, lowercased, without parameters (aiohttp's default when absent)."""
        value = self.headers.get("Content-Type")
        if not value:
            return "application/octet-stream"
        return value.split(";", 1)[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body (callers bound the wait: router.bounded_read.read_bounded)."""
        return await self.content.read()

    def release(self) -> None:
        """The body was read to its end: the connection goes back to the pool if it may."""
        self._connection.finished()

    def close(self) -> None:
        """Drop the connection (the replica sees it close and aborts the request)."""
        self._connection.close()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a replica: one request at a time, its answer parsed by
    httptools in the read callback."""

    __slots__ = (
        "_body",
        "_complete",
        "_eof_delimited",
        "_head_size",
        "_headers",
        "_keep_alive",
        "_loop",
        "_parser",
        "_pool",
        "_reading_paused",
        "_response",
        "_waiter",
        "idle_since",
        "origin",
        "transport",
    )

    def __init__(self, pool: UpstreamClient, origin: Origin, loop: asyncio.AbstractEventLoop):
        self._pool = pool
        self._loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0
        self._body: list[bytes] = []
        self._complete = False
        self._keep_alive = False
        self._eof_delimited = False
        self._reading_paused = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:  # nothing asked, or more than one answer
            self.close()
            return
        why = ""
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            why = "an upgrade in answer to a POST"
        except httptools.HttpParserError as exc:
            why = f"not valid HTTP ({exc})"
        if self._body:
            body = self._body
            data = body[0] if len(body) == 1 else b"".join(body)
            body.clear()
            self._deliver(data)
        if self._complete:
            self._ended()
        if why:  # after a complete answer: bytes that belong to none (not pooled)
            self._broken(why)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._pool.forget(self)
        self._keep_alive = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                aiohttp.ServerDisconnectedError("the replica closed the connection")
                if exc is None
                else aiohttp.ClientOSError(f"the connection to the replica broke: {exc}")
            )
        response = self._response
        if response is None or self._complete:
            return
        if exc is None and self._eof_delimited:  # a body that ends with the connection
            self._complete = True
            self._ended()
            return
        content = response.content
        if content.exception() is None and not content.is_eof():
            content.set_exception(
                aiohttp.ClientPayloadError(
                    "the replica's answer ended before its body did"
                    + (f" ({exc})" if exc is not None else "")
                )
            )

    # -- flow control (aiohttp's StreamReader calls these) --

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        """``resume_parser`` is aiohttp's (its parser can pause; httptools here cannot)."""
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- httptools callbacks --

    @property
    def connected(self) -> bool:
        return self.transport is not None

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("a response head over 64 KiB")
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is None or self._response is not None:
            raise httptools.HttpParserError("a second answer to one request")
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        self._headers = []
        framing = headers.get("Transfer-Encoding", "")
        self._eof_delimited = "Content-Length" not in headers and "chunked" not in framing
        content = StreamReader(self, READ_LIMIT, loop=self._loop)  # type: ignore[arg-type]
        response = UpstreamResponse(self, parser.get_status_code(), headers, content)
        self._response = response
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._complete:
            raise httptools.HttpParserError("a second answer to one request")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        self._complete = True
        self._keep_alive = parser is not None and parser.should_keep_alive()

    # -- the request --

    async def request(self, head: bytes, body: bytes, head_timeout_s: float) -> UpstreamResponse:
        """Send one request; its answer once the head has come (TimeoutError after
        ``head_timeout_s``). Cancelled or failed before that, the connection is closed."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise aiohttp.ServerDisconnectedError("the pooled connection was closed")
        self._parser = httptools.HttpResponseParser(self)
        self._response = None
        self._complete = self._keep_alive = self._eof_delimited = False
        self._head_size = 0
        waiter: asyncio.Future[UpstreamResponse] = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(head_timeout_s, _expire, waiter, head_timeout_s)
        try:
            if len(body) < ONE_WRITE_BYTES:  # one send, not two: a copy is cheaper
                transport.write(head + body)
            else:
                transport.writelines((head, body))
            return await waiter
        except BaseException:
            self.close()
            raise
        finally:
            timer.cancel()
            self._waiter = None

    def _deliver(self, data: bytes) -> None:
        """One read's body bytes: to the stream's pump when one relays it, else the reader."""
        response = self._response
        if response is None:
            return
        content = response.content
        pump = pump_of(content)
        if pump is None:
            content.feed_data(data)
        elif self._complete:
            pump.take(data)  # written with the stream's end, after the reader's eof
        else:
            pump.relay_now(data)

    def _ended(self) -> None:
        """The answer's body is complete: the reader ends; the pool gets the connection back
        when the response is released."""
        response = self._response
        if response is not None and not response.content.is_eof():
            response.content.feed_eof()

    def _broken(self, why: str) -> None:
        exc = BadAnswer(f"the replica's answer is broken: {why}")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        response = self._response
        if response is not None and not self._complete:
            response.content.set_exception(aiohttp.ClientPayloadError(str(exc)))
        self.close()

    def finished(self) -> None:
        """The response was released: pooled when its answer ended and may be followed."""
        if self._complete and self._keep_alive and self.transport is not None:
            self._parser = None
            self._response = None
            self._pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self._keep_alive = False
        self._parser = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    @property
    def reusable(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing()


def _expire(waiter: asyncio.Future[UpstreamResponse], after_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError(f"no answer from the replica in {after_s:g} s"))


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
        origin = self._origins.get(base)
        if origin is None:
            origin = self._origins[base] = origin_of(base)
        head = self._head(origin, path, headers, len(body))
        connection = self._pooled(origin)
        if connection is None:
            connection = await self._connect(origin)
        return await connection.request(head, body, self._head_timeout_s)

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
            await asyncio.wait_for(
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
