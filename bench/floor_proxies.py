"""Two proxies that do nothing but relay: the floor a Python router's data path stands on
(issue 18).

    python -m bench.floor_proxies httptools PORT http://127.0.0.1:8001 http://127.0.0.1:8002
    python -m bench.floor_proxies aiohttp PORT http://127.0.0.1:8001 ...

- ``httptools``: asyncio protocols on uvloop, requests and responses read with httptools (the
  C parser uvicorn uses), pooled keep-alive upstream connections, round robin, the answer's
  bytes written to the client as each read brings them (chunked framing passed through).
- ``aiohttp``: an aiohttp server and one ClientSession, round robin, the answer relayed with
  ``iter_any`` and ``StreamResponse.write``: what any aiohttp proxy pays before its own logic.
- ``aiohttp-server``: aiohttp's server, but the upstream side on pooled protocol connections
  read with httptools (each read's decoded body handed to the handler, which writes it with
  ``StreamResponse.write``): the two above differ in both halves, this one in the client only.

Neither balances, checks health, retries, counts or logs anything: ``bench.dataplane
--references`` runs them beside our router and vllm-router, so each figure can be read as
"floor + what the router does". Not for serving: no limits, no errors, no timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import cast

import aiohttp
import httptools
import uvloop
from aiohttp import web

from bench.peers import Peer
from tests.support.ports import free_port

KINDS = ("httptools", "aiohttp", "aiohttp-server")
#: Request headers not passed on (the proxy sets its own framing and host).
_HOP = frozenset({"host", "connection", "content-length", "transfer-encoding", "keep-alive"})


def _hostport(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    return host, int(port)


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to a replica: relays each answer to the client it serves."""

    def __init__(self, pool: list[_Upstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.client = None
        self.pool.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)


class _Client(asyncio.Protocol):
    """One client connection: each request parsed, rewritten to a replica's, and sent."""

    def __init__(
        self, backends: list[tuple[str, int]], pools: list[list[_Upstream]], turn: Iterator[int]
    ) -> None:
        self.backends = backends
        self.pools = pools
        self.turn = turn  # shared by all clients: round robin over the whole proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower().decode() not in _HOP:
            self.headers.append(name + b": " + value + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        head = b"%s %s HTTP/1.1\r\nhost: replica\r\n%scontent-length: %d\r\n\r\n" % (
            self.parser.get_method(),
            self.url,
            b"".join(self.headers),
            len(body),
        )
        self.url, self.headers, self.body = b"", [], []
        asyncio.get_running_loop().create_task(self._send(head + body))

    async def _send(self, request: bytes) -> None:
        index = next(self.turn)
        pool = self.pools[index]
        if pool:
            upstream = pool.pop()
        else:
            host, port = self.backends[index]
            _, upstream = await asyncio.get_running_loop().create_connection(
                lambda: _Upstream(pool), host, port
            )
        upstream.client = self
        assert upstream.transport is not None
        upstream.transport.write(request)


async def serve_httptools(port: int, backends: list[str]) -> None:
    places = [_hostport(url) for url in backends]
    pools: list[list[_Upstream]] = [[] for _ in places]
    loop = asyncio.get_running_loop()
    turn = itertools.cycle(range(len(places)))
    server = await loop.create_server(lambda: _Client(places, pools, turn), "127.0.0.1", port)
    await server.serve_forever()


async def _serve_forever(
    relay: Callable[[web.Request], Awaitable[web.StreamResponse]], port: int
) -> None:
    """An aiohttp server on ``port`` sending every request to ``relay``, until cancelled."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


class _LeanUpstream(asyncio.Protocol):
    """One keep-alive connection to a replica, its answer's body decoded by httptools and
    handed to the waiting handler a read at a time."""

    def __init__(self, pool: list[_LeanUpstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.pieces: list[bytes] = []
        self.status = 0
        self.content_type = b"application/json"
        self.done = False
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, request: bytes) -> None:
        self.pieces, self.done, self.status = [], False, 0
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        waiter = self.waiter
        if waiter is not None and (self.pieces or self.done or self.status) and not waiter.done():
            waiter.set_result(None)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.done = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter
        self.waiter = None


async def serve_aiohttp_server(port: int, backends: list[str]) -> None:
    places = [_hostport(url) for url in backends]
    pools: list[list[_LeanUpstream]] = [[] for _ in places]
    turn = itertools.cycle(range(len(places)))
    loop = asyncio.get_running_loop()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = b"".join(
            b"%s: %s\r\n" % (k.encode(), v.encode())
            for k, v in request.headers.items()
            if k.lower() not in _HOP
        )
        index = next(turn)
        pool = pools[index]
        if pool:
            upstream = pool.pop()
        else:
            host, port = places[index]
            _, upstream = await loop.create_connection(lambda: _LeanUpstream(pool), host, port)
        upstream.send(
            b"%s %s HTTP/1.1\r\nhost: replica\r\n%scontent-length: %d\r\n\r\n%s"
            % (request.method.encode(), request.path_qs.encode(), headers, len(body), body)
        )
        while not upstream.status:
            await upstream.wait()
        response = web.StreamResponse(status=upstream.status)
        response.content_type = upstream.content_type.decode().split(";")[0]
        await response.prepare(request)
        while True:
            if upstream.pieces:
                data = b"".join(upstream.pieces)
                upstream.pieces = []
                await response.write(data)
            elif upstream.done:
                break
            else:
                await upstream.wait()
        await response.write_eof()
        pool.append(upstream)
        return response

    await _serve_forever(relay, port)


async def serve_aiohttp(port: int, backends: list[str]) -> None:
    turn = itertools.cycle(backends)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = next(turn) + request.path_qs
        async with session.request(request.method, url, data=body, headers=headers) as up:
            response = web.StreamResponse(status=up.status)
            response.content_type = up.content_type
            await response.prepare(request)
            async for data in up.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response

    await _serve_forever(relay, port)


class FloorPeer(Peer):
    """One of the floor proxies above, as a peer of the data-path harness."""

    def __init__(self, workdir: Path, kind: str, python: str = sys.executable) -> None:
        super().__init__(workdir)
        self.kind = kind
        self.python = python
        self.name = f"floor {kind}"
        self.settings = f"`python -m bench.floor_proxies {kind}` (relays only)"

    async def start(self, backends: list[str]) -> str:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [self.python, "-m", "bench.floor_proxies", self.kind, str(port), *backends]
        return await self._launch(argv)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in KINDS or not argv[1].isdigit():
        kinds = "|".join(KINDS)
        print(f"usage: python -m bench.floor_proxies {kinds} PORT URL...", file=sys.stderr)
        return 2
    serve = {
        "httptools": serve_httptools,
        "aiohttp": serve_aiohttp,
        "aiohttp-server": serve_aiohttp_server,
    }[argv[0]]
    uvloop.run(serve(int(argv[1]), argv[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
