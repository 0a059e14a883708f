"""What one router app shares between its handlers and background loops, under typed AppKeys.

It lives apart from app.py so the proxy and the middleware can read it without importing the
app factory that wires them together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from vllm_fleet.router.balancer import Policy
from vllm_fleet.router.config import RouterConfig
from vllm_fleet.router.health import BreakerPolicy
from vllm_fleet.router.peers import PeerLink
from vllm_fleet.router.priority import BatchGate
from vllm_fleet.router.prompt_tokens import PromptTokenizers
from vllm_fleet.router.state import Fleet
from vllm_fleet.router.telemetry import Telemetry
from vllm_fleet.router.upstream_client import UpstreamClient


@dataclass
class RouterContext:
    config: RouterConfig
    fleet: Fleet
    policy: Policy
    breaker: BreakerPolicy
    telemetry: Telemetry
    #: Unix time the app was built: the ``created`` field of /v1/models entries.
    created: int = field(default_factory=lambda: int(time.time()))
    #: Where batch requests wait for room (vllm_fleet.router.priority); the policy shares it.
    batch_gate: BatchGate = field(default_factory=BatchGate)
    #: Set on shutdown: /ready answers 503 so load balancers stop sending while streams drain.
    draining: bool = False
    #: Precise prefix matching's tokenizers (with --kv-events; vllm_fleet.router.prompt_tokens).
    tokenizers: PromptTokenizers | None = None
    #: The peer exchange with other routers (--peer / --discover-peers-dns;
    #: vllm_fleet.router.peers); None when this router has no peers.
    peers: PeerLink | None = None
    _session: aiohttp.ClientSession | None = None
    _client: UpstreamClient | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared upstream session; exists between app startup and cleanup."""
        if self._session is None:
            raise RuntimeError("the upstream session exists only while the app is running")
        return self._session

    @property
    def client(self) -> UpstreamClient:
        """The proxied requests' client (router.upstream_client); exists while the app runs."""
        if self._client is None:
            raise RuntimeError("the upstream client exists only while the app is running")
        return self._client


ROUTER: web.AppKey[RouterContext] = web.AppKey("router", RouterContext)
