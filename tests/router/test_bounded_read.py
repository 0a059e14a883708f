"""Size-capped body reads, with and without Content-Length; a replica's small JSON answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from vllm_fleet.router.bounded_read import BodyTooLarge, fetch_json, read_capped

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


async def answer(request: web.Request) -> web.StreamResponse:
    """What a replica might say to GET /v1/models or /kv_event_sources."""
    kind = request.query["kind"]
    if kind == "redirect":
        raise web.HTTPFound("/answer?kind=json")
    if kind == "slow":
        await asyncio.sleep(5)
    status = 500 if kind == "error" else 200
    body = b"not json" if kind == "text" else b'{"data": [1, 2]}'
    return web.Response(status=status, body=body, content_type="application/json")


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/sized", sized)
    app.router.add_get("/streamed", streamed)
    app.router.add_get("/answer", answer)
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


async def test_fetch_json_decodes_a_replicas_answer(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        assert await fetch_json(session, f"{base_url}/answer?kind=json", 2.0, CAP) == {
            "data": [1, 2]
        }


@pytest.mark.parametrize("kind", ["error", "text", "redirect", "slow"])
async def test_fetch_json_is_none_when_the_replica_cannot_say(base_url: str, kind: str) -> None:
    async with aiohttp.ClientSession() as session:
        assert await fetch_json(session, f"{base_url}/answer?kind={kind}", 0.5, CAP) is None


async def test_fetch_json_is_none_over_the_cap_and_when_nobody_listens(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        assert await fetch_json(session, f"{base_url}/answer?kind=json", 2.0, 10) is None
        assert await fetch_json(session, "http://127.0.0.1:1/v1/models", 2.0, CAP) is None
