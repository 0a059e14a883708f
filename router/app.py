"""The router's aiohttp application: routes, middlewares, the upstream session, the loops.

make_app is the one place that wires the pieces together; tests build their router with it
too, so what they exercise is what production runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from vllm_fleet.router.auth import make_auth_middleware
from vllm_fleet.router.balancer import make_policy
from vllm_fleet.router.config import RouterConfig
from vllm_fleet.router.context import ROUTER, RouterContext
from vllm_fleet.router.discovery import (
    Discovery,
    DnsDiscovery,
    FileDiscovery,
    StaticDiscovery,
    discovery_loop,
    refresh_once,
)
from vllm_fleet.router.endpoints import (
    fleet_peers,
    fleet_replicas,
    get_model,
    health,
    list_models,
    metrics,
    peer_socket,
    ready,
)
from vllm_fleet.router.health import BreakerPolicy, health_loop
from vllm_fleet.router.kv_events import kv_events_loop, parse_kv_events_spec
from vllm_fleet.router.lora import fleet_lora
from vllm_fleet.router.middleware import make_outer_middleware
from vllm_fleet.router.peers import PEER_PATH, PeerLink, close_sockets, peer_loop
from vllm_fleet.router.precise import ModelCard
from vllm_fleet.router.priority import BatchAware, BatchGate
from vllm_fleet.router.progress import progress_loop
from vllm_fleet.router.prompt_tokens import PromptTokenizers
from vllm_fleet.router.proxy import proxy_handler
from vllm_fleet.router.scrape import scrape_loop
from vllm_fleet.router.state import Fleet
from vllm_fleet.router.telemetry import Telemetry
from vllm_fleet.router.upstream_client import UpstreamClient
from vllm_fleet.router.worker import (
    SIBLING_HOST,
    WORKER,
    WorkerLink,
    fleet_workers,
    merged_registry,
)

log = logging.getLogger("vllm_fleet.router")

#: Idle upstream connections are dropped before this many seconds. Below uvicorn's (and so
#: vLLM's) 5 s keep-alive, so we never reuse a connection the replica is closing right then,
#: which would fail a request on a healthy replica.
UPSTREAM_KEEPALIVE_S = 4.0

SOURCES: web.AppKey[list[Discovery]] = web.AppKey("discovery_sources", list)


def discovery_sources(config: RouterConfig) -> list[Discovery]:
    sources: list[Discovery] = []
    if config.backends:
        sources.append(StaticDiscovery(config.backends))
    if config.backends_file:
        sources.append(FileDiscovery(config.backends_file))
    if config.discover_dns:
        name, port = config.discover_dns
        sources.append(DnsDiscovery(name, port))
    return sources


def peer_link(config: RouterConfig, worker: WorkerLink | None) -> PeerLink | None:
    """The peer exchange for --peer / --discover-peers-dns (None without either, and not a
    worker of several). It sends the key the peers' /fleet/* takes: routers of one fleet
    share their admin (or client) keys. A worker of --workers N is also its siblings' peer on
    a loopback port each, and shares prefixes only (vllm_fleet.router.peers says why)."""
    siblings = tuple(
        f"http://{SIBLING_HOST}:{port}" for port in (worker.sibling_ports if worker else ())
    )
    if not (config.peers or config.discover_peers_dns or siblings):
        return None
    sources: list[Discovery] = []
    if config.discover_peers_dns:
        name, port = config.discover_peers_dns
        sources.append(DnsDiscovery(name, port))
    keys = config.admin_api_keys or config.api_keys
    return PeerLink(
        static=(*config.peers, *siblings),
        sources=sources,
        auth_key=keys[0] if keys else None,
        share_counts=worker is None,
        siblings=frozenset(siblings),
        sibling_port=worker.sibling_port if worker else None,
    )


def upstream_session(config: RouterConfig) -> aiohttp.ClientSession:
    """One pooled session for the rare upstream calls (KV event source discovery, LoRA loads);
    proxied requests, health checks and scrapes go through upstream_client.

    No connection limit: vLLM batches hundreds of concurrent requests and queues the rest
    itself. No decompression: bodies are relayed as bytes, and no Accept-Encoding is sent, so
    replicas answer uncompressed. The upstream key is a session default header so health
    checks and scrapes carry it too (vLLM's --api-key also guards /v1/models). No cookie
    jar: the session is shared by every client, so a cookie a replica set for one client
    would otherwise be replayed on everybody's requests; cookies pass through as headers.
    Every call on it passes ``allow_redirects=False`` (aiohttp has no session-wide switch): a
    replica's answer and health are its own, never another server's.
    """
    headers = {"Authorization": f"Bearer {key}"} if (key := config.upstream_api_key) else None
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=config.connect_timeout_s,
        sock_read=config.first_byte_timeout_s,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Accept-Encoding",),
        headers=headers,
    )


def upstream_client(config: RouterConfig) -> UpstreamClient:
    """The client for replicas (router.upstream_client): proxied requests, health checks and
    scrapes; the connect timeout, --first-byte-timeout for an answer's head, one keep-alive."""
    return UpstreamClient(
        connect_timeout_s=config.connect_timeout_s,
        head_timeout_s=config.first_byte_timeout_s,
        keepalive_s=UPSTREAM_KEEPALIVE_S,
        api_key=config.upstream_api_key,
    )


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    ctx = app[ROUTER]
    ctx._session = upstream_session(ctx.config)
    ctx._client = upstream_client(ctx.config)
    yield
    await ctx.client.close()
    await ctx.session.close()
    ctx._session = None


def watch_fleet(
    fleet: Fleet,
    client: UpstreamClient,
    sources: list[Discovery],
    config: RouterConfig,
    breaker: BreakerPolicy,
) -> list[asyncio.Task[None]]:
    """Discovery, health checks and scrapes: what learns about the replicas, run once per
    router (by the supervisor with --workers N, vllm_fleet.router.workers)."""
    return [
        asyncio.create_task(
            discovery_loop(fleet, sources, interval_s=config.discovery_interval_s),
            name="discovery",
        ),
        asyncio.create_task(
            health_loop(
                fleet,
                client,
                interval_s=config.health_interval_s,
                timeout_s=config.health_timeout_s,
                breaker=breaker,
            ),
            name="health",
        ),
        asyncio.create_task(
            scrape_loop(
                fleet,
                client,
                interval_s=config.scrape_interval_s,
                timeout_s=config.health_timeout_s,
                prefix_memory_bytes=config.prefix_index_mb << 20,
            ),
            name="scrape",
        ),
    ]


async def _loops_ctx(app: web.Application) -> AsyncIterator[None]:
    """Discovery, health checks and scrapes (or, in a worker, reading the supervisor's), and
    the progress monitor run for the app's lifetime."""
    ctx = app[ROUTER]
    config = ctx.config
    sources = app[SOURCES]
    link = app.get(WORKER)
    if link is None:
        await refresh_once(ctx.fleet, sources)
        tasks = watch_fleet(ctx.fleet, ctx.client, sources, config, ctx.breaker)
    else:
        link.sync(ctx.fleet, ctx.breaker)
        tasks = [asyncio.create_task(link.sync_loop(ctx.fleet, ctx.breaker), name="board")]
    tasks.append(
        asyncio.create_task(progress_loop(ctx.fleet, ctx.breaker, ctx.telemetry), name="progress")
    )
    if ctx.peers is not None:
        peers = peer_loop(ctx.peers, ctx.fleet)
        tasks.append(asyncio.create_task(peers, name="peers"))
    if config.kv_events:
        spec = parse_kv_events_spec(config.kv_events)

        def preload(cards: dict[str, ModelCard]) -> None:
            if ctx.tokenizers is not None:
                ctx.tokenizers.preload(cards)

        events = kv_events_loop(ctx.fleet, spec, ctx.session, on_models=preload)
        tasks.append(asyncio.create_task(events, name="kv-events"))
    log.info(
        "router started replicas=%d policy=%s auth=%s",
        len(ctx.fleet.replicas),
        config.policy,
        "on" if config.api_keys else "off",
    )
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _tokenizers_ctx(app: web.Application) -> AsyncIterator[None]:
    """Precise prefix matching's tokenizer thread (with --kv-events), for the app's lifetime."""
    ctx = app[ROUTER]
    ctx.tokenizers = PromptTokenizers()
    yield
    ctx.tokenizers.close()
    ctx.tokenizers = None


async def _start_draining(app: web.Application) -> None:
    if (link := app[ROUTER].peers) is not None:
        await close_sockets(link)
    app[ROUTER].draining = True
    in_flight = sum(r.in_flight for r in app[ROUTER].fleet.replicas.values())
    log.info("router draining in_flight=%d", in_flight)


def make_app(config: RouterConfig, worker: WorkerLink | None = None) -> web.Application:
    """The router for ``config``; raises ConfigError for settings only checkable here.

    ``worker``: this app is one of --workers N processes (vllm_fleet.router.worker).
    """
    sources = discovery_sources(config)  # bad DNS names etc. fail now, not at startup
    fleet = Fleet() if worker is None else Fleet(new_replica=worker.new_replica)
    telemetry = Telemetry(fleet)
    gate = BatchGate()
    ctx = RouterContext(
        config=config,
        fleet=fleet,
        policy=BatchAware(make_policy(config.policy), gate),
        batch_gate=gate,
        breaker=BreakerPolicy(
            failure_threshold=config.failure_threshold,
            cooldown_s=config.breaker_cooldown_s,
            max_ejection_percent=config.max_ejection_percent,
        ),
        telemetry=telemetry,
        peers=peer_link(config, worker),
    )
    middlewares = [make_outer_middleware(telemetry)]
    if config.api_keys or config.admin_api_keys:
        middlewares.append(make_auth_middleware(config.api_keys, config.admin_api_keys))
    # +1: aiohttp rejects a body whose size *reaches* client_max_size.
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes + 1)
    app[ROUTER] = ctx
    app[SOURCES] = sources
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/fleet/replicas", fleet_replicas)
    app.router.add_post("/fleet/lora", fleet_lora)
    app.router.add_get("/fleet/peers", fleet_peers)
    app.router.add_get(PEER_PATH, peer_socket)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/{tail:.+}", proxy_handler)
    if worker is not None:
        app[WORKER] = worker
        app.router.add_get("/fleet/workers", fleet_workers)
        telemetry.exposed = merged_registry(fleet)
    app.cleanup_ctx.append(_session_ctx)
    app.cleanup_ctx.append(_loops_ctx)
    if config.kv_events:
        app.cleanup_ctx.append(_tokenizers_ctx)
    app.on_shutdown.append(_start_draining)
    return app
