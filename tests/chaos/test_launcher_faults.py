"""Replica processes that fail in the ways tests/launcher/test_supervisor.py does not cover.

Covered there: a crash loop at start exhausting the budget, a SIGKILLed replica restarted on
its port, an unhealthy replica restarted, a never-healthy replica, SIGTERM ignored at shutdown.
Here: the backoff actually spacing the restarts, a replica that crashes again and again after
becoming healthy, a replica whose worker process outlives its crashed leader, and a replica
that ignores SIGTERM while being restarted (not at shutdown). Every test ends with no process
of any started group alive.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import textwrap
from pathlib import Path

from tests.chaos.conftest import FIGURES
from tests.launcher.support import pgid
from tests.launcher.test_supervisor import DEADLINE_S, Harness, sim_spec, supervised, until
from tests.support.ports import free_port
from tests.support.sim import post_control
from vllm_fleet.launcher.config import RestartConfig
from vllm_fleet.launcher.plan_types import ReplicaSpec
from vllm_fleet.launcher.runtime.process import group_members, process_alive
from vllm_fleet.launcher.supervisor import (
    SupervisedUnit,
    SupervisorSettings,
    UnitState,
    backoff_delay,
)

#: Serves GET /health with 200 on argv[1]; with argv[2] = seconds, exits 3 after that long
#: (a crash after becoming healthy); with argv[3] = a path, first starts a worker process in
#: the same group that ignores SIGTERM and writes its pid there (like vLLM's engine workers).
SERVER = """
    import os, signal, subprocess, sys, threading, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    port, crash_after, worker_pid_file = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    if worker_pid_file != "-":
        worker = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
        with open(worker_pid_file, "a") as f:
            f.write(f"{worker.pid}\\n")
    if os.environ.get("IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if not os.path.exists(sys.argv[4]) else 503)
            self.end_headers()
        def log_message(self, *args):
            pass
    if crash_after > 0:
        threading.Timer(crash_after, lambda: os._exit(3)).start()
    HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def server_spec(
    name: str,
    *,
    crash_after_s: float = 0.0,
    worker_pid_file: Path | None = None,
    unhealthy_flag: Path,
    ignore_sigterm: bool = False,
) -> ReplicaSpec:
    port = free_port()
    command = (
        sys.executable, "-c", textwrap.dedent(SERVER), str(port), str(crash_after_s),
        str(worker_pid_file) if worker_pid_file else "-", str(unhealthy_flag),
    )  # fmt: skip
    env = (("IGNORE_SIGTERM", "1"),) if ignore_sigterm else ()
    return ReplicaSpec(
        name=name, host="127.0.0.1", port=port, model="test-model", command=command, env=dict(env)
    )


def assert_no_orphans(h: Harness, extra_pids: tuple[int, ...] = ()) -> None:
    for handle in h.runtime.started:
        assert group_members(pgid(handle)) == [], f"group {pgid(handle)} still has processes"
    for pid in extra_pids:
        assert not process_alive(pid), f"worker {pid} outlived its replica"


def settings(max_restarts: int, **overrides: float) -> SupervisorSettings:
    values: dict[str, float] = {
        "health_timeout_s": 15.0,
        "health_interval_s": 0.1,
        "unhealthy_threshold": 2,
        "stop_timeout_s": 1.0,
        "request_timeout_s": 1.0,
        **overrides,
    }
    return SupervisorSettings(
        **values,  # type: ignore[arg-type]
        restart=RestartConfig(
            max_restarts=max_restarts, backoff_initial_s=0.2, backoff_max_s=0.8, window_s=60.0
        ),
    )


async def test_backoff_spaces_the_restarts_of_a_crash_loop(tmp_path: Path) -> None:
    crash = ReplicaSpec(
        name="crasher",
        host="127.0.0.1",
        model="test-model",
        port=free_port(),
        gpus=(),
        tensor_parallel_size=1,
        command=(sys.executable, "-c", "import sys; sys.exit(1)"),
    )
    chosen = settings(4)
    async with supervised(tmp_path, [SupervisedUnit(crash)], chosen) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)
        assert h.supervisor.states()["crasher"] is UnitState.FAILED
        starts = [handle.started_at for handle in h.runtime.started]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        wanted = [backoff_delay(chosen.restart, n) for n in range(1, len(starts))]
        assert wanted == [0.2, 0.4, 0.8, 0.8]
        assert all(gap >= delay for gap, delay in zip(gaps, wanted, strict=True)), (gaps, wanted)
        assert_no_orphans(h)
    FIGURES["launcher_backoff"] = {
        "restart_gaps_s": [round(g, 2) for g in gaps],
        "backoff_s": wanted,
    }


