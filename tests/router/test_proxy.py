"""The proxy against simulated vLLM replicas, driven by the official OpenAI client."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.support.router import RouterHandle, eventually, running_recorder, running_router
from tests.support.sim import SIM_MODEL, SimHandle, running_sim, running_sims
from vllm_fleet.router.state import Breaker

pytestmark = pytest.mark.timeout(60)


async def test_completions_chat_and_embeddings_through_the_router(router: RouterHandle) -> None:
    async with router.openai() as client:
        completion = await client.completions.create(model=SIM_MODEL, prompt="hi", max_tokens=4)
        assert completion.usage is not None and completion.usage.completion_tokens == 4
        chat = await client.chat.completions.create(
            model=SIM_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.choices[0].message.content
        stream = await client.chat.completions.create(
            model=SIM_MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        assert len([p for p in pieces if p]) == 5
        embedding = await client.embeddings.create(model=SIM_MODEL, input=["a", "b"])
        assert len(embedding.data) == 2
        models = await client.models.list()
        assert [m.id for m in models.data] == [SIM_MODEL]
    assert sum(router.served().values()) == 4
    assert all(r.in_flight == 0 for r in router.fleet.replicas.values())


async def test_equal_replicas_share_the_traffic(router: RouterHandle) -> None:
    async with router.openai() as client:
        await asyncio.gather(
            *(
                client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=20)
                for _ in range(20)
            )
        )
    served = list(router.served().values())
    assert sum(served) == 20
    assert min(served) >= 5, served


async def test_least_busy_sends_more_to_the_faster_replica() -> None:
    async with (
        running_sims(2) as (slow, fast),
        running_router([slow.url, fast.url], policy="least-busy") as router,
    ):
        await slow.control(speed=0.1)
        remaining = 24

        async def worker(client: openai.AsyncOpenAI) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=10)

        async with router.openai() as client:
            await asyncio.gather(*(worker(client) for _ in range(4)))
        served = router.served()
        assert served[slow.url] + served[fast.url] == 24
        # Round-robin would split 12/12; least-busy keeps the slow replica's share small.
        assert served[fast.url] >= 3 * served[slow.url], served


async def test_stopped_replica_costs_no_client_errors(
    sims: list[SimHandle], router: RouterHandle
) -> None:
    dead, alive = sims
    await dead.stop()
    async with router.openai() as client:
        for _ in range(10):
            result = await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=2)
            assert result.choices
    assert router.fleet.replicas[dead.url].healthy is False
    assert alive.stats().finished == 10


async def test_failing_replica_is_retried_elsewhere_and_ejected() -> None:
    async with (
        running_sims(2) as (bad, good),
        running_router([bad.url, good.url], policy="round-robin") as router,
    ):
        await bad.control(fail_rate=1.0)
        async with router.openai() as client:
            for _ in range(8):
                await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=2)
        assert good.stats().finished == 8
        assert bad.stats().failed >= 1
        replica = router.fleet.replicas[bad.url]
        assert replica.breaker is not Breaker.CLOSED or replica.ejections >= 1
        assert router.ctx.telemetry.retries.labels("status")._value.get() >= 1


async def test_hung_replica_is_bypassed_by_the_first_byte_timeout() -> None:
    async with (
        running_sims(2) as (hung, ok),
        running_router(
            [hung.url, ok.url],
            policy="round-robin",
            first_byte_timeout_s=0.3,
            health_timeout_s=5.0,
            health_interval_s=5.0,
        ) as router,
    ):
        await hung.control(hang=True)
        started = time.monotonic()
        async with router.openai() as client:
            results = await asyncio.gather(
                *(
                    client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=2)
                    for _ in range(4)
                )
            )
        assert all(r.choices for r in results)
        assert time.monotonic() - started < 3.0
        assert router.ctx.telemetry.retries.labels("timeout")._value.get() >= 1
        assert ok.stats().finished == 4
        await hung.control(hang=False)


async def test_all_replicas_failing_passes_the_last_5xx_through() -> None:
    async with running_sims(2) as handles, running_router([h.url for h in handles]) as router:
        for h in handles:
            await h.control(fail_rate=1.0)
        async with router.openai() as client:
            with pytest.raises(openai.InternalServerError) as info:
                await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=2)
        assert "Simulated internal server error" in str(info.value)
        assert sum(h.stats().failed for h in handles) == 2  # one attempt on each, no more


async def test_client_errors_from_a_replica_are_not_retried() -> None:
    async with running_recorder() as first, running_recorder() as second:
        for rec in (first, second):
            rec.status = 422
            rec.body = b'{"error": {"message": "bad temperature"}}'
        async with running_router([first.url, second.url]) as router, router.openai() as client:
            with pytest.raises(openai.UnprocessableEntityError):
                await client.completions.create(model="rec-model", prompt="x")
        assert len(first.requests) + len(second.requests) == 1


async def test_replica_dying_mid_stream_ends_the_stream_with_an_error_event(
    sims: list[SimHandle], router: RouterHandle
) -> None:
    async with router.openai() as client:
        # A seeded sample cannot be continued exactly elsewhere (vllm_fleet.router.continuation):
        # the stream ends with the error event, as every cut stream does with continuation off.
        stream = await client.completions.create(
            model=SIM_MODEL, prompt="x", max_tokens=400, stream=True, seed=7
        )
        iterator = stream.__aiter__()
        await iterator.__anext__()
        victim = next(s for s in sims if s.running == 1)
        survivor = next(s for s in sims if s is not victim)
        await victim.stop()
        with pytest.raises(openai.APIError, match="mid-stream"):
            async with asyncio.timeout(5):
                async for _ in iterator:
                    pass
    assert survivor.stats().received == 0  # the request was not sent again
    assert router.ctx.telemetry.stream_errors.labels("disconnect")._value.get() == 1
    await eventually(lambda: router.fleet.replicas[victim.url].in_flight == 0, what="released")


async def test_first_stream_chunk_arrives_before_the_replica_finishes() -> None:
    async with running_sim(step_ms=40.0) as sim, running_router([sim.url]) as router:
        async with router.openai() as client:
            stream = await client.completions.create(
                model=SIM_MODEL, prompt="x", max_tokens=25, stream=True
            )
            chunks = stream.__aiter__()
            await chunks.__anext__()
            assert sim.stats().finished == 0
            assert sim.running == 1
            rest = [c async for c in chunks]
        assert len(rest) == 24
        assert sim.stats().finished == 1


async def test_client_disconnect_aborts_the_upstream_stream() -> None:
    async with running_sim(step_ms=20.0) as sim, running_router([sim.url]) as router:
        async with router.openai() as client:
            stream = await client.completions.create(
                model=SIM_MODEL, prompt="x", max_tokens=1000, stream=True
            )
            await stream.__aiter__().__anext__()
            await stream.close()
        await eventually(lambda: sim.stats().aborted == 1, 3.0, "upstream abort")
        await eventually(
            lambda: router.fleet.replicas[sim.url].in_flight == 0, 3.0, "in_flight released"
        )
        assert sim.stats().finished == 0


async def test_client_timeout_aborts_a_non_streaming_request() -> None:
    async with running_sim(step_ms=20.0) as sim, running_router([sim.url]) as router:
        async with router.openai(timeout=0.3) as client:
            with pytest.raises(openai.APITimeoutError):
                await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1000)
        await eventually(lambda: sim.stats().aborted == 1, 3.0, "upstream abort")
        assert router.fleet.replicas[sim.url].in_flight == 0


async def test_requests_route_by_model() -> None:
    async with running_sim(model="alpha") as a, running_sim(model="beta") as b:
        async with running_router([a.url, b.url]) as router, router.openai() as client:
            for _ in range(3):
                await client.completions.create(model="beta", prompt="x", max_tokens=1)
            listed = await client.models.list()
        assert sorted(m.id for m in listed.data) == ["alpha", "beta"]
        assert b.stats().finished == 3
        assert a.stats().received == 0


async def test_failover_tries_each_replica_at_most_once_up_to_max_attempts() -> None:
    async with running_sims(3) as handles:
        bad1, bad2, good = handles
        for h in (bad1, bad2):
            await h.control(fail_rate=1.0)
        urls = [h.url for h in handles]
        async with running_router(urls, max_attempts=3) as router, router.openai() as client:
            answers = await asyncio.gather(
                *(
                    client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
                    for _ in range(12)
                ),
                return_exceptions=True,
            )
        # A 500 is the request's problem until proven otherwise: it goes to another replica,
        # and comes back to the client once two different replicas failed it. So every
        # request either reached the good replica or failed on both bad ones, never more.
        refused = [a for a in answers if isinstance(a, openai.InternalServerError)]
        assert len(refused) + good.stats().finished == 12, answers
        bad_answers = bad1.stats().failed + bad2.stats().failed
        # good; bad then good; bad then the other bad (refused): one or two attempts each.
        assert 2 * len(refused) <= bad_answers <= 2 * len(refused) + good.stats().finished
        async with running_router(urls, max_attempts=1, failure_threshold=100) as router:
            async with router.openai() as client:
                outcomes = await asyncio.gather(
                    *(
                        client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
                        for _ in range(12)
                    ),
                    return_exceptions=True,
                )
            failed = [o for o in outcomes if isinstance(o, openai.InternalServerError)]
            assert failed  # without failover, requests sent to a failing replica fail
            assert len(failed) + good.stats().finished - (12 - len(refused)) == 12
            assert router.ctx.telemetry.retries.labels("status")._value.get() == 0


async def test_a_refused_connection_does_not_spend_an_attempt() -> None:
    """A replica that just died refuses the connection: the request reached nobody, so the
    attempts it would have spent go to the replica that answers (here one failing every
    request: it gets all --max-attempts of them whatever the pick's order)."""
    # No health check between the death and the request: the router still counts the dead
    # replica as up, as it does in the second after a crash.
    async with (
        running_sims(2) as (failing, dying),
        running_router([failing.url, dying.url], max_attempts=3, health_interval_s=60.0) as router,
    ):
        await failing.control(fail_rate=1.0)
        await dying.stop()
        async with router.openai() as client:
            with pytest.raises(openai.InternalServerError):
                await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
        retries = router.ctx.telemetry.retries
        assert retries.labels("connect")._value.get() >= 1  # the dead replica was tried
        assert failing.stats().failed == 3


async def test_stream_headers_reach_the_client_before_any_chunk() -> None:
    """The upstream sends its SSE headers, then holds the body: the client sees 200 already."""
    release = asyncio.Event()

    async def held_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await release.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "held"}]})

    upstream = web.Application()
    upstream.router.add_get("/health", health)
    upstream.router.add_get("/v1/models", models)
    upstream.router.add_post("/v1/completions", held_stream)
    runner = web.AppRunner(upstream)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with (
            running_router([url]) as router,
            aiohttp.ClientSession() as session,
            asyncio.timeout(5),
            session.post(
                f"{router.url}/v1/completions", json={"model": "held", "stream": True}
            ) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            release.set()
            assert await resp.read() == b"data: [DONE]\n\n"
    finally:
        release.set()
        await runner.cleanup()
