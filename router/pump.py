"""A stream's bytes moved to the client from the upstream connection's callback (issue 18).

The relay's loop (router.relay) woke once per upstream read: the parser fed aiohttp's
StreamReader, which resolved a future, which scheduled the relay task, whose readany() took
the bytes back out and whose write() went through two layers of aiohttp before the transport.
A Pump does the same work from the reader's own feed_data: the bytes of one upstream read are
collected, and at the end of that read (one call_soon, the same turn of the loop a task
wake-up would take, so no token waits longer than before) run through the stitcher, framed
as one HTTP chunk and written to the client's transport. The relay task sleeps until
something needs it: the end of the stream, an upstream failure (the reader's exception: the
connection lost, the IdleWatchdog, the progress monitor's abandon), a client that stopped
reading (the upstream is paused until the client's buffer drains; nothing is dropped), or a
client that went away.

The reader is switched to PumpedReader (same layout, so its class can be swapped in place)
only while a pump is registered for it; without one it behaves exactly as aiohttp's. An
answer's body is decoded by the connection's own protocol (router.upstream_connection),
which hands each read's data to the pump in one piece (``relay_now``: written in that same
call, no call_soon); the feed_data path serves any other stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp.streams import StreamReader

from vllm_fleet.router.state import ReplicaState
from vllm_fleet.router.stitcher import Stitcher

if TYPE_CHECKING:  # router.upstream_connection imports this module
    from vllm_fleet.router.upstream import IdleWatchdog
    from vllm_fleet.router.upstream_connection import UpstreamConnection, UpstreamResponse

#: The pump of each reader being pumped, by id(reader): registered by Pump.start, removed by
#: Pump.stop (always, in the relay's finally), so an id is never looked up after reuse.
_PUMPS: dict[int, Pump] = {}


class PumpedReader(StreamReader):
    """aiohttp's StreamReader whose data goes to its pump, when one is registered."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        pump = _PUMPS.get(id(self))
        if pump is None:
            return StreamReader.feed_data(self, data, size)
        pump.take(data)
        return False

    def feed_eof(self) -> None:
        StreamReader.feed_eof(self)
        pump = _PUMPS.get(id(self))
        if pump is not None:
            pump.wake()

    def set_exception(self, exc: BaseException, *args: BaseException) -> None:
        StreamReader.set_exception(self, exc, *args)
        pump = _PUMPS.get(id(self))
        if pump is not None:
            pump.wake()


def pump_of(content: StreamReader) -> Pump | None:
    """The pump relaying ``content``, if one does (router.upstream_connection feeds it)."""
    return _PUMPS.get(id(content))