async def test_a_replica_crashing_after_each_start_exhausts_the_budget(tmp_path: Path) -> None:
    flag = tmp_path / "unhealthy"
    spec = server_spec("flaky", crash_after_s=0.8, unhealthy_flag=flag)
    async with supervised(tmp_path, [SupervisedUnit(spec)], settings(2)) as h:
        await until(lambda: h.supervisor.states()["flaky"] is UnitState.FAILED, "FAILED", 60.0)
        states = h.states_of("flaky")
        assert states.count(UnitState.HEALTHY) == 3  # healthy after each of the 3 starts
        assert states[-1] is UnitState.FAILED
        assert "exited with status 3" in h.events[-1].message
        assert "gave up after 2 restarts" in h.events[-1].message
        assert all(urls in ([], [spec.url]) for urls in h.backends)
        assert h.backends[-1] == []  # a failed replica is not offered to the router
        assert_no_orphans(h)


async def test_a_worker_outliving_its_crashed_leader_is_killed_before_the_restart(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "unhealthy"
    workers = tmp_path / "workers"
    spec = server_spec("leader", crash_after_s=0.8, worker_pid_file=workers, unhealthy_flag=flag)
    async with supervised(tmp_path, [SupervisedUnit(spec)], settings(3)) as h:
        await until(lambda: len(h.runtime.started) >= 2, "a restart", 60.0)
        first_worker = int(workers.read_text().split()[0])
        # The leader died on its own; its worker ignored SIGTERM, so it took a SIGKILL of the
        # whole group before the new leader could take the port (and the GPUs) back.
        assert not process_alive(first_worker)
        await until(lambda: h.supervisor.states()["leader"] is UnitState.HEALTHY, "healthy")
        await h.supervisor.shutdown()
        all_workers = [int(p) for p in workers.read_text().split()]
        assert_no_orphans(h, tuple(all_workers))
    FIGURES["launcher_orphans"] = {"workers_started": len(all_workers), "left_alive": 0}


async def test_a_replica_ignoring_sigterm_is_killed_when_restarted(tmp_path: Path) -> None:
    flag = tmp_path / "unhealthy"
    spec = server_spec("stubborn", unhealthy_flag=flag, ignore_sigterm=True)
    chosen = settings(3, stop_timeout_s=0.5)
    async with supervised(tmp_path, [SupervisedUnit(spec)], chosen) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)
        first = h.handle_of("stubborn")
        flag.write_text("1")  # /health turns 503: the supervisor restarts it
        await until(lambda: not process_alive(pgid(first)), "the stubborn process to be killed")
        assert h.runtime.stop_order[0] == "stubborn"
        flag.unlink()
        await until(
            lambda: (
                len(h.runtime.started) >= 2
                and h.supervisor.states()["stubborn"] is UnitState.HEALTHY
            ),
            "the restarted replica to be healthy",
        )
        assert pgid(h.handle_of("stubborn")) != pgid(first)
        restarting = [e for e in h.events if e.state is UnitState.RESTARTING]
        assert "failed 2 health checks in a row" in restarting[0].message
    assert_no_orphans(h)


async def test_a_sim_replica_made_unhealthy_is_replaced_and_serves_again(tmp_path: Path) -> None:
    """End to end with the real simulator process: unhealthy -> restarted -> serving."""
    spec = sim_spec("replica-0")
    async with supervised(tmp_path, [SupervisedUnit(spec)], settings(2)) as h:
        await asyncio.wait_for(h.supervisor.wait_settled(), DEADLINE_S)
        first = pgid(h.handle_of("replica-0"))
        await post_control(spec.url, hang=True)  # accepts, never answers: checks time out
        await until(lambda: pgid(h.handle_of("replica-0")) != first, "a replacement", 60.0)
        await until(
            lambda: h.supervisor.states()["replica-0"] is UnitState.HEALTHY, "healthy again", 60.0
        )
        assert not process_alive(first)
    assert_no_orphans(h)
