from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.launcher.support import pgid
from tests.support.ports import free_port
from tests.support.sim import SIM_MODEL, post_control
from vllm_fleet.launcher.config import RestartConfig
from vllm_fleet.launcher.plan_types import ReplicaSpec, RouterSpec, ServerSpec
from vllm_fleet.launcher.runtime.base import ServerHandle, ServerStatus
from vllm_fleet.launcher.runtime.process import ProcessRuntime, group_members, process_alive
from vllm_fleet.launcher.supervisor import (
    SupervisedUnit,
    Supervisor,
    SupervisorEvent,
    SupervisorSettings,
    UnitState,
    backoff_delay,
    units_for,
)

DEADLINE_S = 20.0

FAST = SupervisorSettings(
    health_timeout_s=15.0,
    health_interval_s=0.1,
    unhealthy_threshold=2,
    stop_timeout_s=2.0,
    request_timeout_s=1.0,
    restart=RestartConfig(max_restarts=3, backoff_initial_s=0.05, backoff_max_s=0.2, window_s=60.0),
)


def sim_spec(name: str, *flags: str) -> ReplicaSpec:
    port = free_port()
    command = (
        sys.executable, "-m", "vllm_fleet.launcher.cli", "sim", "--host", "127.0.0.1", "--port",
        str(port),
        "--model", SIM_MODEL, "--step-ms", "1", *flags,
    )  # fmt: skip
    return ReplicaSpec(name=name, host="127.0.0.1", port=port, model=SIM_MODEL, command=command)


def python_spec(name: str, code: str) -> ReplicaSpec:
    return ReplicaSpec(
        name=name,
        host="127.0.0.1",
        model="test-model",
        port=free_port(),
        gpus=(),
        tensor_parallel_size=1,
        command=(sys.executable, "-c", textwrap.dedent(code)),
    )


