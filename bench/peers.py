"""Every router the benchmark compares, behind one small interface.

    url = await peer.start(backends)   # PeerUnavailable(reason) if it cannot run here
    ... send load to peer.target() ...
    peer.stop()

Each peer writes its own config into its own directory and listens on a free 127.0.0.1 port.
Configs follow each project's documented advice for LLM streaming (nginx: `proxy_buffering off`,
a shared `zone` for least_conn, HTTP/1.1 keep-alive upstreams; HAProxy: `option http-no-delay`),
otherwise defaults, because defaults are what people run. A peer that cannot start raises
`PeerUnavailable`, which the report prints in place of its numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.cpu import tree_cpu_seconds
from bench.load import BoundedLoadHash, FixedTarget, JoinShortestQueue, RoundRobinTarget, Target
from bench.stamp import run_stamp
from tests.support.ports import free_port
from tests.support.procs import ChildProcess, wait_http

READY_DEADLINE_S = 60.0
REPO = Path(__file__).resolve().parents[1]


class PeerUnavailable(Exception):
    """The peer cannot run on this machine (missing program, refused config, failed start)."""


class Peer(ABC):
    """One router (or the absence of one) under test."""

    #: Row label in the tables, e.g. "nginx least_conn".
    name: str
    #: Short description of its settings, for the report's "how each peer was run" table.
    settings: str = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.url = ""
        self.child: ChildProcess | None = None

    @abstractmethod
    async def start(self, backends: list[str]) -> str:
        """Start in front of `backends`; return the URL clients send to once it is ready."""

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None

    def target(self) -> Target:
        return FixedTarget(self.url)

    def cpu_seconds(self) -> float | None:
        """CPU time the router has used so far (its process tree); None without a process."""
        return tree_cpu_seconds(self.child.pid) if self.child is not None else None

    def version(self) -> str:
        return ""

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name.lower())

    async def _launch(self, argv: list[str], ready_path: str = "/v1/models") -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.child = ChildProcess(argv, self.workdir / f"{self.slug}.log")
        try:
            await wait_http(f"{self.url}{ready_path}", READY_DEADLINE_S, self.child)
        except (RuntimeError, TimeoutError) as exc:
            tail = self.child.tail()
            self.stop()
            raise PeerUnavailable(f"did not become ready: {exc} {tail}".strip()) from None
        return self.url


def program_path(name: str) -> str:
    """Path of `name` from this interpreter's venv or PATH; PeerUnavailable if absent."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise PeerUnavailable(f"{name} is not installed (bench/setup.sh installs it)")
    return found


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _hostport(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


# -- no router ------------------------------------------------------------------------------


class IdealPeer(Peer):
    """Join-shortest-queue done by the load generator with exact in-flight counts, no hop."""

    name = "ideal (client JSQ)"
    settings = "load generator picks the replica with the fewest requests in flight; no proxy"

    async def start(self, backends: list[str]) -> str:
        self._backends = list(backends)
        self.url = "client-side"
        return self.url

    def target(self) -> Target:
        return JoinShortestQueue(self._backends)


class ClientRoundRobinPeer(Peer):
    """Round robin by the load generator, no hop: what round robin costs without a proxy."""

    name = "direct round-robin"
    settings = "load generator cycles over the replicas; no proxy"

    async def start(self, backends: list[str]) -> str:
        self._backends = list(backends)
        self.url = "client-side"
        return self.url

    def target(self) -> Target:
        return RoundRobinTarget(self._backends)


class AffinityPeer(Peer):
    """Bounded-load consistent hashing on the request's group by the load generator, no hop:
    what prefix affinity gives a client that knows the groups but nothing of the caches."""

    name = "client consistent hash (bounded load)"
    settings = (
        "load generator hashes the request's prefix group (multi-turn: the conversation) onto a "
        "ring of the replicas, 64 points each; the next replica when that one has more than "
        "1.25 x the mean in flight; no proxy"
    )

    async def start(self, backends: list[str]) -> str:
        self._backends = list(backends)
        self.url = "client-side"
        return self.url

    def target(self) -> Target:
        return BoundedLoadHash(self._backends)


class DirectPeer(Peer):
    """Straight to the first replica: the latency floor for router overhead."""

    name = "direct (1 replica)"
    settings = "load generator sends to one replica; no proxy"

    async def start(self, backends: list[str]) -> str:
        self.url = backends[0]
        return self.url


# -- ours -----------------------------------------------------------------------------------


class OursPeer(Peer):
    """vllm-fleet's router, started the way users start it."""

    def __init__(
        self,
        workdir: Path,
        policy: str,
        python: str = sys.executable,
        prefix_index: bool = True,
        workers: int = 1,
        port: int | None = None,
        peers: tuple[str, ...] = (),
        kv_events: bool = False,
    ) -> None:
        super().__init__(workdir)
        self.policy = policy
        self.python = python
        self.prefix_index = prefix_index
        self.workers = workers
        self.port = port
        self.peers = peers
        self.kv_events = kv_events
        self.name = f"ours {policy}"
        self.settings = f"`vllm-fleet router --policy {policy}`, defaults otherwise"
        if workers != 1:
            self.name += f", {workers} workers"
            self.settings = self.settings.replace("`,", f" --workers {workers}`,")
        if kv_events:  # as `vllm-fleet up` starts it: precise matching by vLLM's KV events
            self.name += ", precise (KV events)"
            self.settings = self.settings.replace("`,", " --kv-events auto`,")
        if not prefix_index:
            self.name += " (prefix index off)"
            self.settings += (
                "; vllm_fleet.router.parse.request_prefix replaced by one returning no keys"
            )

    def command(self) -> list[str]:
        """`python -m vllm_fleet.launcher.cli` as users run it; with the prefix index off, the same
        CLI behind a stub that gives every request no prefix keys (the router has no switch for
        it): nothing is hashed, matched or recorded, everything else is unchanged."""
        if self.prefix_index:
            return [self.python, "-m", "vllm_fleet.launcher.cli"]
        stub = (
            "import sys, vllm_fleet.router.parse as parse, vllm_fleet.launcher.cli as cli; "
            "parse.request_prefix = lambda model, payload: (); sys.exit(cli.main())"
        )
        return [self.python, "-c", stub]

    async def start(self, backends: list[str]) -> str:
        port = self.port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [*self.command(), "router", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--policy", self.policy, "--log-level", "warning"]
        if self.workers != 1:
            argv += ["--workers", str(self.workers)]
        for peer in self.peers:
            argv += ["--peer", peer]
        if self.kv_events:
            argv += ["--kv-events", "auto"]
        for backend in backends:
            argv += ["--backend", backend]
        url = await self._launch(argv)
        await self._wait_all_healthy(len(backends))
        if self.kv_events:
            await self._wait_precise(len(backends))
        return url

    async def _wait_precise(self, count: int, deadline_s: float = 120.0) -> None:
        """Wait until every replica's events are read (history included) and its models'
        tokenizers loaded (/fleet/replicas): loading one is a one-off of seconds of CPU at the
        router's start (importing transformers), which a run would otherwise charge to its
        first requests."""
        deadline = time.monotonic() + deadline_s
        states: list[dict[str, Any]] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with session.get(f"{self.url}/fleet/replicas") as response:
                        rows = await response.json()
                    states = [(r["prefix_cache"] or {}).get("kv_events") or {} for r in rows]
                    tokenizers = [s.get("tokenizers") or {} for s in states]
                    if "failed" in (v for t in tokenizers for v in t.values()):
                        raise PeerUnavailable(f"a tokenizer did not load: {tokenizers}")
                    ready = [
                        s.get("synced") and t and all(v == "loaded" for v in t.values())
                        for s, t in zip(states, tokenizers, strict=True)
                    ]
                    if len(ready) >= count and all(ready):
                        return
                await asyncio.sleep(0.2)
        raise PeerUnavailable(f"precise matching not ready after {deadline_s:.0f}s: {states}")

    async def _wait_all_healthy(self, count: int) -> None:
        """Wait until /fleet/replicas shows every replica healthy (so no run starts lopsided)."""
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with session.get(f"{self.url}/fleet/replicas") as response:
                        if response.status == 404:
                            return  # older router without the endpoint
                        if _healthy_count(await response.json()) >= count:
                            return
                await asyncio.sleep(0.1)
        raise PeerUnavailable(f"not all {count} replicas healthy in /fleet/replicas after 30s")

    def version(self) -> str:
        return f"git {run_stamp(REPO).label}"


class OursPairPeer(Peer):
    """Two of our routers in front of the same replicas, the load generator alternating between
    them per request (as a Service spreads clients over two router pods). Unpeered, each router
    only knows what it sent itself: what the prefix index is worth when it is split. Peered
    (``--peer`` naming the other, vllm_fleet.router.peers), each tells the other what it sent
    where, as the chart's routers do through their headless service."""

    def __init__(
        self, workdir: Path, policy: str, python: str = sys.executable, peered: bool = False
    ) -> None:
        super().__init__(workdir)
        ports = [free_port() for _ in range(2)]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        self.routers = [
            OursPeer(
                workdir / f"router-{i}",
                policy,
                python,
                port=ports[i] if peered else None,
                peers=(urls[1 - i],) if peered else (),
            )
            for i in range(2)
        ]
        self.name = f"2 x ours {policy}" + (", peered" if peered else "")
        self.settings = (
            f"two `vllm-fleet router --policy {policy}` processes, requests alternating "
            "between them"
            + ("; each started with `--peer` naming the other" if peered else "")
            + "; defaults otherwise"
        )

    async def start(self, backends: list[str]) -> str:
        try:
            for router in self.routers:
                await router.start(backends)
        except BaseException:
            self.stop()
            raise
        self.url = self.routers[0].url
        return self.url

    def stop(self) -> None:
        for router in self.routers:
            router.stop()

    def target(self) -> Target:
        return RoundRobinTarget([router.url for router in self.routers])

    def cpu_seconds(self) -> float | None:
        used = [router.cpu_seconds() for router in self.routers]
        return None if any(u is None for u in used) else sum(u or 0.0 for u in used)

    def version(self) -> str:
        return self.routers[0].version()


def _healthy_count(body: object) -> int:
    """Count healthy replicas in /fleet/replicas, whether it is a list or {"replicas": ...}."""
    items: object = body
    if isinstance(body, dict):
        items = body.get("replicas", body.get("data", []))
    if isinstance(items, dict):
        items = list(items.values())
    if not isinstance(items, list):
        return 0
    return sum(1 for item in items if isinstance(item, dict) and item.get("healthy"))


# -- nginx ----------------------------------------------------------------------------------


class NginxPeer(Peer):
    """nginx as an OpenAI-API load balancer, configured as the LLM-serving guides advise."""

    def __init__(self, workdir: Path, method: str) -> None:
        super().__init__(workdir)
        self.method = method  # "least_conn" or "round_robin"
        self.name = f"nginx {method}"
        self.settings = (
            f"{'least_conn; ' if method == 'least_conn' else ''}zone 64k, keepalive 64, "
            "http/1.1, proxy_buffering off, worker_processes auto"
        )

    def config(self, port: int, backends: list[str]) -> str:
        d = self.workdir
        servers = "\n".join(
            f"        server {_hostport(b)} max_fails=1 fail_timeout=10s;" for b in backends
        )
        balance = "        least_conn;\n" if self.method == "least_conn" else ""
        return f"""daemon off;
master_process on;
user root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 32m;
    upstream fleet {{
{balance}        zone fleet 64k;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fleet;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            add_header X-Bench-Upstream $upstream_addr always;
        }}
    }}
}}
"""

    async def start(self, backends: list[str]) -> str:
        nginx = program_path("nginx")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config(port, backends))
        return await self._launch([nginx, "-p", str(self.workdir), "-c", str(conf)])

    def version(self) -> str:
        return _command_version(["nginx", "-v"])


# -- HAProxy --------------------------------------------------------------------------------


class HaproxyPeer(Peer):
    """HAProxy in HTTP mode; `option http-no-delay` so SSE chunks are not held back."""

    def __init__(self, workdir: Path, balance: str) -> None:
        super().__init__(workdir)
        self.balance = balance  # "leastconn" or "roundrobin"
        self.name = f"haproxy {balance}"
        self.settings = (
            f"balance {balance}, option http-no-delay, health check GET /health every 1s, "
            "retries 2 + redispatch"
        )

    def config(self, port: int, backends: list[str]) -> str:
        servers = "\n".join(
            f"    server r{i} {_hostport(b)} check inter 1s fall 2 rise 2"
            for i, b in enumerate(backends)
        )
        return f"""global
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    option http-no-delay
    retries 2
    option redispatch
frontend fleet
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance {self.balance}
    option httpchk GET /health
    http-response set-header X-Bench-Upstream %[srv_name]
{servers}
"""

    async def start(self, backends: list[str]) -> str:
        haproxy = program_path("haproxy")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "haproxy.cfg"
        conf.write_text(self.config(port, backends))
        return await self._launch([haproxy, "-db", "-f", str(conf)])

    def version(self) -> str:
        return _command_version(["haproxy", "-v"])


def _command_version(argv: list[str]) -> str:
    try:
        path = program_path(argv[0])
        result = subprocess.run(
            [path, *argv[1:]], capture_output=True, text=True, timeout=10, check=False
        )
    except (PeerUnavailable, OSError, subprocess.SubprocessError):
        return "not installed"
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0] if text else "unknown"


