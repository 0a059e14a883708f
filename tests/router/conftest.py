"""Fixtures: simulators on free ports and a router over them, built with make_app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.router import RouterHandle, running_router
from tests.support.sim import SimHandle, running_sims
from vllm_fleet.router.app import upstream_client
from vllm_fleet.router.config import RouterConfig
from vllm_fleet.router.upstream_client import UpstreamClient


@pytest.fixture
async def sims() -> AsyncIterator[list[SimHandle]]:
    """Two fast simulators serving SIM_MODEL."""
    async with running_sims(2) as handles:
        yield handles


@pytest.fixture
async def router(sims: list[SimHandle]) -> AsyncIterator[RouterHandle]:
    """A router over the two simulators, both healthy."""
    async with running_router([s.url for s in sims]) as handle:
        yield handle


class FakeReplica(Protocol):
    """A hand-written stand-in for one vLLM endpoint; ``release`` frees requests it holds."""

    release: asyncio.Event

    def app(self) -> web.Application: ...


ServeFake = Callable[[FakeReplica], Awaitable[str]]


@pytest.fixture
async def serve_fake() -> AsyncIterator[ServeFake]:
    """Serve fakes on free ports (returns the base URL); all released and closed at the end."""
    servers: list[tuple[FakeReplica, TestServer]] = []

    async def serve(fake: FakeReplica) -> str:
        server = TestServer(fake.app(), host="127.0.0.1")
        await server.start_server()
        servers.append((fake, server))
        return str(server.make_url("")).rstrip("/")

    yield serve
    for fake, server in servers:
        fake.release.set()
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    """The router's client for replicas, with the router's defaults (router.app)."""
    c = upstream_client(RouterConfig(backends=("http://unused:1",)))
    yield c
    await c.close()
