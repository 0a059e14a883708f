"""Running the router process: logging, event loop, listening socket and graceful shutdown.

SIGTERM (or SIGINT) closes the listening socket at once, so new connections are refused and a
load balancer moves on, while requests and streams already running get up to
--shutdown-grace seconds to finish; whatever is still running then is cut and the process
exits 0. aiohttp's runner implements exactly this sequence; we configure it and mark the app
as draining so /ready turns 503 during the grace period.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
from typing import Any

from aiohttp import web

from router.app import make_app
from router.config import RouterConfig
from router.errors import ConfigError
from router.logs import configure_logging

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


def serve(config: RouterConfig) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    configure_logging(config.log_level, config.log_format)
    app = make_app(config)
    log.info("router listening host=%s port=%d", config.host, config.port)
    try:
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            print=None,
            loop=new_event_loop(),
            **server_options(config),
        )
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise ConfigError(
                f"--port/--host: cannot listen on {config.host}:{config.port} "
                f"({exc.strerror}); choose a free port or another address"
            ) from None
        raise
    log.info("router stopped")
    return 0
