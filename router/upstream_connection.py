"""One keep-alive connection to a replica, its answer parsed by httptools as it arrives.

The connection half of router.upstream_client (which pools these and says why the router has
a client of its own). A connection carries one request at a time: ``request`` writes the head
and body and returns once the answer's head has come; the body then goes, one read at a time
and in one piece, to the stream's Pump when one relays it (router.pump: written to the client
in the same call) or to aiohttp's StreamReader, which the relay and the watchdogs read. Its
failures are aiohttp's exception types, so failover counts them as before.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Protocol, cast

import aiohttp
import httptools
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from vllm_fleet.router.pump import pump_of

#: Bytes an answer's reader buffers before the connection stops reading (aiohttp's default).
READ_LIMIT = 1 << 16
#: Request bodies shorter than this are sent in one buffer with the head.
ONE_WRITE_BYTES = 1 << 16
#: Most bytes of response head (status line and headers) accepted.
MAX_HEAD_BYTES = 1 << 16


class BadAnswer(aiohttp.ClientError):
    """The replica's answer is not HTTP this client reads (a parse error, an upgrade)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a replica's base URL connects, and the Host header it is sent."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: bytes


class ConnectionPool(Protocol):
    """Where a connection goes back when its answer ended (router.upstream_client)."""

    def put(self, connection: UpstreamConnection) -> None: ...

    def forget(self, connection: UpstreamConnection) -> None: ...


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
    def content_length(self) -> int | None:
        """The Content-Length the replica announced, if any (httptools checked its form)."""
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

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

    def __init__(self, pool: ConnectionPool, origin: Origin, loop: asyncio.AbstractEventLoop):
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
            why = "an upgrade in answer to a request"
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

    @property
    def connected(self) -> bool:
        return self.transport is not None

    # -- httptools callbacks --

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
