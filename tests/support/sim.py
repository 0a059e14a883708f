"""Simulated vLLM servers for tests: in-process (`running_sim`) or a child (`start_sim_process`).

Every server listens on a free 127.0.0.1 port, is healthy before it is handed out, and is
stopped when the context exits, whatever happens in the test.

    async with running_sim(max_num_seqs=4) as sim:
        client = AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x")
        ...
        await sim.control(speed=0.5)
        assert sim.stats().aborted == 1
        await sim.stop()          # crash: socket closed, in-flight connections cut
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

# Re-exported: the simulator's tests read its metrics through this module.
from tests.support.metrics import metric_value as metric_value
from tests.support.metrics import scrape_metrics as scrape_metrics
from tests.support.ports import free_port
from tests.support.procs import ChildProcess, wait_http
from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.engine import EngineStats, SimEngine
from vllm_fleet.launcher.sim.server import SIM_STATE, SimState, make_sim_app

#: Default model name of test simulators.
SIM_MODEL = "sim-model"
#: Test defaults: a quick step so token streams finish in tens of milliseconds.
TEST_DEFAULTS: dict[str, Any] = {"model": SIM_MODEL, "step_ms": 5.0}
#: How long a simulator may take to report healthy before the test fails.
HEALTH_DEADLINE_S = 10.0

REPO_ROOT = Path(__file__).resolve().parents[2]


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 5.0,
    interval_s: float = 0.01,
    what: str = "condition",
) -> None:
    """Poll `condition` (sync or async) until true; AssertionError naming `what` at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        await asyncio.sleep(interval_s)


async def wait_healthy(url: str, deadline_s: float = HEALTH_DEADLINE_S) -> None:
    """Poll `GET {url}/health` until it answers 200; TimeoutError after `deadline_s`."""
    await wait_http(f"{url}/health", deadline_s, interval_s=0.02)


async def post_control(url: str, **knobs: float | bool) -> dict[str, Any]:
    """`POST /sim/control`; returns the knobs now in force."""
    result: dict[str, Any] = await _sim_json("POST", f"{url}/sim/control", None, knobs)
    return result


async def get_stats(url: str, session: aiohttp.ClientSession | None = None) -> dict[str, int]:
    """`GET /sim/stats` (works for subprocess simulators too). `session` reuses connections."""
    result: dict[str, int] = await _sim_json("GET", f"{url}/sim/stats", session)
    return result


async def _sim_json(
    method: str, url: str, session: aiohttp.ClientSession | None, body: object = None
) -> Any:
    if session is None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as own:
            return await _sim_json(method, url, own, body)
    async with session.request(method, url, json=body) as response:
        response.raise_for_status()
        return await response.json()