# -- the Rust routers -----------------------------------------------------------------------


class VllmRouterPeer(Peer):
    """vllm-router (PyPI `vllm-router`), one policy per instance, its own metrics port."""

    def __init__(self, workdir: Path, policy: str) -> None:
        super().__init__(workdir)
        self.policy = policy
        self.name = f"vllm-router {policy}"
        self.settings = f"--policy {policy}, defaults otherwise"

    async def start(self, backends: list[str]) -> str:
        program = program_path("vllm-router")
        if self.policy == "power_of_two" and len(backends) < 2:
            raise PeerUnavailable("refuses power_of_two with one worker")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [program, "--host", "127.0.0.1", "--port", str(port), "--policy", self.policy]
        argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        argv += ["--log-level", "warning", "--worker-urls", *backends]
        return await self._launch(argv)

    def version(self) -> str:
        return _package_version("vllm-router")


class SglangRouterPeer(Peer):
    """sglang-router (PyPI `sglang-router`, `sglang-router launch`)."""

    def __init__(self, workdir: Path, policy: str) -> None:
        super().__init__(workdir)
        self.policy = policy
        self.name = f"sglang-router {policy}"
        self.settings = f"--policy {policy}, defaults otherwise"

    async def start(self, backends: list[str]) -> str:
        program = program_path("sglang-router")
        if self.policy == "power_of_two" and len(backends) < 2:
            raise PeerUnavailable("refuses power_of_two with one worker")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [program, "launch", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--policy", self.policy, "--prometheus-host", "127.0.0.1"]
        argv += ["--prometheus-port", str(free_port()), "--log-level", "warn"]
        argv += ["--worker-urls", *backends]
        return await self._launch(argv)

    def version(self) -> str:
        return _package_version("sglang-router")


# -- the line-up ----------------------------------------------------------------------------

#: Every peer by its key on the command line (`--peers ours-lb,nginx-lc`).
PEER_KEYS = (
    "ours-cost", "ours-lb", "ours-rr", "ours-cost-x2", "ours-cost-x2-peered",
    "ours-cost-noindex", "ours-cost-w2", "ours-cost-precise",
    "ideal", "chash",
    "direct-rr", "direct",
    "nginx-lc", "nginx-rr", "haproxy-lc", "haproxy-rr",
    "vllm-rr", "vllm-p2", "vllm-ca", "sglang-rr", "sglang-ca",
)  # fmt: skip


def make_peer(key: str, workdir: Path, python: str) -> Peer:
    """Build the peer named `key` (see PEER_KEYS), working in `workdir`/<key>."""
    d = workdir / key
    factories: dict[str, Callable[[], Peer]] = {
        "ours-lb": lambda: OursPeer(d, "least-busy", python),
        "ours-rr": lambda: OursPeer(d, "round-robin", python),
        "ours-cost": lambda: OursPeer(d, "cost", python),
        "ours-cost-x2": lambda: OursPairPeer(d, "cost", python),
        "ours-cost-x2-peered": lambda: OursPairPeer(d, "cost", python, peered=True),
        "ours-cost-noindex": lambda: OursPeer(d, "cost", python, prefix_index=False),
        "ours-cost-w2": lambda: OursPeer(d, "cost", python, workers=2),
        "ours-cost-precise": lambda: OursPeer(d, "cost", python, kv_events=True),
        "ideal": lambda: IdealPeer(d),
        "chash": lambda: AffinityPeer(d),
        "direct-rr": lambda: ClientRoundRobinPeer(d),
        "direct": lambda: DirectPeer(d),
        "nginx-lc": lambda: NginxPeer(d, "least_conn"),
        "nginx-rr": lambda: NginxPeer(d, "round_robin"),
        "haproxy-lc": lambda: HaproxyPeer(d, "leastconn"),
        "haproxy-rr": lambda: HaproxyPeer(d, "roundrobin"),
        "vllm-rr": lambda: VllmRouterPeer(d, "round_robin"),
        "vllm-p2": lambda: VllmRouterPeer(d, "power_of_two"),
        "vllm-ca": lambda: VllmRouterPeer(d, "cache_aware"),
        "sglang-rr": lambda: SglangRouterPeer(d, "round_robin"),
        "sglang-ca": lambda: SglangRouterPeer(d, "cache_aware"),
    }
    if key not in factories:
        raise ValueError(f"unknown peer {key!r}; use one of {', '.join(factories)}")
    return factories[key]()
