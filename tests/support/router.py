"""A router for tests, built with make_app and served like production, plus small helpers.

    async with running_sims(2) as sims, running_router([s.url for s in sims]) as router:
        async with router.openai() as client:
            await client.completions.create(model=SIM_MODEL, prompt="hi", max_tokens=4)
        assert sum(r.served for r in router.fleet.replicas.values()) == 1

``running_router`` waits until the wanted number of replicas is healthy, and always stops the
server. ``running_recorder`` is a fake upstream that records what the router sent it, for tests
about headers and paths (the simulator does not echo them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from openai import AsyncOpenAI

from vllm_fleet.router.app import make_app
from vllm_fleet.router.config import RouterConfig
from vllm_fleet.router.context import ROUTER, RouterContext
from vllm_fleet.router.protocol_errors import RouterRunner
from vllm_fleet.router.serve import server_options
from vllm_fleet.router.state import Fleet

#: Test timings: checks every 100 ms so replicas join and leave within a fraction of a second.
FAST: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "health_interval_s": 0.1,
    "health_timeout_s": 1.0,
    "scrape_interval_s": 0.2,
    "discovery_interval_s": 0.5,
    "connect_timeout_s": 1.0,
    "shutdown_grace_s": 2.0,
}
#: The router's own defaults for every timing FAST shortens: tests of failure handling run
#: with these, so a default that fails users cannot hide behind a shortened timeout.
DEFAULT_TIMINGS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(RouterConfig)
    if f.name in FAST and f.name not in ("host", "port")
}
READY_DEADLINE_S = 10.0


async def eventually(
    predicate: Callable[[], bool], deadline_s: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` every 20 ms until true; AssertionError after ``deadline_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {deadline_s}s")
        await asyncio.sleep(0.02)


@dataclass
class RouterHandle:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def ctx(self) -> RouterContext:
        return self.app[ROUTER]

    @property
    def fleet(self) -> Fleet:
        return self.ctx.fleet

    def openai(self, api_key: str = "sk-test", **kwargs: Any) -> AsyncOpenAI:
        """An official OpenAI client pointed at the router (no client-side retries)."""
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def served(self) -> dict[str, int]:
        return {url: r.served for url, r in self.fleet.replicas.items()}

    async def wait_healthy(self, count: int, deadline_s: float = READY_DEADLINE_S) -> None:
        await eventually(
            lambda: len(self.fleet.healthy()) == count, deadline_s, f"{count} healthy replicas"
        )


@asynccontextmanager
async def running_router(
    backends: Sequence[str], *, healthy: int | None = None, **overrides: Any
) -> AsyncIterator[RouterHandle]:
    """A router over ``backends`` on a free port; yielded once ``healthy`` replicas are up
    (default: all of them). ``overrides`` are RouterConfig fields."""
    config = RouterConfig(backends=tuple(backends), **{**FAST, **overrides})
    app = make_app(config)
    runner = RouterRunner(app, **server_options(config))
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = runner.addresses[0][1]
        handle = RouterHandle(f"http://127.0.0.1:{port}", app, runner)
        await handle.wait_healthy(len(backends) if healthy is None else healthy)
        yield handle
    finally:
        await runner.cleanup()


@dataclass
class Recorded:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    """A fake replica: serves /health and /v1/models, records and answers every POST /v1/*."""

    url: str = ""
    model: str = "rec-model"
    requests: list[Recorded] = field(default_factory=list)
    #: Headers of every GET /v1/models (the router's health checks).
    model_list_headers: list[dict[str, str]] = field(default_factory=list)
    #: What POST /v1/* answers: status, body, extra headers.
    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


@asynccontextmanager
async def running_recorder(model: str = "rec-model") -> AsyncIterator[Recorder]:
    recorder = Recorder(model=model)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        recorder.model_list_headers.append(dict(request.headers))
        return web.json_response({"object": "list", "data": [{"id": recorder.model}]})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def record(request: web.Request) -> web.Response:
        recorder.requests.append(
            Recorded(request.method, request.path_qs, dict(request.headers), await request.read())
        )
        return web.Response(status=recorder.status, body=recorder.body, headers=recorder.headers)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        recorder.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield recorder
    finally:
        await runner.cleanup()


async def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, json.loads(await resp.read())


async def post_raw(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    """POST bytes as-is; returns (status, headers (case-insensitive), body)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as resp,
    ):
        return resp.status, CIMultiDict(resp.headers), await resp.read()
