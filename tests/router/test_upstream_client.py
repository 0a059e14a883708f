"""The proxied requests' client (router.upstream_client).

What the relay reads from an answer must be its body exactly, however the bytes are split into
reads; a connection is reused only after an answer read to its end; and every way a replica can
fail (refused, silent, closed, broken framing) must surface as the failure failover counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from vllm_fleet.router.bounded_read import BodyTooLarge
from vllm_fleet.router.upstream import failure_of
from vllm_fleet.router.upstream_client import ConnectFailed, UpstreamClient, origin_of
from vllm_fleet.router.upstream_connection import Origin, UpstreamConnection, UpstreamResponse

EVENTS = [b"data: 1\n\n", 'data: {"t": "\u00e9\u4e2d"}\n\n'.encode(), b"data: [DONE]\n\n"]
BODY = b"".join(EVENTS)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\nServer: test\r\n\r\n"
)


def chunked(events: list[bytes], extension: bytes = b"") -> bytes:
    framed = b"".join(b"%x%b\r\n%b\r\n" % (len(e), extension, e) for e in events)
    return framed + b"0\r\n\r\n"


def client(**options: Any) -> UpstreamClient:
    settings: dict[str, Any] = {"connect_timeout_s": 5.0, "head_timeout_s": 600.0}
    settings["keepalive_s"] = 4.0
    settings.update(options)
    return UpstreamClient(**settings)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.written = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def sent() -> tuple[UpstreamConnection, FakeTransport, asyncio.Future[UpstreamResponse]]:
    """A connection that sent a request: the answer comes when the test feeds it."""
    loop = asyncio.get_running_loop()
    connection = UpstreamConnection(client(), Origin("replica", 80, None, b"replica"), loop)
    transport = FakeTransport()
    connection.connection_made(transport)
    answer = asyncio.ensure_future(connection.request(b"POST / HTTP/1.1\r\n\r\n", b"{}", 600.0))
    await asyncio.sleep(0)
    assert transport.written == b"POST / HTTP/1.1\r\n\r\n{}"
    return connection, transport, answer


async def answered(reads: list[bytes]) -> tuple[bytes, FakeTransport]:
    """Feed ``reads`` to a connection that sent a request; the body its reader gave."""
    connection, transport, answer = await sent()
    for data in reads:
        connection.data_received(data)
    response = await answer
    return await response.content.read(), transport


def splits(data: bytes) -> list[list[bytes]]:
    """``data`` whole, byte by byte, and cut at every position into two reads."""
    cuts = [[data], [data[i : i + 1] for i in range(len(data))]]
    cuts += [[data[:i], data[i:]] for i in range(1, len(data))]
    return cuts


async def test_an_event_stream_reads_the_same_however_its_bytes_are_split() -> None:
    whole = STREAM_HEAD + chunked(EVENTS, extension=b";x=1")
    for reads in splits(whole):
        body, transport = await answered(reads)
        assert body == BODY, reads
        assert not transport.closed  # a complete answer: the connection may be pooled


async def test_a_sized_body_reads_whole_and_a_body_to_the_close_ends_with_it() -> None:
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
    for reads in splits(sized):
        body, _ = await answered(reads)
        assert body == BODY
    connection, _, answer = await sent()
    connection.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY)
    response = await answer
    connection.connection_lost(None)
    assert await response.content.read() == BODY


@pytest.mark.parametrize(
    "framing",
    [b"5\r\ndata:XX\r\n", b"zz\r\n", b"5\r\nhello\r\n" + b"f" * 2000],
    ids=["no CRLF after the data", "a size that is not hex", "a size line without end"],
)
async def test_broken_framing_fails_the_read_and_closes_the_connection(framing: bytes) -> None:
    connection, transport, answer = await sent()
    connection.data_received(STREAM_HEAD + b"3\r\nabc\r\n" + framing)
    response = await answer
    with pytest.raises(aiohttp.ClientPayloadError, match="answer is broken"):
        await response.content.read()
    assert transport.closed
    response.release()  # a broken answer is never pooled
    assert not connection.reusable


async def test_a_head_that_is_not_http_fails_the_attempt() -> None:
    connection, transport, answer = await sent()
    connection.data_received(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(aiohttp.ClientError, match="not valid HTTP"):
        await answer
    assert transport.closed


async def test_a_body_cut_short_fails_the_read() -> None:
    connection, _, answer = await sent()
    connection.data_received(STREAM_HEAD + b"3\r\nabc\r\n")
    response = await answer
    connection.connection_lost(ConnectionResetError("reset"))
    with pytest.raises(aiohttp.ClientPayloadError, match="ended before its body"):
        await response.content.read()


# -- against a server on loopback --

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


async def test_a_connection_is_reused_after_a_whole_answer_and_dropped_after_a_closed_one(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    connections: list[list[bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads: list[bytes] = []
        connections.append(heads)
        try:
            while True:
                head, body = await read_request(reader)
                heads.append(head)
                writer.write(ok(body[::-1]))
        except asyncio.IncompleteReadError:
            writer.close()

    url = await serve(handler)
    pool = client(api_key="k3y")
    headers = CIMultiDict({"Content-Type": "application/json", "X-Request-Id": "r1"})
    for body in (b"abc", b"defg"):
        response = await pool.post(url, "/v1/completions?x=1", headers, body)
        assert (response.status, await response.read()) == (200, body[::-1])
        response.release()
    assert len(connections) == 1 and len(connections[0]) == 2  # kept alive, reused
    head = connections[0][0].decode()
    assert head.startswith("POST /v1/completions?x=1 HTTP/1.1\r\n")
    port = url.rsplit(":", 1)[1]
    for line in (f"Host: 127.0.0.1:{port}", "Authorization: Bearer k3y", "X-Request-Id: r1"):
        assert f"\r\n{line}\r\n" in head
    assert "\r\nContent-Length: 3\r\n" in head
    response = await pool.post(url, "/v1/completions", headers, b"xyz")
    response.close()  # not read to the end: what makes vLLM abort the request
    response = await pool.post(url, "/v1/completions", headers, b"xyz")
    assert await response.read() == b"zyx"
    response.release()
    assert [len(heads) for heads in connections] == [3, 1]
    await pool.close()


async def test_an_idle_connection_past_keep_alive_is_not_reused(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    seen = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        seen += 1
        try:
            while True:
                await read_request(reader)
                writer.write(ok(b"{}"))
        except asyncio.IncompleteReadError:
            writer.close()

    url = await serve(handler)
    pool = client(keepalive_s=0.0)
    for _ in range(2):
        response = await pool.post(url, "/v1/x", CIMultiDict(), b"")
        await response.read()
        response.release()
    assert seen == 2
    await pool.close()


async def test_a_refused_connection_is_a_connect_failure_that_counts_as_refused() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectFailed) as raised:
        await client().post(f"http://127.0.0.1:{port}", "/v1/x", CIMultiDict(), b"")
    failure = failure_of("r", raised.value)
    assert (failure.reason, failure.refused) == ("connect", True)


async def test_a_replica_that_closes_or_never_answers_fails_the_attempt(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    closed_by_client = asyncio.Event()

    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        assert await reader.read() == b""  # until the client gives up and closes
        closed_by_client.set()

    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client().post(await serve(closes), "/v1/x", CIMultiDict(), b"{}")
    assert failure_of("r", aiohttp.ServerDisconnectedError()).reason == "disconnect"
    with pytest.raises(asyncio.TimeoutError, match=r"no answer from the replica in 0\.2 s"):
        await client(head_timeout_s=0.2).post(await serve(silent), "/v1/x", CIMultiDict(), b"")
    await asyncio.wait_for(closed_by_client.wait(), 10)


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="line break"):
        await client().post("http://127.0.0.1:9", "/v1/x", CIMultiDict({"X": "a\r\nB: c"}), b"")


def test_the_host_header_names_a_port_only_when_it_is_not_the_default() -> None:
    assert origin_of("http://replica:8000").host_header == b"replica:8000"
    assert origin_of("http://replica").host_header == b"replica"
    assert origin_of("https://replica").port == 443
    assert origin_of("https://replica").ssl is not None
    assert origin_of("http://[::1]:8000").host_header == b"[::1]:8000"
    with pytest.raises(ValueError, match="not an http"):
        origin_of("ftp://replica")


async def test_a_get_is_sent_again_once_when_a_reused_connection_was_closed_but_a_post_is_not(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """The replica may close an idle connection just as the router reuses it: a health check
    or scrape goes again on a new connection; a request's body is never sent twice by the
    client (failover decides, counting the failure)."""
    connections = 0

    async def answers_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(ok(b"fine"))
        await read_request(reader)
        writer.close()  # the second request on this connection is dropped unanswered

    url = await serve(answers_once)
    pool = client()
    assert (await pool.get(url, "/health", 2.0, 100)).body == b"fine"
    answer = await pool.get(url, "/health", 2.0, 100)
    assert (answer.status, answer.body, connections) == (200, b"fine", 2)
    with pytest.raises(aiohttp.ServerDisconnectedError):  # the same race, for a POST
        await pool.post(url, "/v1/x", CIMultiDict(), b"{}")
    assert connections == 2
    await pool.close()


async def test_a_get_is_bounded_in_size_and_in_time(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    stalled = asyncio.Event()

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/announced" in head:
            writer.write(ok(b"x" * 200))
        elif b"/chunked" in head:
            writer.write(STREAM_HEAD + chunked([b"x" * 60] * 4))
        else:  # the head, then nothing
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            assert await reader.read() == b""  # until the client gives up and closes
            stalled.set()

    url = await serve(big)
    pool = client()
    for path in ("/announced", "/chunked"):
        with pytest.raises(BodyTooLarge):
            await pool.get(url, path, 2.0, 100)
    with pytest.raises(asyncio.TimeoutError):
        await pool.get(url, "/stalled", 0.3, 100)
    await asyncio.wait_for(stalled.wait(), 10)
    assert pool.counts() == (0, 0)  # nothing pooled from answers not read to their end
    await pool.close()
