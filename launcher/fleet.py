"""Run one fleet in the foreground: replicas + router under the supervisor, until told to stop.

This is the glue shared by ``vllm-fleet up`` and ``vllm-fleet demo``: it wires the supervisor's
events to the terminal and to ``state.json``, its healthy set to the router's backends file, and
SIGINT/SIGTERM to an orderly teardown (router first, then replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO, cast

import aiohttp

from vllm_fleet.launcher.config import FleetConfig
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.fleet_models import model_label as fleet_model_label
from vllm_fleet.launcher.plan_types import ReplicaSpec, RouterSpec
from vllm_fleet.launcher.rundir import FleetState, RunDir
from vllm_fleet.launcher.runtime.base import Runtime
from vllm_fleet.launcher.runtime.docker import DockerRuntime, docker_fleet_runtime
from vllm_fleet.launcher.runtime.process import ProcessRuntime, group_members, process_alive
from vllm_fleet.launcher.supervisor import (
    Supervisor,
    SupervisorEvent,
    SupervisorSettings,
    UnitState,
    units_for,
)
from vllm_fleet.launcher.vllm_args import kv_replay_port

#: how often a loading replica's newest log line is echoed at most (state changes always are).
LOG_ECHO_INTERVAL_S = 5.0
#: how long the router may take to list the healthy replicas once they are up.
ROUTER_READY_TIMEOUT_S = 60.0
ROUTER_NAME = "router"
#: ``runtime: docker`` with the sim engine: the router image carries the whole CLI, simulator
#: included (the engine images do not); the same default as `vllm-fleet compose --engine sim`.
SIM_ENGINE_IMAGE = "vllm-fleet-router:0.1.0"

#: called once the fleet is ready; returning an int ends the run with that status (demo --smoke).
AfterReady = Callable[[FleetState], Awaitable[int | None]]


def router_spec(config: FleetConfig, backends_file: Path) -> RouterSpec:
    """The router as one more supervised process; API keys travel in its environment so they
    do not show up in ``ps``."""
    r = config.router
    command = [
        sys.executable,
        "-m",
        "vllm_fleet.launcher.cli",
        "router",
        "--host",
        r.host,
        "--port",
        str(r.port),
        "--backends-file",
        str(backends_file),
        # the file is local and tiny: re-read it often so a healthy replica gets traffic soon.
        "--discovery-interval",
        "0.5",
    ]
    if r.policy:
        command += ["--policy", r.policy]
    if not any(a.split("=", 1)[0] == "--kv-events" for a in r.extra_args):
        # the replicas we start publish KV events (vllm_args): the router asks each where.
        command += ["--kv-events", "auto"]
    if r.workers != 1:
        command += ["--workers", str(r.workers)]
    env = {"FLEET_API_KEYS": ",".join(r.api_keys)} if r.api_keys else {}
    return RouterSpec(
        name=ROUTER_NAME,
        host=r.host,
        port=r.port,
        command=(*command, *r.extra_args),
        env=env,
        backends_file=str(backends_file),
    )


def ensure_no_fleet(run_dir: RunDir) -> None:
    """One fleet per run directory, and none over the leftovers of a crashed one."""
    state = run_dir.read_state()
    if state is None:
        return
    flag = f"--run-dir {run_dir.path}"
    if process_alive(state.supervisor_pid):
        raise ConfigError(
            f"{flag}: a fleet is already running there (supervisor pid {state.supervisor_pid}); "
            f"stop it with `vllm-fleet down {flag}` or pass another --run-dir"
        )
    leftovers = [f"{u.name} pgid {u.pgid}" for u in state.units if u.pgid and group_members(u.pgid)]
    if leftovers:
        raise ConfigError(
            f"{flag}: processes of a fleet whose supervisor died are still running "
            f"({', '.join(leftovers)}); clean up with `vllm-fleet down {flag}`"
        )


def ensure_ports_free(replicas: Sequence[ReplicaSpec], config: FleetConfig) -> None:
    """Fail before starting anything: a taken port would otherwise become a crash loop."""
    wanted = [(spec.name, config.host, spec.port, "--base-port") for spec in replicas]
    for spec in replicas:
        if spec.kv_events_port is not None:
            events, replay = spec.kv_events_port, kv_replay_port(spec.kv_events_port)
            wanted.append((f"{spec.name} KV events", config.host, events, "--base-port"))
            wanted.append((f"{spec.name} KV events replay", config.host, replay, "--base-port"))
    wanted.append((ROUTER_NAME, config.router.host, config.router.port, "--port"))
    for name, host, port, flag in wanted:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host if host not in ("", "::") else "0.0.0.0", port))
            except OSError:
                raise ConfigError(
                    f"{flag}: port {port} ({name}) is already in use; pick a free one with {flag}"
                ) from None


def docker_image_environ(config: FleetConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment ``docker_fleet_runtime`` reads its engine images from, with the fleet's
    choice applied: ``image`` (file or --image) beats VLLM_FLEET_{CPU,GPU}_IMAGE, which beat the
    runtime's defaults; the sim engine defaults to the image that has the simulator."""
    env = dict(environ)
    if config.image:
        env["VLLM_FLEET_CPU_IMAGE"] = env["VLLM_FLEET_GPU_IMAGE"] = config.image
    elif config.engine == "sim" and not env.get("VLLM_FLEET_CPU_IMAGE"):
        env["VLLM_FLEET_CPU_IMAGE"] = SIM_ENGINE_IMAGE
    return env


