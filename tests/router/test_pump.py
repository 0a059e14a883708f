"""The pump (router.pump): a stream's bytes relayed from the upstream reader's callback."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from aiohttp.streams import StreamReader

from vllm_fleet.router.pump import _PUMPS, Pump, PumpedReader
from vllm_fleet.router.upstream import IdleWatchdog
from vllm_fleet.router.upstream_client import UpstreamResponse


class FakeUpstream:
    """The upstream connection's protocol: what the pump pauses and resumes."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self, resume_parser: bool = True) -> None:
        self.paused = False


class FakeTransport:
    """The client's transport: records writes; its buffer only drains when told to."""

    def __init__(self, high: int = 100) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0
        self.high = high
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, self.high)

    def is_closing(self) -> bool:
        return self.closing


def _pump(
    transport: FakeTransport, drain: Any = None
) -> tuple[Pump, StreamReader, FakeUpstream, IdleWatchdog]:
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream()
    reader = StreamReader(cast(Any, upstream), 1 << 16, loop=loop)
    response = SimpleNamespace(content=reader, protocol=upstream)
    watchdog = IdleWatchdog(reader, 60.0, loop)
    notes: list[int] = []

    async def no_wait() -> None:
        transport.buffered = 0

    pump = Pump(
        cast(UpstreamResponse, response),
        cast(asyncio.Transport, transport),
        None,
        watchdog,
        lambda: notes.append(1),
        drain or no_wait,
    )
    return pump, reader, upstream, watchdog


async def test_each_upstream_read_is_one_chunk_to_the_client_and_the_end_comes_back() -> None:
    transport = FakeTransport(high=1 << 20)
    pump, reader, _, watchdog = _pump(transport)
    reader.feed_data(b"data: 0\n\n")  # buffered before the pump took over
    pump.start()
    assert type(reader) is PumpedReader
    await asyncio.sleep(0)
    assert transport.writes == [b"9\r\ndata: 0\n\n\r\n"]
    reader.feed_data(b"data: a\n\n")
    reader.feed_data(b"data: b\n\n")  # same upstream read: one write
    await asyncio.sleep(0)
    assert transport.writes[1:] == [b"12\r\ndata: a\n\ndata: b\n\n\r\n"]
    reader.feed_data(b"data: c\n\n")
    reader.feed_eof()  # its end came with the last bytes: they are the relay's to write
    assert await asyncio.wait_for(pump.next_end(), 5) == b"data: c\n\n"
    assert len(transport.writes) == 2
    pump.stop()
    watchdog.close()
    assert id(reader) not in _PUMPS


async def test_an_upstream_failure_wakes_the_relay_with_it() -> None:
    pump, reader, _, watchdog = _pump(FakeTransport())
    pump.start()
    waiting = asyncio.create_task(pump.next_end())
    await asyncio.sleep(0)
    reader.set_exception(aiohttp.ServerDisconnectedError())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await asyncio.wait_for(waiting, 5)
    pump.stop()
    watchdog.close()


async def test_a_client_that_stops_reading_pauses_the_upstream_until_it_drains() -> None:
    transport = FakeTransport(high=16)
    drained = asyncio.Event()

    async def drain() -> None:
        await drained.wait()
        transport.buffered = 0

    pump, reader, upstream, watchdog = _pump(transport, drain)
    pump.start()
    waiting = asyncio.create_task(pump.next_end())
    reader.feed_data(b"x" * 32)
    await asyncio.sleep(0.01)
    assert upstream.paused and upstream.pauses == 1
    assert watchdog.read_since is None  # waiting for the client is not the replica's silence
    drained.set()
    await asyncio.sleep(0.01)
    assert not upstream.paused and not waiting.done()
    reader.feed_eof()
    assert await asyncio.wait_for(waiting, 5) == b""
    assert b"".join(transport.writes) == b"20\r\n" + b"x" * 32 + b"\r\n"
    pump.stop()
    watchdog.close()


async def test_a_client_gone_ends_the_relay_as_a_reset() -> None:
    transport = FakeTransport(high=1 << 20)
    pump, reader, _, watchdog = _pump(transport)
    pump.start()
    waiting = asyncio.create_task(pump.next_end())
    transport.closing = True
    reader.feed_data(b"data: a\n\n")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(waiting, 5)
    assert transport.writes == []
    pump.stop()
    watchdog.close()
    reader.feed_data(b"after")  # no pump any more: aiohttp's own buffering
    assert reader.read_nowait() == b"after"
