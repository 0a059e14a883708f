"""Replicas that break the network contract: silence, cut streams, bad framing, bad /metrics,
and DNS discovery that comes and goes.

The fake replicas are small raw asyncio or aiohttp servers on free 127.0.0.1 ports, so each
misbehaviour is exact and independent of the simulator.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from tests.chaos.conftest import (
    FIGURES,
    MODELS_BODY,
    Receptions,
    app_with_sources,
    fake_replica,
    is_openai_error,
    raw_server,
    read_request,
    recording_sim,
    router_config,
    rss_kib,
    serving,
)
from tests.support.router import RouterHandle, eventually, running_router
from tests.support.sim import SIM_MODEL
from vllm_fleet.router.discovery import DnsDiscovery
from vllm_fleet.router.state import ReplicaState

REQUEST = {"model": SIM_MODEL, "prompt": "hi", "max_tokens": 3}
STREAM = {**REQUEST, "stream": True}
OK_BODY = json.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": SIM_MODEL,
        "choices": [{"index": 0, "text": " ok", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()


async def post(
    router: RouterHandle, payload: dict[str, object], timeout_s: float = 30.0
) -> tuple[int, str, bytes]:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(f"{router.url}/v1/completions", json=payload) as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


def replica(router: RouterHandle, url: str) -> ReplicaState:
    return router.fleet.replicas[url]


# -- raw HTTP replicas ---------------------------------------------------------------------------

PostBehaviour = Callable[[asyncio.StreamWriter], Awaitable[None]]


def _reply(status: str, content_type: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


@asynccontextmanager
async def raw_replica(on_post: PostBehaviour) -> AsyncIterator[str]:
    """A replica healthy to the router's checks (one request per connection) whose answer to
    every POST is ``on_post``: the framing fault under test."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _ = await read_request(reader)
        if line.startswith("POST "):
            await on_post(writer)
            return
        if line.startswith("GET /v1/models"):
            writer.write(_reply("200 OK", "application/json", MODELS_BODY.encode()))
        elif line.startswith("GET /health"):
            writer.write(_reply("200 OK", "text/plain", b""))
        else:  # /metrics and anything else
            writer.write(_reply("404 Not Found", "text/plain", b""))
        await writer.drain()

    async with raw_server(handle) as port:
        yield f"http://127.0.0.1:{port}"


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: close\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def cut_mid_stream(writer: asyncio.StreamWriter) -> None:
    event = b'data: {"choices":[{"index":0,"text":" ok"}]}\n\n'
    writer.write(SSE_HEAD + chunk(event) + chunk(event))
    await writer.drain()
    writer.transport.abort()  # like a replica process that died


async def garbage_sse(writer: asyncio.StreamWriter) -> None:
    writer.write(SSE_HEAD + chunk(b"data: {not json\n\n\x00\xff\xfe junk\n") + b"0\r\n\r\n")
    await writer.drain()


async def truncated_json(writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
        b'{"id": "cmpl-1", "choices": [{"te'
    )
    await writer.drain()
    writer.transport.abort()


async def never_answers(writer: asyncio.StreamWriter) -> None:
    await asyncio.Event().wait()  # cancelled when the server closes


# -- silence ---------------------------------------------------------------------------------------


async def test_a_replica_that_never_answers_is_timed_out_failed_over_and_ejected() -> None:
    receptions = Receptions()
    async with (
        raw_replica(never_answers) as silent,
        recording_sim(receptions) as sim,
        running_router([silent, sim.url], first_byte_timeout_s=1.0, max_attempts=2) as router,
    ):
        results = await asyncio.gather(*(post(router, REQUEST) for _ in range(12)))
        assert [status for status, _, _ in results] == [200] * 12
        assert sum(receptions.answered.values()) == 12
        await eventually(lambda: replica(router, silent).ejections >= 1, 10.0, "an ejection")

    async with (
        raw_replica(never_answers) as silent,
        running_router([silent], first_byte_timeout_s=1.0) as router,
    ):
        status, _, body = await post(router, REQUEST)
        assert status == 504
        assert is_openai_error(body)
        assert json.loads(body)["error"]["code"] == "upstream_timeout"