class Pump:
    """Relays one upstream reader's bytes to the client's transport until its end.

    ``on_bytes`` is called once per upstream read that brought data (the progress monitor's
    ``last_byte_at`` and the watchdog's clock are kept there, not per HTTP chunk).
    """

    __slots__ = (
        "_content",
        "_drain",
        "_high",
        "_loop",
        "_on_bytes",
        "_pending",
        "_scheduled",
        "_stitcher",
        "_transport",
        "_upstream",
        "_waiter",
        "_watchdog",
        "client_gone",
        "paused",
        "tail",
    )

    def __init__(
        self,
        response: UpstreamResponse,
        transport: asyncio.Transport,
        stitcher: Stitcher | None,
        watchdog: IdleWatchdog,
        on_bytes: Callable[[], None],
        drain: Callable[[], Awaitable[None]],
    ) -> None:
        self._drain = drain
        self._content = response.content
        self._upstream: UpstreamConnection | None = response.protocol
        self._transport = transport
        self._stitcher = stitcher
        self._watchdog = watchdog
        self._on_bytes = on_bytes
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._scheduled = False
        self._waiter: asyncio.Future[None] | None = None
        self._high = transport.get_write_buffer_limits()[1] or 1 << 16
        #: The client's transport closed under a write: the client went away.
        self.client_gone = False
        #: Upstream reading paused until the client's buffer drains (the relay resumes it).
        self.paused = False
        #: Bytes that came with the upstream's end: the relay writes them with the end.
        self.tail = b""

    @staticmethod
    def usable(content: StreamReader) -> bool:
        """Can ``content`` be pumped (aiohttp's own reader, not some other payload)?"""
        return type(content) in (StreamReader, PumpedReader)

    def start(self) -> None:
        """Take over the reader: what it already buffered is relayed at once."""
        content = self._content
        content.__class__ = PumpedReader
        _PUMPS[id(content)] = self
        self._watchdog.read_since = self._loop.time()
        if content.exception() is None and content._buffer:  # see usable()
            self.take(content.read_nowait())

    def stop(self) -> None:
        """Give the reader back (what arrives next is buffered as usual) and resume reading."""
        _PUMPS.pop(id(self._content), None)
        self._watchdog.read_since = None
        if self.paused:
            self.paused = False
            if self._upstream is not None:
                self._upstream.resume_reading()

    async def next_end(self) -> bytes:
        """Relay until the stream ends; returns the (stitched) bytes that came with its end.

        Raises the reader's exception when the upstream failed, ConnectionResetError when the
        client went away; waits out a client that stopped reading.
        """
        content = self._content
        while True:
            if not (content.is_eof() or content.exception() or self.paused or self.client_gone):
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            self.flush()
            if self.client_gone:
                raise ConnectionResetError("the client went away")
            failed = content.exception()
            if failed is not None:
                raise failed
            if content.is_eof():
                return self.tail
            if self.paused:
                await self.drained()

    async def drained(self) -> None:
        """Backpressure: wait for the client (the response writer's drain), then read
        upstream again."""
        while self.paused and not self._transport.is_closing():
            await self._drain()
            if self._transport.get_write_buffer_size() < self._high:
                break
        self.paused = False
        self._watchdog.read_since = self._loop.time()
        if self._upstream is not None:
            self._upstream.resume_reading()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self, data: bytes) -> None:
        """From feed_data: keep the bytes, relay them at the end of this upstream read."""
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def relay_now(self, data: bytes) -> None:
        """One upstream read's data, decoded by router.upstream_connection: relayed in this turn
        (it comes in one piece, so there is nothing to collect and no call_soon to wait for).

        The path of nearly every streamed token: kept to a few lines, because a token usually
        wakes the router on its own and each line then costs a cold-cache microsecond. The
        reader cannot be at its end here (the protocol hands the last chunk to ``take``).
        """
        if self._pending:  # bytes fed before (not from the protocol) go first
            self._pending.append(data)
            self.flush()
            return
        data = self._stitched(data)
        if data and not self.client_gone:
            self._write(data)

    def flush(self) -> None:
        """Relay what the last upstream read brought: stitched, framed, one write."""
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        data = self._stitched(data)
        if self._content.is_eof():
            self.tail += data  # goes out with the end of the stream, in the relay's write
            return
        if data and not self.client_gone:
            self._write(data)

    def _stitched(self, data: bytes) -> bytes:
        """One upstream read's bytes noted (watchdog, progress monitor) and stitched: whole
        events only, as the client gets them."""
        self._watchdog.read_since = self._loop.time()
        self._on_bytes()
        stitcher = self._stitcher
        return data if stitcher is None else stitcher.feed(data)

    def _write(self, data: bytes) -> None:
        """``data`` as one HTTP chunk to the client; pause the upstream when its buffer fills."""
        transport = self._transport
        if transport.is_closing():
            self.client_gone = True
            self.wake()
            return
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        if transport.get_write_buffer_size() >= self._high and self._upstream is not None:
            self.paused = True
            self._watchdog.read_since = None  # time waiting for the client is not the replica's
            self._upstream.pause_reading()
            self.wake()


def bytes_from(replica: ReplicaState) -> Callable[[], None]:
    """The per-read note the progress monitor reads: this replica sent bytes just now."""

    def note() -> None:
        replica.last_byte_at = time.monotonic()

    return note
