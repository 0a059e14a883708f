"""Requests aiohttp answers before the app runs still get an OpenAI-style JSON error."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import pytest

from tests.router.test_app import assert_openai_error
from tests.support.router import RouterHandle
from tests.support.sim import SIM_MODEL

pytestmark = pytest.mark.timeout(30)


async def raw_exchange(
    router: RouterHandle, head: bytes, body: bytes = b"", *, wait_continue: bool = False
) -> tuple[int, dict[str, str], bytes, bytes]:
    """Send raw bytes; (status, headers, body, interim) of the answer, read to EOF."""
    port = urlsplit(router.url).port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    interim = b""
    try:
        writer.write(head)
        await writer.drain()
        if wait_continue:
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        writer.write(body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10.0)
    finally:
        writer.close()
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, payload, interim


@pytest.mark.parametrize(
    "head",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["not-http", "space-in-header-name", "nul-in-value", "length-and-chunked"],
)
async def test_bytes_that_are_not_http_get_a_json_400(router: RouterHandle, head: bytes) -> None:
    status, headers, body, _ = await raw_exchange(router, head)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    error = assert_openai_error(body)
    assert error["code"] == "bad_request"
    assert "GARBAGE" not in error["message"]  # the request is never echoed


@pytest.mark.parametrize("path", ["/v1/completions", "/no/such/path"])
async def test_an_unknown_expect_gets_a_json_417(router: RouterHandle, path: str) -> None:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        "Expect: teapot\r\nContent-Length: 2\r\n\r\n"
    )
    status, headers, body, _ = await raw_exchange(router, head.encode(), b"{}")
    assert status == 417
    assert headers["content-type"].startswith("application/json")
    assert "100-continue" in assert_openai_error(body)["message"]


async def test_expect_100_continue_still_works(router: RouterHandle) -> None:
    payload = json.dumps({"model": SIM_MODEL, "prompt": "x", "max_tokens": 2}).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        "Content-Type: application/json\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    status, _, body, interim = await raw_exchange(
        router, head.encode(), payload, wait_continue=True
    )
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert status == 200
    assert json.loads(body)["usage"]["completion_tokens"] == 2