def make_runtime(
    config: FleetConfig,
    run_dir: RunDir,
    replicas: Sequence[ReplicaSpec],
    environ: Mapping[str, str] | None = None,
) -> Runtime:
    """The runtime ``config.runtime`` names, able to start ``replicas``.

    Docker: the engines in containers labelled with the run directory's fleet name, the router
    a host process. The daemon and every image are checked here, before anything starts: a
    missing image is one error line, not a replica crash-looping on ``docker create``.
    """
    if config.runtime == "process":
        return ProcessRuntime(run_dir.logs_dir)
    env = docker_image_environ(config, os.environ if environ is None else environ)
    runtime = docker_fleet_runtime(run_dir.path, run_dir.logs_dir, environ=env)
    # docker_fleet_runtime builds the engines' runtime as a DockerRuntime (the router: .host).
    cast(DockerRuntime, runtime.containers).check_images(replicas)
    return runtime


class ProgressPrinter:
    """One line per state change, plus a loading replica's newest log line now and then."""

    def __init__(self, out: TextIO, supervisor: Supervisor | None = None) -> None:
        self.out = out
        self.supervisor = supervisor
        self._echoed_at: dict[str, float] = {}

    def __call__(self, event: SupervisorEvent) -> None:
        now = time.monotonic()
        if event.log_only:
            if now - self._echoed_at.get(event.name, -1e9) < LOG_ECHO_INTERVAL_S:
                return
            line = f"{event.name}: {event.state.value} | {_trim(event.last_log_line)}"
        else:
            line = f"{event.name}: {event.state.value}"
            if event.message:
                line += f" ({event.message})"
            if event.last_log_line and event.state in (
                UnitState.RESTARTING,
                UnitState.FAILED,
                UnitState.UNHEALTHY,
            ):
                line += f" | last log: {_trim(event.last_log_line)}"
        self._echoed_at[event.name] = now
        self.print(f"{line}{self._summary()}")

    def print(self, line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", file=self.out, flush=True)

    def _summary(self) -> str:
        if self.supervisor is None:
            return ""
        states = [r.state for r in self.supervisor.records() if r.role == "replica"]
        counts = {s: states.count(s) for s in dict.fromkeys(states)}
        return "  [" + ", ".join(f"{n} {s}" for s, n in counts.items()) + "]"


def _trim(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FleetRun:
    """One fleet's lifetime in this process; ``run()`` returns the exit status."""

    def __init__(
        self,
        config: FleetConfig,
        replicas: Sequence[ReplicaSpec],
        run_dir: RunDir,
        out: TextIO = sys.stdout,
        model_label: str = "",
        after_ready: AfterReady | None = None,
        handle_signals: bool = True,
        runtime: Runtime | None = None,
    ) -> None:
        self.config = config
        self.replicas = tuple(replicas)
        self.run_dir = run_dir
        self.out = out
        self.model_label = model_label or fleet_model_label(config)
        self.after_ready = after_ready
        self.handle_signals = handle_signals
        self.stop_requested = asyncio.Event()
        self._kill_task: asyncio.Future[None] | None = None
        self.status = "starting"
        self.message = ""
        self.started_at = time.time()
        self.router = router_spec(config, run_dir.backends_path.resolve())
        if runtime is None:
            runtime = make_runtime(config, run_dir, self.replicas)
        self.printer = ProgressPrinter(out)
        self.supervisor = Supervisor(
            runtime,
            units_for(self.replicas, self.router),
            SupervisorSettings.from_config(config),
            on_backends=run_dir.write_backends,
            on_event=self._on_event,
        )
        self.printer.supervisor = self.supervisor

    def request_stop(self) -> None:
        """First signal: orderly stop. Another one while stopping: kill everything now."""
        if not self.stop_requested.is_set():
            self.stop_requested.set()
        elif self.status == "stopping" and self._kill_task is None:
            self.printer.print("stop requested again: killing the remaining processes")
            self._kill_task = asyncio.ensure_future(self.supervisor.kill_now())

    def state(self) -> FleetState:
        return FleetState(
            supervisor_pid=os.getpid(),
            status=self.status,
            router_url=self.config.router_url,
            model=self.model_label,
            engine=self.config.engine,
            started_at=self.started_at,
            units=tuple(self.supervisor.records()),
            message=self.message,
            stop_timeout_s=self.config.stop_timeout_s,
            runtime=self.config.runtime,
        )

    def _on_event(self, event: SupervisorEvent) -> None:
        self.printer(event)
        self._write_state()

    def _write_state(self) -> None:
        self.run_dir.write_state(self.state())

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if self.handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        self.run_dir.create()
        self._write_state()
        try:
            await self.supervisor.start()
            status = await self._unless_stopped(self._become_ready())
            if status is None and self.after_ready is not None:
                status = await self._unless_stopped(self.after_ready(self.state()))
            if status is None:
                await self.stop_requested.wait()
                status = 0
            return status
        finally:
            self.status = "stopping"
            self.printer.print("stopping fleet (router first, then replicas)")
            self._write_state()
            await self.supervisor.shutdown()
            if self._kill_task is not None:
                await self._kill_task
            self.run_dir.clear_state()
            self.printer.print("fleet stopped")
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _unless_stopped(self, work: Awaitable[int | None]) -> int | None:
        task = asyncio.ensure_future(work)
        stopper = asyncio.create_task(self.stop_requested.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return 0
        return task.result()

    async def _become_ready(self) -> int | None:
        """None when ready; an exit status when the fleet cannot become ready."""
        await self.supervisor.wait_settled()
        states = self.supervisor.states()
        replicas = [s.name for s in self.replicas]
        if states[ROUTER_NAME] is UnitState.FAILED:
            return self._fail(f"the router failed to start; see {self.run_dir.logs_dir}/router.log")
        if all(states[n] is UnitState.FAILED for n in replicas):
            return self._fail(f"no replica became healthy; see the logs in {self.run_dir.logs_dir}")
        if not await self._router_ready():
            return self._fail(
                f"the router at {self.config.router_url} did not report ready within "
                f"{ROUTER_READY_TIMEOUT_S:g}s; see {self.run_dir.logs_dir}/router.log"
            )
        healthy = len(self.supervisor.healthy_urls())
        # Printed before the state says "ready": `up --detach` echoes this log until it reads
        # that state, so the line must already be in the log by then.
        self.printer.print(
            f"Fleet ready: {self.config.router_url}/v1 ({healthy}/{len(replicas)} replicas healthy)"
        )
        self.status = "ready"
        self.message = f"{healthy}/{len(replicas)} replicas healthy"
        self._write_state()
        return None

    def _fail(self, message: str) -> int:
        self.status = "failed"
        self.message = message
        self._write_state()
        self.printer.print(f"Fleet failed: {message}")
        return 1

    async def _router_ready(self) -> bool:
        """The router re-reads the backends file and checks health on its own clock; wait until
        it has admitted every replica the supervisor found healthy, so "ready" means a burst of
        requests right away spreads over all of them (its /ready counts healthy replicas)."""
        deadline = time.monotonic() + ROUTER_READY_TIMEOUT_S
        url = f"{self.config.router_url}/ready"
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                wanted = len(self.supervisor.healthy_urls())
                with contextlib.suppress(
                    aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError
                ):
                    async with session.get(url) as resp:
                        body = await resp.json(content_type=None)
                        if resp.status == 200 and int(body.get("healthy", 0)) >= wanted:
                            return True
                await asyncio.sleep(0.1)
        return False