async def test_a_server_that_accepts_and_says_nothing_never_joins() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads until the router gives up and closes

    async with raw_server(mute) as port:
        url = f"http://127.0.0.1:{port}"
        async with running_router([url], healthy=0, health_timeout_s=0.3) as router:
            started = asyncio.get_running_loop().time()
            status, _, body = await post(router, REQUEST)
            assert status == 503 and is_openai_error(body)
            assert asyncio.get_running_loop().time() - started < 5.0  # refused, not queued
            await eventually(lambda: replica(router, url).check_error != "", 10.0, "a failed check")
            # Checks of a silent replica never pile up: at most one in progress at a time.
            for _ in range(20):
                checks = [t for t in asyncio.all_tasks() if t.get_name() == f"health check {url}"]
                assert len(checks) <= 1
                await asyncio.sleep(0.05)
            assert not replica(router, url).healthy


# -- streams and bodies cut or malformed ---------------------------------------------------------


async def test_a_stream_cut_mid_way_ends_with_an_error_event() -> None:
    async with (
        raw_replica(cut_mid_stream) as cutting,
        running_router([cutting]) as router,
    ):
        for _ in range(3):
            status, content_type, body = await post(router, STREAM)
            assert status == 200 and content_type.startswith("text/event-stream")
            events = [e[6:] for e in body.split(b"\n\n") if e.startswith(b"data: ")]
            assert len(events) == 4, body  # two relayed events, the error, [DONE]
            assert is_openai_error(events[2]) and events[3] == b"[DONE]"
        assert replica(router, cutting).in_flight == 0
        cut = router.ctx.telemetry.registry.get_sample_value(
            "vllm_fleet_stream_errors_total", {"reason": "disconnect"}
        )
        assert cut == 3


async def test_broken_chunked_framing_mid_stream_ends_with_an_error_event() -> None:
    first_chunk_seen = asyncio.Event()

    async def broken_chunk_framing(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(b'data: {"choices":[]}\n\n'))
        await writer.drain()
        await first_chunk_seen.wait()  # the stream is committed: the client has a chunk
        writer.write(b"zz\r\nnot a chunk\r\n")
        await writer.drain()

    async with (
        raw_replica(broken_chunk_framing) as broken,
        running_router([broken], first_byte_timeout_s=1.0) as router,
        aiohttp.ClientSession() as session,
        session.post(f"{router.url}/v1/completions", json=STREAM) as resp,
    ):
        assert resp.status == 200
        assert await resp.content.readuntil(b"\n\n") == b'data: {"choices":[]}\n\n'
        first_chunk_seen.set()
        rest = await asyncio.wait_for(resp.read(), 30.0)  # the timer, not the parser, ends it
        events = [e[6:] for e in rest.split(b"\n\n") if e.startswith(b"data: ")]
        assert len(events) == 2 and is_openai_error(events[0]) and events[1] == b"[DONE]"
        await eventually(lambda: replica(router, broken).in_flight == 0, 5.0, "in_flight 0")


async def test_broken_chunked_framing_in_a_json_body_is_a_clear_error() -> None:
    async def broken_body(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b'{"id": "cmpl-1", ')
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # part of the fault: the bad framing comes in a later packet
        writer.write(b"zz\r\nnot a chunk\r\n")
        await writer.drain()
        await asyncio.Event().wait()

    async with (
        raw_replica(broken_body) as broken,
        running_router([broken], first_byte_timeout_s=1.0) as router,
    ):
        status, _, body = await post(router, REQUEST, timeout_s=30.0)
        assert status in (502, 504) and is_openai_error(body), (status, body)
        assert replica(router, broken).in_flight == 0


async def test_malformed_sse_is_relayed_verbatim_and_the_router_carries_on() -> None:
    """The router does not parse stream events (hot path); a replica's garbage reaches the
    client as sent, framed correctly, and costs the router nothing."""
    async with raw_replica(garbage_sse) as garbage, running_router([garbage]) as router:
        for _ in range(3):
            status, _, body = await post(router, STREAM)
            assert status == 200
            assert body == b"data: {not json\n\n\x00\xff\xfe junk\n"
        assert replica(router, garbage).in_flight == 0
        assert replica(router, garbage).healthy


async def test_a_truncated_json_body_fails_over_or_is_a_502() -> None:
    receptions = Receptions()
    async with (
        raw_replica(truncated_json) as truncating,
        recording_sim(receptions) as sim,
        running_router([truncating, sim.url], max_attempts=2) as router,
    ):
        results = await asyncio.gather(*(post(router, REQUEST) for _ in range(10)))
        for status, _, body in results:
            assert status == 200
            assert json.loads(body)["usage"]["completion_tokens"] == 3
    async with raw_replica(truncated_json) as truncating, running_router([truncating]) as router:
        status, _, body = await post(router, REQUEST)
        assert status == 502 and is_openai_error(body)
        assert json.loads(body)["error"]["code"] == "upstream_unavailable"


