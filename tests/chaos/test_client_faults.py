"""Clients that misbehave: vanish mid-stream, trickle their bodies, or park idle connections.

A client that goes away must stop generation upstream (the simulator counts the abort); a slow
body is bounded by --body-timeout; hundreds of idle connections do not starve real requests.
"""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp

from tests.chaos.conftest import (
    FIGURES,
    Receptions,
    is_openai_error,
    recording_sim,
    router_config,
    serving,
)
from tests.support.router import eventually, running_router
from tests.support.sim import SIM_MODEL
from vllm_fleet.router.app import make_app

SEED = 7


def completion(max_tokens: int, *, stream: bool) -> dict[str, object]:
    return {"model": SIM_MODEL, "prompt": "hi", "max_tokens": max_tokens, "stream": stream}


async def test_vanishing_clients_abort_their_generations_upstream() -> None:
    rng = random.Random(SEED)
    streams, waits = 30, 10
    receptions = Receptions()
    async with (
        recording_sim(receptions, step_ms=5.0, max_num_seqs=64) as sim,
        running_router([sim.url]) as router,
        aiohttp.ClientSession() as session,
    ):

        async def leave_mid_stream(i: int) -> int:
            body = completion(2000, stream=True)
            async with session.post(f"{router.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                for _ in range(rng.randint(1, 5)):
                    assert await resp.content.readany()
                resp.close()  # the connection is dropped, not returned to the pool
            return i

        async def give_up_waiting(i: int) -> int:
            body = completion(2000, stream=False)
            timeout = aiohttp.ClientTimeout(total=0.3 + rng.random())
            try:
                async with session.post(
                    f"{router.url}/v1/completions", json=body, timeout=timeout
                ) as resp:
                    raise AssertionError(f"answered {resp.status} after 2000 tokens?")
            except asyncio.TimeoutError:
                return i

        await asyncio.gather(
            *(leave_mid_stream(i) for i in range(streams)),
            *(give_up_waiting(i) for i in range(waits)),
        )

        total = streams + waits
        await eventually(lambda: sim.stats().aborted == total, 20.0, f"{total} aborts upstream")
        await eventually(lambda: not sim.running and not sim.waiting, 10.0, "an idle engine")
        await eventually(
            lambda: all(r.in_flight == 0 for r in router.fleet.replicas.values()),
            10.0,
            "nothing in flight at the router",
        )
        stats = sim.stats()
        registry = router.ctx.telemetry.registry
        disconnects = registry.get_sample_value("vllm_fleet_client_disconnects_total")
        assert stats.finished == 0
        assert stats.received == total
        assert disconnects == total
        FIGURES["client_disconnects"] = {
            "mid_stream": streams,
            "before_headers": waits,
            "aborted_upstream": stats.aborted,
            "router_client_disconnects": int(disconnects),
        }


async def _read_response(reader: asyncio.StreamReader, deadline_s: float) -> bytes:
    """Read until the router closes the connection; b"" if it stays open past the deadline.

    Reads chunk by chunk: the router answers and closes while the client is still sending, so
    the kernel may reset the connection right after the answer arrives, and a single
    ``read()`` to EOF would drop the answer it had already received.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    received: list[bytes] = []
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), deadline - loop.time()):
            received.append(chunk)
    except asyncio.TimeoutError:
        return b""
    except ConnectionResetError:
        pass  # closed on us after answering: what arrived before the reset is the answer
    return b"".join(received)


async def test_a_trickled_body_is_cut_by_the_body_timeout() -> None:
    receptions = Receptions()
    async with (
        recording_sim(receptions) as sim,
        running_router([sim.url], body_timeout_s=1.0) as router,
    ):
        port = int(router.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: router\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )

        async def trickle() -> None:
            for _ in range(200):  # bounded: 200 bytes over at most ~20 s
                await asyncio.sleep(0.1)
                if writer.is_closing():
                    return
                writer.write(b" ")
                await writer.drain()

        trickler = asyncio.create_task(trickle())
        try:
            answer = await _read_response(reader, 20.0)
            async with aiohttp.ClientSession() as session:
                ok = await session.post(
                    f"{router.url}/v1/completions", json=completion(2, stream=False)
                )
                assert ok.status == 200  # the router kept serving everyone else
        finally:
            trickler.cancel()
            await asyncio.gather(trickler, return_exceptions=True)
            writer.close()

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert is_openai_error(body), body
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert sum(receptions.received.values()) == 1  # only the well-behaved request got through


async def test_hundreds_of_idle_connections_do_not_starve_real_requests() -> None:
    idle_count, real_count = 500, 50
    receptions = Receptions()
    async with (
        recording_sim(receptions, max_num_seqs=64) as sim,
        running_router([sim.url]) as router,
    ):
        port = int(router.url.rsplit(":", 1)[1])
        server = router.runner.server
        assert server is not None
        idle: list[asyncio.StreamWriter] = []
        try:
            for i in range(idle_count):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                if i % 5 == 0:  # some send half a request line and then nothing
                    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x")
                idle.append(writer)
            await eventually(
                lambda: len(server.connections) >= idle_count, 20.0, "idle connections accepted"
            )
            async with aiohttp.ClientSession() as session:

                async def real(i: int) -> int:
                    body = completion(4, stream=i % 2 == 0)
                    async with session.post(f"{router.url}/v1/completions", json=body) as resp:
                        await resp.read()
                        return resp.status

                statuses = await asyncio.gather(*(real(i) for i in range(real_count)))
            assert statuses == [200] * real_count
            assert sim.stats().finished == real_count
        finally:
            for writer in idle:
                writer.close()
        await eventually(lambda: not server.connections, 20.0, "idle connections released")
    FIGURES["idle_connections"] = {"idle": idle_count, "real_requests_ok": real_count}


async def test_idle_and_half_sent_requests_are_closed_by_the_keepalive_timer() -> None:
    """aiohttp closes a connection that has not completed a request within its keep-alive
    timeout (75 s under ``vllm-fleet router``; 1 s here), whether idle or trickling headers."""
    receptions = Receptions()
    async with recording_sim(receptions) as sim:
        config = router_config(backends=(sim.url,))
        async with serving(make_app(config), config, keepalive_timeout=1.0) as router:
            port = int(router.url.rsplit(":", 1)[1])
            idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
            slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", port)
            slow_writer.write(b"POST /v1/completions HTTP/1.1\r\nHo")
            try:
                assert await _read_response(idle_reader, 15.0) == b""  # closed, no answer
                assert idle_reader.at_eof()
                assert await _read_response(slow_reader, 15.0) == b""
                assert slow_reader.at_eof()
            finally:
                idle_writer.close()
                slow_writer.close()
    assert not receptions.received
