"""The upstream protocol decodes an event stream's chunks itself (router.upstream_protocol).

What the relay reads from it must be exactly what aiohttp's own parser would have given, however
the bytes are split into reads, and the connection must end each answer as aiohttp would (kept
for the next request, or closed on a broken stream).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from vllm_fleet.router.upstream_protocol import UpstreamConnector, UpstreamProtocol

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\nServer: test\r\n\r\n"
)
EVENTS = [b"data: 1\n\n", 'data: {"t": "\u00e9\u4e2d"}\n\n'.encode(), b"data: [DONE]\n\n"]
BODY = b"".join(EVENTS)


def chunked(events: list[bytes], extension: bytes = b"") -> bytes:
    framed = b"".join(b"%x%b\r\n%b\r\n" % (len(e), extension, e) for e in events)
    return framed + b"0\r\n\r\n"


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def protocol() -> tuple[UpstreamProtocol, FakeTransport]:
    proto = UpstreamProtocol(asyncio.get_running_loop())
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport


async def answer(proto: UpstreamProtocol, reads: list[bytes]) -> aiohttp.StreamReader:
    """Feed one response in ``reads`` after its request; its body's reader, taken as aiohttp's
    ClientResponse takes it (the parsed head, read from the protocol)."""
    proto.set_response_params(read_until_eof=False, auto_decompress=False)
    for data in reads:
        proto.data_received(data)
    _message, payload = await proto.read()
    return payload


def body_of(payload: aiohttp.StreamReader) -> bytes:
    assert payload.is_eof(), "the message did not end"
    return payload.read_nowait()


async def test_every_split_of_the_reads_gives_the_same_body() -> None:
    wire = HEAD + chunked(EVENTS)
    for cut in range(1, len(wire)):
        proto, transport = protocol()
        assert body_of(await answer(proto, [wire[:cut], wire[cut:]])) == BODY, cut
        assert not transport.closed and not proto.should_close, cut


async def test_a_byte_at_a_time_and_chunk_extensions() -> None:
    wire = HEAD + chunked(EVENTS, extension=b";name=value")
    proto, _ = protocol()
    reads = [wire[i : i + 1] for i in range(len(wire))]
    assert body_of(await answer(proto, reads)) == BODY


async def test_the_connection_serves_the_next_answer() -> None:
    """After the last chunk aiohttp's parser has ended the message: the next one parses."""
    proto, _ = protocol()
    first = await answer(proto, [HEAD + chunked(EVENTS[:1])])
    assert body_of(first) == EVENTS[0]
    json_answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    json_answer += b"{}"
    assert body_of(await answer(proto, [json_answer])) == b"{}"
    assert body_of(await answer(proto, [HEAD + chunked(EVENTS)])) == BODY
    assert not proto.should_close


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"zz\r\ndata: 1\n\n\r\n0\r\n\r\n", "malformed chunk-size"),
        (b"-9\r\ndata: 1\n\n\r\n0\r\n\r\n", "malformed chunk-size"),
        (b"9\r\ndata: 1\n\nXX0\r\n\r\n", "not followed by CRLF"),
        (b"9" * 2000, "too long"),
    ],
)
async def test_a_broken_stream_fails_the_read_and_the_connection(body: bytes, why: str) -> None:
    proto, transport = protocol()
    payload = await answer(proto, [HEAD, body])
    failure = payload.exception()
    assert isinstance(failure, aiohttp.ClientPayloadError)
    assert why in str(failure)
    assert transport.closed and proto.should_close


async def test_other_answers_are_aiohttps_own() -> None:
    """Not an event stream (a 500's chunked JSON): aiohttp's parser reads all of it."""
    head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    proto, _ = protocol()
    payload = await answer(proto, [head + chunked([b'{"error":', b' "x"}'])])
    assert body_of(payload) == b'{"error": "x"}'


async def test_a_real_server_streams_through_one_kept_connection() -> None:
    """With aiohttp's own server and client session: exact bodies, one connection reused."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in EVENTS:
            await response.write(event)
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/stream"
        protocols = []
        async with aiohttp.ClientSession(connector=UpstreamConnector()) as session:
            for _ in range(3):
                async with session.post(url) as response:
                    assert await response.read() == BODY
                    assert response.connection is None  # released to the pool
                    protocols.append(response._protocol)
        assert all(isinstance(p, UpstreamProtocol) for p in protocols)
        assert len({id(p) for p in protocols}) == 1, "the connection was not kept"
    finally:
        await runner.cleanup()