class RecordingRuntime(ProcessRuntime):
    """A real process runtime that also records what was started and stopped."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.started: list[ServerHandle] = []
        self.stop_order: list[str] = []

    async def start(self, spec: ServerSpec) -> ServerHandle:
        handle = await super().start(spec)
        self.started.append(handle)
        return handle

    async def stop(self, handle: ServerHandle, timeout: float) -> ServerStatus:
        self.stop_order.append(handle.spec.name)
        return await super().stop(handle, timeout)


@dataclass
class Harness:
    supervisor: Supervisor
    runtime: RecordingRuntime
    events: list[SupervisorEvent] = field(default_factory=list)
    backends: list[list[str]] = field(default_factory=list)

    def states_of(self, name: str) -> list[UnitState]:
        return [e.state for e in self.events if e.name == name and not e.log_only]

    def handle_of(self, name: str) -> ServerHandle:
        return [h for h in self.runtime.started if h.spec.name == name][-1]

    def pids(self) -> list[int]:
        return [pgid(h) for h in self.runtime.started]


@asynccontextmanager
async def supervised(
    tmp_path: Path,
    units: Sequence[SupervisedUnit],
    settings: SupervisorSettings = FAST,
) -> AsyncIterator[Harness]:
    runtime = RecordingRuntime(tmp_path / "logs")
    harness = Harness(supervisor=None, runtime=runtime)  # type: ignore[arg-type]
    harness.supervisor = Supervisor(
        runtime,
        units,
        settings,
        on_backends=harness.backends.append,
        on_event=harness.events.append,
    )
    try:
        await harness.supervisor.start()
        yield harness
    finally:
        await harness.supervisor.shutdown()
        for handle in runtime.started:  # belt and braces if a test broke the supervisor
            if group_members(pgid(handle)):
                os.killpg(pgid(handle), signal.SIGKILL)


async def until(predicate: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_backoff_doubles_up_to_the_cap() -> None:
    restart = RestartConfig(backoff_initial_s=1.0, backoff_max_s=5.0)
    assert [backoff_delay(restart, n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


async def test_replicas_become_healthy_and_are_published(tmp_path: Path) -> None:
    specs = [sim_spec("replica-0"), sim_spec("replica-1", "--startup-delay", "0.3")]
    async with supervised(tmp_path, [SupervisedUnit(s) for s in specs]) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)

        assert h.supervisor.states() == {
            "replica-0": UnitState.HEALTHY,
            "replica-1": UnitState.HEALTHY,
        }
        assert h.backends[0] == []  # written before anything starts
        assert h.backends[-1] == sorted(s.url for s in specs)
        assert h.states_of("replica-1")[:2] == [UnitState.LOADING, UnitState.HEALTHY]
        records = {r.name: r for r in h.supervisor.records()}
        assert records["replica-0"].pgid == pgid(h.handle_of("replica-0"))
        assert records["replica-0"].container == ""
        assert records["replica-0"].state == "healthy"
        assert records["replica-0"].log.endswith("replica-0.log")


async def test_crashed_replica_is_dropped_then_restarted_on_the_same_port(tmp_path: Path) -> None:
    specs = [sim_spec("replica-0"), sim_spec("replica-1")]
    both = sorted(s.url for s in specs)
    async with supervised(tmp_path, [SupervisedUnit(s) for s in specs]) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)
        first = h.handle_of("replica-1")

        os.killpg(pgid(first), signal.SIGKILL)

        await until(lambda: h.backends[-1] == [specs[0].url], "replica-1 to leave the backends")
        await until(
            lambda: h.handle_of("replica-1") is not first and h.backends[-1] == both,
            "replica-1 to come back",
        )
        assert UnitState.RESTARTING in h.states_of("replica-1")
        restarting = next(e for e in h.events if e.state is UnitState.RESTARTING)
        assert "exited with status -9" in restarting.message
        assert h.handle_of("replica-1").spec == first.spec
        assert h.supervisor.states()["replica-1"] is UnitState.HEALTHY
        assert {r.name: r.restarts for r in h.supervisor.records()} == {
            "replica-0": 0,
            "replica-1": 1,
        }


async def test_unhealthy_replica_is_restarted(tmp_path: Path) -> None:
    spec = sim_spec("replica-0")
    async with supervised(tmp_path, [SupervisedUnit(spec)]) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)
        first = h.handle_of("replica-0")

        await post_control(spec.url, healthy=False)

        await until(lambda: h.handle_of("replica-0") is not first, "a restart")
        assert not process_alive(pgid(first))
        await until(lambda: h.backends[-1] == [spec.url], "the new process to be published")
        states = h.states_of("replica-0")
        assert states.index(UnitState.UNHEALTHY) < states.index(UnitState.RESTARTING)
        restarting = next(e for e in h.events if e.state is UnitState.RESTARTING)
        assert "failed 2 health checks in a row" in restarting.message


async def test_crash_loop_exhausts_the_budget_and_is_failed(tmp_path: Path) -> None:
    crash = python_spec("replica-1", "import sys; print('CUDA out of memory'); sys.exit(1)")
    good = sim_spec("replica-0")
    units = [SupervisedUnit(good), SupervisedUnit(crash)]
    async with supervised(tmp_path, units) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)

        assert h.supervisor.states()["replica-1"] is UnitState.FAILED
        failed = [e for e in h.events if e.state is UnitState.FAILED]
        assert len(failed) == 1
        assert "exited with status 1 while loading" in failed[0].message
        assert "gave up after 3 restarts" in failed[0].message
        assert failed[0].last_log_line == "CUDA out of memory"
        assert failed[0].restarts == 3
        assert len([p for p in h.runtime.started if p.spec.name == "replica-1"]) == 4
        assert h.backends[-1] == [good.url]
        assert h.supervisor.states()["replica-0"] is UnitState.HEALTHY


async def test_never_healthy_hits_the_deadline_then_fails(tmp_path: Path) -> None:
    slow = sim_spec("replica-0", "--startup-delay", "1000")
    settings = SupervisorSettings(
        health_timeout_s=0.5,
        health_interval_s=0.1,
        stop_timeout_s=2.0,
        request_timeout_s=1.0,
        restart=RestartConfig(max_restarts=1, backoff_initial_s=0.05, backoff_max_s=0.1),
    )
    async with supervised(tmp_path, [SupervisedUnit(slow)], settings) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)

        assert h.states_of("replica-0") == [
            UnitState.LOADING,
            UnitState.RESTARTING,
            UnitState.LOADING,
            UnitState.FAILED,
        ]
        failed = h.events[-1]
        assert "not healthy within 0.5s" in failed.message
        assert all(not process_alive(pid) for pid in h.pids())
        assert h.backends == [[]]


SERVES_HEALTH_IGNORING_SIGTERM = """
    import signal, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
        def log_message(self, *args):
            pass
    print("serving", flush=True)
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


async def test_shutdown_kills_a_replica_ignoring_sigterm(tmp_path: Path) -> None:
    port = free_port()
    spec = ReplicaSpec(
        name="stubborn",
        host="127.0.0.1",
        model="test-model",
        port=port,
        gpus=(),
        tensor_parallel_size=1,
        command=(sys.executable, "-c", textwrap.dedent(SERVES_HEALTH_IGNORING_SIGTERM), str(port)),
    )
    settings = SupervisorSettings(
        health_timeout_s=10.0, health_interval_s=0.1, stop_timeout_s=0.3, request_timeout_s=1.0
    )
    async with supervised(tmp_path, [SupervisedUnit(spec)], settings) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)
        pid = pgid(h.handle_of("stubborn"))
        assert process_alive(pid)

        loop = asyncio.get_running_loop()
        started = loop.time()
        await h.supervisor.shutdown()

        assert loop.time() - started >= 0.3
        assert not process_alive(pid)
        assert h.supervisor.states()["stubborn"] is UnitState.STOPPED


