"""Size-capped body reads, with and without Content-Length."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from vllm_fleet.router.bounded_read import BodyTooLarge, read_capped

CAP = 100_000


async def sized(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * int(request.query["n"]))


async def streamed(request: web.Request) -> web.StreamResponse:
    """Chunked transfer, no Content-Length: the cap must hold while streaming."""
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for _ in range(int(request.query["chunks"])):
        await resp.write(b"y" * 10_000)
    await resp.write_eof()
    return resp


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/sized", sized)
    app.router.add_get("/streamed", streamed)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.mark.parametrize(
    ("path", "length"),
    [
        ("/sized?n=0", 0),
        ("/sized?n=100000", CAP),
        ("/streamed?chunks=3", 30_000),
        ("/streamed?chunks=10", CAP),
    ],
)
async def test_reads_whole_body_up_to_the_cap(base_url: str, path: str, length: int) -> None:
    async with aiohttp.ClientSession() as session, session.get(base_url + path) as resp:
        assert len(await read_capped(resp, CAP)) == length


@pytest.mark.parametrize("path", ["/sized?n=100001", "/streamed?chunks=11", "/streamed?chunks=500"])
async def test_refuses_bodies_over_the_cap(base_url: str, path: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(base_url + path) as resp:
        with pytest.raises(BodyTooLarge, match="cap"):
            await read_capped(resp, CAP)
