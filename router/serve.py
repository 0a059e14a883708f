"""Running the router process: logging, event loop, listening socket and graceful shutdown.

SIGTERM (or SIGINT) closes the listening socket at once, so new connections are refused and a
load balancer moves on, while requests and streams already running get up to
--shutdown-grace seconds to finish; whatever is still running then is cut and the process
exits 0. aiohttp's runner implements exactly this sequence; we configure it and mark the app
as draining so /ready turns 503 during the grace period. The loop around it is
``web.run_app``'s, with vllm_fleet.router.protocol_errors.RouterRunner in place of the AppRunner.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import os
import signal
from typing import Any

from aiohttp import web

from vllm_fleet.router.app import make_app
from vllm_fleet.router.config import RouterConfig
from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.logs import configure_logging
from vllm_fleet.router.protocol_errors import RouterRunner
from vllm_fleet.router.worker import SIBLING_HOST

log = logging.getLogger("vllm_fleet.router")

#: seconds an idle client connection stays open (what nginx uses by default).
KEEPALIVE_TIMEOUT_S = 75.0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (faster I/O); the standard loop otherwise."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def server_options(config: RouterConfig) -> dict[str, Any]:
    """AppRunner / run_app settings, shared with the tests' router so they run the same way."""
    return {
        "shutdown_timeout": config.shutdown_grace_s,
        # A client that disconnects cancels its handler, which closes the upstream request at
        # once so vLLM stops generating for nobody.
        "handler_cancellation": True,
        # The proxy logs one line per request itself, with the replica and attempts.
        "access_log": None,
        # Idle client connections are closed after this many seconds, in production and tests
        # alike (aiohttp's own default differs between run_app and AppRunner).
        "keepalive_timeout": KEEPALIVE_TIMEOUT_S,
    }


async def _run(
    app: web.Application,
    config: RouterConfig,
    worker: int | None = None,
    sibling_port: int | None = None,
) -> None:
    """Listen until cancelled, then shut down gracefully (what ``web.run_app`` does, with
    RouterRunner so that unparseable requests get an OpenAI-style body too).

    A worker of --workers N (vllm_fleet.router.workers) listens with SO_REUSEPORT beside its
    siblings and stops on its first SIGTERM; later ones do not cut its drain short. It also
    listens on its own loopback ``sibling_port``, where its siblings reach it as a peer.
    """
    runner = RouterRunner(app, handle_signals=worker is None, **server_options(config))
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, reuse_port=worker is not None)
        await site.start()
        if sibling_port is not None:
            await web.TCPSite(runner, SIBLING_HOST, sibling_port, reuse_port=True).start()
        log.info("router listening host=%s port=%d", config.host, config.port)
        stop = asyncio.Event()
        if worker is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            log.info("router worker=%d pid=%d", worker, os.getpid())
        await stop.wait()  # until SIGTERM/SIGINT raise GracefulExit, or a worker's SIGTERM
    finally:
        await runner.cleanup()  # stop listening, drain for --shutdown-grace, close


def run_worker(
    app: web.Application, config: RouterConfig, worker: int, sibling_port: int | None = None
) -> None:
    """Serve one worker of --workers N until SIGTERM."""
    _run_until_signal(app, config, worker, sibling_port)


def _run_until_signal(
    app: web.Application,
    config: RouterConfig,
    worker: int | None = None,
    sibling_port: int | None = None,
) -> None:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_run(app, config, worker, sibling_port))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()  # runs _run's cleanup: the graceful shutdown
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def serve(config: RouterConfig) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    configure_logging(config.log_level, config.log_format)
    if config.workers > 1:
        from vllm_fleet.router.workers import serve_workers  # the supervisor imports this module

        return serve_workers(config)
    app = make_app(config)
    try:
        _run_until_signal(app, config)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise ConfigError(
                f"--port/--host: cannot listen on {config.host}:{config.port} "
                f"({exc.strerror}); choose a free port or another address"
            ) from None
        raise
    log.info("router stopped")
    return 0