@dataclass
class SimHandle:
    """A simulator running in this process."""

    url: str
    config: SimConfig
    app: web.Application
    _runner: web.AppRunner
    _stopped: bool = field(default=False, repr=False)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def state(self) -> SimState:
        return self.app[SIM_STATE]

    @property
    def engine(self) -> SimEngine:
        return self.state.engine

    def stats(self) -> EngineStats:
        """Live engine counters (received, finished, aborted, failed, tokens_generated...)."""
        return self.engine.stats

    @property
    def running(self) -> int:
        return len(self.engine.running)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting)

    async def control(self, **knobs: float | bool) -> dict[str, Any]:
        """Change speed / fail_rate / hang / healthy through the real HTTP endpoint."""
        return await post_control(self.url, **knobs)

    async def stop(self) -> None:
        """Crash: close the listening socket and cut every open connection at once. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        server = self._runner.server
        for site in list(self._runner.sites):
            await site.stop()
        if server is not None:
            for connection in server.connections:
                if connection.transport is not None:
                    connection.transport.abort()
        await self._runner.cleanup()


def sim_config(**overrides: Any) -> SimConfig:
    """A test SimConfig: TEST_DEFAULTS and port 0 (any free port), then the overrides."""
    return replace(SimConfig(), **{**TEST_DEFAULTS, "port": 0, **overrides})


@asynccontextmanager
async def running_sim(
    *,
    host: str = "127.0.0.1",
    prepare: Callable[[web.Application], None] | None = None,
    **config_overrides: Any,
) -> AsyncIterator[SimHandle]:
    """Start a simulator in-process on a free port, wait until healthy, always clean up.

    `config_overrides` are SimConfig fields (max_num_seqs=4, step_ms=2, startup_delay=...).
    With a `startup_delay`, the handle is yielded once the delay is over. Pass `port=old.port`
    to bring a stopped simulator back on the same address (a replica that recovers). `host`
    may be any loopback address; `prepare` may add middlewares or signals to the app.
    """
    config = sim_config(**config_overrides)
    app = make_sim_app(config)
    if prepare is not None:
        prepare(app)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    handle: SimHandle | None = None
    try:
        site = web.TCPSite(runner, host, config.port)
        await site.start()
        port = _bound_port(runner)
        handle = SimHandle(f"http://{host}:{port}", config, app, runner)
        await wait_healthy(handle.url, HEALTH_DEADLINE_S + config.startup_delay)
        yield handle
    finally:
        if handle is not None:
            await handle.stop()
        else:
            await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    addresses = runner.addresses
    if not addresses:
        raise RuntimeError("simulator site bound no address")
    port: int = addresses[0][1]
    return port


@asynccontextmanager
async def running_sims(n: int, **config_overrides: Any) -> AsyncIterator[list[SimHandle]]:
    """`n` simulators with the same settings, all healthy, all stopped on exit."""
    async with AsyncExitStack() as stack:
        handles = await asyncio.gather(
            *(stack.enter_async_context(running_sim(**config_overrides)) for _ in range(n))
        )
        yield list(handles)


@dataclass
class SimProcess:
    """A simulator in its own process (`python -m vllm_fleet.launcher.cli sim ...`), for kill
    tests."""

    url: str
    port: int
    child: ChildProcess

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.child.proc

    def kill(self) -> None:
        """SIGKILL and reap: the replica dies without closing anything. Idempotent."""
        self.child.kill()

    def terminate(self, timeout_s: float = 5.0) -> None:
        """SIGTERM (graceful), then SIGKILL if it does not exit within `timeout_s`."""
        self.child.stop(grace=timeout_s)

    async def control(self, **knobs: float | bool) -> dict[str, Any]:
        return await post_control(self.url, **knobs)

    async def stats(self) -> dict[str, int]:
        return await get_stats(self.url)


def sim_command(port: int, python: str = sys.executable, **flags: Any) -> list[str]:
    """`python -m vllm_fleet.launcher.cli sim --host 127.0.0.1 --port PORT --flag value ...`.

    `flags` are CLI flags with underscores (max_num_seqs=4 -> --max-num-seqs 4). The one
    builder of a simulator's command line for the tests and the benchmark.
    """
    command = [
        python,
        "-m",
        "vllm_fleet.launcher.cli",
        "sim",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for name, value in flags.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    return command


@asynccontextmanager
async def start_sim_process(port: int | None = None, **flags: Any) -> AsyncIterator[SimProcess]:
    """Run `vllm-fleet sim` as a child process; healthy on entry, killed on exit.

    `flags` are CLI flags with underscores (max_num_seqs=4 -> --max-num-seqs 4); `model`
    defaults to SIM_MODEL and `step_ms` to the test default. `port` defaults to a free port.
    """
    port = port or free_port()
    flags = {"model": SIM_MODEL, "step_ms": TEST_DEFAULTS["step_ms"], **flags}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryDirectory() as logs:
        child = ChildProcess(
            sim_command(port, **flags), Path(logs) / "sim.log", env=env, cwd=REPO_ROOT
        )
        handle = SimProcess(f"http://127.0.0.1:{port}", port, child)
        try:
            startup = float(flags.get("startup_delay", 0.0))
            await wait_http(
                f"{handle.url}/health", HEALTH_DEADLINE_S + startup, child, interval_s=0.02
            )
            yield handle
        finally:
            handle.kill()
