"""No runtime call blocks the supervisor's loop, whatever the runtime waits for underneath.

One loop checks the health of every replica; the Docker runtime makes a daemon request per call
and the process runtime waits seconds for a stubborn process group. These tests hold the loop
to a 10 ms ticker while that happens (``LoopLag``): a runtime call made without awaiting its
blocking work shows as a lag of the whole call, as it did when ``status`` and ``start`` were
plain methods the supervisor called on the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from aiohttp import web

from tests.launcher.support import LoopLag, pgid
from tests.support.ports import free_port
from tests.support.sim import wait_until
from vllm_fleet.launcher.config import RestartConfig
from vllm_fleet.launcher.plan_types import ReplicaSpec
from vllm_fleet.launcher.runtime.docker import DockerRuntime, DockerSettings, SplitRuntime
from vllm_fleet.launcher.runtime.process import (
    ProcessRuntime,
    group_members,
    last_line,
    process_alive,
)
from vllm_fleet.launcher.supervisor import SupervisedUnit, Supervisor, SupervisorSettings, UnitState

#: how long each fake Docker daemon request takes (a slow daemon; real ones take 5-50 ms).
DAEMON_CALL_S = 0.3
#: a lag this long means a call ran on the loop (the ticker alone stays far below).
BLOCKED_S = DAEMON_CALL_S / 2

SETTINGS = SupervisorSettings(
    health_timeout_s=20.0,
    health_interval_s=0.05,
    unhealthy_threshold=3,
    stop_timeout_s=2.0,
    request_timeout_s=1.0,
    restart=RestartConfig(max_restarts=1, backoff_initial_s=0.05, backoff_max_s=0.1),
)


@pytest.mark.parametrize("runtime", [ProcessRuntime, DockerRuntime, SplitRuntime])
@pytest.mark.parametrize("method", ["start", "stop", "status", "last_log_line"])
def test_every_runtime_method_is_a_coroutine(runtime: type[Any], method: str) -> None:
    assert inspect.iscoroutinefunction(getattr(runtime, method)), f"{runtime.__name__}.{method}"


class SlowContainer:
    """The part of docker-py's Container the runtime uses; every call is a blocking request."""

    def __init__(self, daemon: SlowDaemon, name: str, labels: dict[str, str]) -> None:
        self.daemon = daemon
        self.name = name
        self.labels = labels
        self.attrs: dict[str, Any] = {"State": {"Running": False, "Pid": 0}}
        self._running = False

    def start(self) -> None:
        self.daemon.request("start")
        self._running = True

    def reload(self) -> None:
        self.daemon.request("inspect")
        self.attrs = {"State": {"Running": self._running, "Pid": 4242, "ExitCode": 0}}

    def logs(self, tail: int | None = None) -> bytes:
        self.daemon.request("logs")
        return b"INFO serving\n"

    def stop(self, timeout: int) -> None:
        self.daemon.request("stop")
        self._running = False

    def kill(self) -> None:
        self.stop(timeout=0)

    def remove(self, force: bool = False) -> None:
        self.daemon.request("remove")


class SlowDaemon:
    """A docker-py client stand-in: ``containers.get/create`` and a log of the requests."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.containers = self

    def request(self, what: str) -> None:
        self.requests.append(what)
        time.sleep(DAEMON_CALL_S)

    def get(self, name: str) -> SlowContainer:
        self.request("inspect")
        raise docker.errors.NotFound(f"no container {name}")

    def create(self, **kwargs: Any) -> SlowContainer:
        self.request("create")
        return SlowContainer(self, kwargs["name"], kwargs["labels"])


@pytest.fixture
async def health_server() -> AsyncIterator[int]:
    """What the container would serve: /health on the port the runtime publishes."""

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_supervising_a_container_never_blocks_the_loop(
    health_server: int, tmp_path: Path
) -> None:
    daemon = SlowDaemon()
    runtime = DockerRuntime(
        DockerSettings(fleet="lag"),
        tmp_path / "logs",
        client=daemon,
    )
    spec = ReplicaSpec(
        name="replica-0",
        host="127.0.0.1",
        model="test-model",
        port=health_server,
        command=("python3", "-m", "server", "--host", "127.0.0.1", "--port", str(health_server)),
    )
    supervisor = Supervisor(runtime, [SupervisedUnit(spec)], SETTINGS)
    async with LoopLag() as lag:
        await supervisor.start()
        try:
            await asyncio.wait_for(supervisor.wait_settled(), 30.0)
            assert supervisor.states() == {"replica-0": UnitState.HEALTHY}
            watched = len(daemon.requests)
            while daemon.requests[watched:].count("inspect") < 2:  # two status polls
                await asyncio.sleep(0.05)
        finally:
            await supervisor.shutdown()

    assert {"create", "start", "inspect", "logs", "stop", "remove"} <= set(daemon.requests)
    assert lag.ticks > 10
    assert lag.max_s < BLOCKED_S, f"the loop was held {lag.max_s:.3f}s by a daemon request"


STUBBORN = """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(60)
"""


async def test_stopping_a_stubborn_process_never_blocks_the_loop(tmp_path: Path) -> None:
    """The group ignores SIGTERM: the stop waits its whole timeout, then SIGKILLs."""
    runtime = ProcessRuntime(tmp_path / "logs")
    spec = ReplicaSpec(
        name="stubborn",
        host="127.0.0.1",
        model="test-model",
        port=1,
        command=(sys.executable, "-c", textwrap.dedent(STUBBORN)),
    )
    handle = await runtime.start(spec)
    try:
        await wait_until(lambda: last_line(handle.log_path) == "ready", 10.0, what="the process")
        async with LoopLag() as lag:
            started = time.monotonic()
            status = await runtime.stop(handle, timeout=1.0)
            elapsed = time.monotonic() - started
    finally:
        if group_members(pgid(handle)):
            await runtime.stop(handle, timeout=0.0)

    assert elapsed >= 1.0
    assert status.returncode == -9
    assert not process_alive(pgid(handle))
    assert lag.max_s < 0.5, f"the loop was held {lag.max_s:.3f}s during a 1 s stop"