async def test_shutdown_stops_the_router_before_the_replicas(tmp_path: Path) -> None:
    replicas = [sim_spec("replica-0"), sim_spec("replica-1")]
    stand_in = sim_spec("router")  # any server with /health stands in for the router here
    router = RouterSpec(
        name="router",
        host="127.0.0.1",
        port=stand_in.port,
        command=stand_in.command,
        backends_file="unused",
    )
    units = units_for(replicas, router)
    assert [u.role for u in units] == ["replica", "replica", "router"]
    async with supervised(tmp_path, units) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)
        assert h.backends[-1] == sorted(s.url for s in replicas)  # the router is no backend

        await h.supervisor.shutdown()

        assert h.runtime.stop_order[0] == "router"
        assert sorted(h.runtime.stop_order[1:]) == ["replica-0", "replica-1"]
        assert all(not process_alive(pid) for pid in h.pids())
        assert set(h.supervisor.states().values()) == {UnitState.STOPPED}


async def test_a_command_that_cannot_start_is_failed_not_raised(tmp_path: Path) -> None:
    spec = ReplicaSpec(
        name="replica-0",
        host="127.0.0.1",
        model="test-model",
        port=free_port(),
        gpus=(),
        tensor_parallel_size=1,
        command=("/nonexistent/python",),
    )
    async with supervised(tmp_path, [SupervisedUnit(spec)]) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)
        assert h.supervisor.states()["replica-0"] is UnitState.FAILED
        assert "could not start" in h.events[-1].message


async def test_kill_now_cuts_the_grace_period_short(tmp_path: Path) -> None:
    port = free_port()
    spec = ReplicaSpec(
        name="stubborn",
        host="127.0.0.1",
        model="test-model",
        port=port,
        gpus=(),
        tensor_parallel_size=1,
        command=(sys.executable, "-c", textwrap.dedent(SERVES_HEALTH_IGNORING_SIGTERM), str(port)),
    )
    settings = SupervisorSettings(
        health_timeout_s=10.0, health_interval_s=0.1, stop_timeout_s=60.0, request_timeout_s=1.0
    )
    async with supervised(tmp_path, [SupervisedUnit(spec)], settings) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)
        pid = pgid(h.handle_of("stubborn"))
        shutdown = asyncio.create_task(h.supervisor.shutdown())
        await until(lambda: h.runtime.stop_order == ["stubborn"], "the graceful stop to begin")

        await h.supervisor.kill_now()

        await asyncio.wait_for(shutdown, 10.0)  # far less than the 60 s grace
        assert not process_alive(pid)


class CreatesInAThread:
    """A runtime whose start does its work in a thread, as the Docker runtime creates a
    container: cancelling the awaiting task does not stop the thread from creating it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.created: list[ServerHandle] = []
        self.stopped: list[ServerHandle] = []
        self.creating = asyncio.Event()

    def _create(self, spec: ServerSpec) -> ServerHandle:
        time.sleep(0.3)  # the daemon creating and starting a container
        handle = ServerHandle(
            spec=spec, log_path=self.tmp_path / "x.log", started_at=0.0, container="c-0"
        )
        self.created.append(handle)
        return handle

    async def start(self, spec: ServerSpec) -> ServerHandle:
        self.creating.set()
        return await asyncio.to_thread(self._create, spec)

    async def stop(self, handle: ServerHandle, timeout: float) -> ServerStatus:
        self.stopped.append(handle)
        return ServerStatus(running=False)

    async def status(self, handle: ServerHandle) -> ServerStatus:
        return ServerStatus(running=True)

    async def last_log_line(self, handle: ServerHandle) -> str:
        return ""


async def test_a_shutdown_during_start_stops_what_the_start_created(tmp_path: Path) -> None:
    runtime = CreatesInAThread(tmp_path)
    supervisor = Supervisor(runtime, [SupervisedUnit(python_spec("replica-0", "pass"))], FAST)
    await supervisor.start()
    await asyncio.wait_for(runtime.creating.wait(), DEADLINE_S)

    await supervisor.shutdown()

    assert len(runtime.created) == 1
    assert runtime.stopped == runtime.created  # nothing orphaned