# -- /metrics that is garbage or huge ------------------------------------------------------------


async def _huge_metrics(request: web.Request) -> web.StreamResponse:
    """An endless /metrics (bounded here at 64 MiB): the router must stop reading early."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    line = b"vllm:num_requests_running 1\n" * (1 << 15)
    for _ in range(64 << 20 // len(line)):
        await response.write(line)
    await response.write_eof()
    return response


async def _garbage_metrics(request: web.Request) -> web.Response:
    return web.Response(body=bytes(range(256)) * 256, content_type="text/plain")


async def _completion(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=OK_BODY, content_type="application/json")


async def test_garbage_or_huge_metrics_cost_nothing_but_the_scrape() -> None:
    rss_before = rss_kib()
    async with (
        fake_replica(
            {"GET /metrics": _garbage_metrics, "POST /v1/completions": _completion}
        ) as garbage,
        fake_replica({"GET /metrics": _huge_metrics, "POST /v1/completions": _completion}) as huge,
        running_router([garbage, huge], scrape_interval_s=0.1) as router,
    ):

        def both_failed() -> bool:
            return all(replica(router, url).scrape_error for url in (garbage, huge))

        await eventually(both_failed, 20.0, "a failed scrape of each")
        for _ in range(3):  # a few more rounds of both
            results = await asyncio.gather(*(post(router, REQUEST) for _ in range(10)))
            assert [status for status, _, _ in results] == [200] * 10
        errors = {url: replica(router, url).scrape_error for url in (garbage, huge)}
        assert "not Prometheus text format" in errors[garbage] or "vllm" in errors[garbage]
        assert "cap" in errors[huge]
        assert all(replica(router, url).healthy for url in (garbage, huge))
        grown_mib = (rss_kib() - rss_before) / 1024
    assert grown_mib < 64, f"RSS grew {grown_mib:.0f} MiB while scraping a 64 MiB /metrics"
    FIGURES["bad_metrics"] = {"scrape_errors": errors, "rss_growth_mib": round(grown_mib, 1)}


# -- DNS discovery ---------------------------------------------------------------------------------


async def test_dns_discovery_from_nothing_to_several_addresses_and_back() -> None:
    answer: list[str] | OSError = []
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        if isinstance(answer, OSError):
            raise answer
        return list(answer)

    receptions = Receptions()
    async with recording_sim(receptions, host="127.0.0.1") as first:
        port = first.port
        async with (
            recording_sim(receptions, host="127.0.0.2", port=port) as second,
            recording_sim(receptions, host="127.0.0.3", port=port) as third,
        ):
            sims = [first, second, third]
            config = router_config(discover_dns=("fleet.test", port), discovery_interval_s=0.1)
            source = DnsDiscovery("fleet.test", port, resolver=resolver)
            async with serving(app_with_sources(config, [source]), config) as router:
                # Nothing resolves: no replica, a clear 503.
                status, _, body = await post(router, REQUEST)
                assert status == 503 and is_openai_error(body)
                assert not router.fleet.replicas

                answer = ["127.0.0.3", "127.0.0.1", "127.0.0.2"]
                await router.wait_healthy(3)
                assert sorted(router.fleet.replicas) == sorted(s.url for s in sims)
                results = await asyncio.gather(*(post(router, REQUEST) for _ in range(30)))
                assert [r[0] for r in results] == [200] * 30

                # A resolver failure or an empty answer keeps the last good list.
                blips: list[list[str] | OSError] = [socket.gaierror(socket.EAI_AGAIN, "again"), []]
                for blip in blips:
                    answer = blip
                    seen = len(lookups)

                    def looked_up_again(seen: int = seen) -> bool:
                        return len(lookups) > seen + 2

                    await eventually(looked_up_again, 10.0, "lookups")
                    assert len(router.fleet.healthy()) == 3
                    assert (await post(router, REQUEST))[0] == 200

                answer = ["127.0.0.2"]
                await eventually(lambda: len(router.fleet.replicas) == 1, 10.0, "one replica")
                before = [s.stats().received for s in sims]
                results = await asyncio.gather(*(post(router, REQUEST) for _ in range(10)))
                assert [r[0] for r in results] == [200] * 10
                after = [s.stats().received for s in sims]
    assert [b - a for a, b in zip(before, after, strict=True)] == [0, 10, 0]
    assert all(s.stats().finished > 0 for s in sims)  # all three served in the middle phase
