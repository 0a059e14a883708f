"""Keep every replica (and the router) running, and tell the router which replicas to use.

One asyncio task per process: start it, wait for ``/health`` within a deadline, watch it, and
restart it with exponential backoff when it exits or stays unhealthy. A restart budget (at most
``max_restarts`` within ``window_s``) turns a crash loop into a FAILED replica that is reported,
instead of a fleet that silently burns GPUs forever. A restarted replica keeps its spec, so it
gets the same GPUs and port back.

Every runtime call is awaited (``vllm_fleet.launcher.runtime.base``): nothing here blocks the loop
that checks every replica's health.

The router learns about replicas only through the backends file, which lists the URLs of
replicas that passed their health check and were not declared dead since.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import aiohttp
from tenacity import AsyncRetrying, RetryError, retry_if_result, stop_after_delay, wait_fixed

from vllm_fleet.launcher.config import FleetConfig, RestartConfig
from vllm_fleet.launcher.plan_types import ReplicaSpec, RouterSpec, ServerSpec
from vllm_fleet.launcher.rundir import UnitRecord
from vllm_fleet.launcher.runtime.base import Runtime, ServerHandle


class UnitState(enum.Enum):
    LOADING = "loading"
    HEALTHY = "healthy"
    #: failed a health check but not yet ``unhealthy_threshold`` in a row.
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class SupervisedUnit:
    spec: ServerSpec
    health_path: str = "/health"

    @property
    def role(self) -> str:
        """The unit's role, from its spec's type: "replica" (listed in the backends file when
        healthy) or "router"; a unit cannot be one while its spec says the other."""
        return "replica" if isinstance(self.spec, ReplicaSpec) else "router"


@dataclass(frozen=True)
class SupervisorEvent:
    """A state change, or (``log_only``) just a new last log line while loading."""

    name: str
    role: str
    state: UnitState
    restarts: int
    message: str = ""
    last_log_line: str = ""
    log_only: bool = False


@dataclass(frozen=True)
class SupervisorSettings:
    health_timeout_s: float = 900.0
    health_interval_s: float = 2.0
    unhealthy_threshold: int = 3
    stop_timeout_s: float = 30.0
    request_timeout_s: float = 5.0
    restart: RestartConfig = field(default_factory=RestartConfig)

    @classmethod
    def from_config(cls, config: FleetConfig) -> SupervisorSettings:
        return cls(
            health_timeout_s=config.health_timeout_s,
            health_interval_s=config.health_interval_s,
            unhealthy_threshold=config.unhealthy_threshold,
            stop_timeout_s=config.stop_timeout_s,
            request_timeout_s=max(1.0, min(5.0, config.health_interval_s * 2)),
            restart=config.restart,
        )


class _Exited(Exception):
    def __init__(self, returncode: int | None) -> None:
        super().__init__(returncode)
        self.returncode = returncode


@dataclass
class _Unit:
    unit: SupervisedUnit
    state: UnitState = UnitState.LOADING
    handle: ServerHandle | None = None
    restarts: int = 0
    restart_times: collections.deque[float] = field(default_factory=collections.deque)
    last_log_line: str = ""
    message: str = ""
    #: set once the unit was HEALTHY or FAILED: the moment ``up`` can report on it.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.unit.spec.name


def backoff_delay(restart: RestartConfig, consecutive_failures: int) -> float:
    """initial, 2*initial, 4*initial ... capped at backoff_max_s (failures counted from 1)."""
    exponent = max(0, consecutive_failures - 1)
    return float(min(restart.backoff_max_s, restart.backoff_initial_s * (2**exponent)))


class Supervisor:
    def __init__(
        self,
        runtime: Runtime,
        units: Sequence[SupervisedUnit],
        settings: SupervisorSettings,
        on_backends: Callable[[list[str]], None] = lambda urls: None,
        on_event: Callable[[SupervisorEvent], None] = lambda event: None,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self._units = [_Unit(u) for u in units]
        self._on_backends = on_backends
        self._on_event = on_event
        self._published: list[str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Write an empty backends file, then start every unit (without waiting for health)."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s)
        )
        self._publish_backends()
        for u in self._units:
            u.task = asyncio.create_task(self._supervise(u), name=f"supervise-{u.name}")

    async def wait_settled(self) -> None:
        """Until every unit was healthy at least once or is FAILED."""
        await asyncio.gather(*(u.settled.wait() for u in self._units))

    async def shutdown(self) -> None:
        """Router first (no new traffic), then all replicas in parallel; idempotent."""
        self._stopping = True
        routers = [u for u in self._units if u.unit.role != "replica"]
        replicas = [u for u in self._units if u.unit.role == "replica"]
        for group in (routers, replicas):
            await asyncio.gather(*(self._stop_unit(u) for u in group))
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def kill_now(self) -> None:
        """Skip the grace period: the user asked twice. Stops already waiting see the groups
        vanish and return at once."""
        handles = [u.handle for u in self._units if u.handle is not None]
        await asyncio.gather(*(self.runtime.stop(h, 0.0) for h in handles))

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ----------------------------------------------------------------- views

    def healthy_urls(self) -> list[str]:
        return sorted(
            u.unit.spec.url
            for u in self._units
            if u.unit.role == "replica" and u.state in (UnitState.HEALTHY, UnitState.UNHEALTHY)
        )

    def states(self) -> dict[str, UnitState]:
        return {u.name: u.state for u in self._units}

    def records(self) -> list[UnitRecord]:
        return [
            UnitRecord(
                name=u.name,
                role=u.unit.role,
                port=u.unit.spec.port,
                url=u.unit.spec.url,
                gpus=tuple(u.unit.spec.gpus),
                model=u.unit.spec.served_model if isinstance(u.unit.spec, ReplicaSpec) else "",
                pgid=u.handle.pgid if u.handle is not None else None,
                container=(u.handle.container or "") if u.handle is not None else "",
                state=u.state.value,
                restarts=u.restarts,
                log=str(u.handle.log_path) if u.handle is not None else "",
                last_log_line=u.last_log_line,
            )
            for u in self._units
        ]

    # ----------------------------------------------------------------- one unit

    async def _stop_unit(self, u: _Unit) -> None:
        if u.task is not None and not u.task.done():
            u.task.cancel()
            await asyncio.gather(u.task, return_exceptions=True)
        if u.handle is not None:  # e.g. the task had already finished
            await self.runtime.stop(u.handle, self.settings.stop_timeout_s)
            u.handle = None
        if u.state is not UnitState.FAILED:
            self._set_state(u, UnitState.STOPPED, "")

    async def _supervise(self, u: _Unit) -> None:
        consecutive_failures = 0
        while not self._stopping:
            was_healthy, reason = await self._run_once(u)
            if self._stopping:
                return
            consecutive_failures = 1 if was_healthy else consecutive_failures + 1
            if not self._restart_allowed(u):
                r = self.settings.restart
                self._set_state(
                    u,
                    UnitState.FAILED,
                    f"{reason}; gave up after {r.max_restarts} restarts in {r.window_s:g}s",
                )
                u.settled.set()
                return
            delay = backoff_delay(self.settings.restart, consecutive_failures)
            u.restarts += 1
            u.restart_times.append(time.monotonic())
            self._set_state(u, UnitState.RESTARTING, f"{reason}; restarting in {delay:.1f}s")
            await asyncio.sleep(delay)

    def _restart_allowed(self, u: _Unit) -> bool:
        window = self.settings.restart.window_s
        now = time.monotonic()
        while u.restart_times and now - u.restart_times[0] > window:
            u.restart_times.popleft()
        return len(u.restart_times) < self.settings.restart.max_restarts

    async def _run_once(self, u: _Unit) -> tuple[bool, str]:
        """Start, wait for health, watch. Returns (was healthy, why it ended); always stops it."""
        try:
            handle = await self._start(u)
        except OSError as exc:
            return False, f"could not start: {exc}"
        u.handle = handle
        u.last_log_line = ""
        self._set_state(u, UnitState.LOADING, handle.describe())
        try:
            problem = await self._wait_healthy(u, handle)
            if problem is not None:
                return False, problem
            self._set_state(u, UnitState.HEALTHY, u.unit.spec.url)
            u.settled.set()
            return True, await self._watch(u, handle)
        finally:
            u.last_log_line = await self.runtime.last_log_line(handle) or u.last_log_line
            if u.state in (UnitState.HEALTHY, UnitState.UNHEALTHY) and not self._stopping:
                u.state = UnitState.RESTARTING
                self._publish_backends()
            await self.runtime.stop(handle, self.settings.stop_timeout_s)
            u.handle = None

    async def _start(self, u: _Unit) -> ServerHandle:
        """``runtime.start``, but a shutdown arriving meanwhile cannot orphan the server: the
        start runs on (a container may be half created) and what it started is stopped."""
        starting = asyncio.ensure_future(self.runtime.start(u.unit.spec))
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                handle = await starting
                await self.runtime.stop(handle, self.settings.stop_timeout_s)
            raise

    async def _wait_healthy(self, u: _Unit, handle: ServerHandle) -> str | None:
        timeout = self.settings.health_timeout_s
        retrying = AsyncRetrying(
            stop=stop_after_delay(timeout),
            wait=wait_fixed(self.settings.health_interval_s),
            retry=retry_if_result(lambda ok: not ok),
        )
        try:
            await retrying(self._loading_probe, u, handle)
        except RetryError:
            return f"not healthy within {timeout:g}s"
        except _Exited as exc:
            return f"exited with status {exc.returncode} while loading"
        return None

    async def _loading_probe(self, u: _Unit, handle: ServerHandle) -> bool:
        status = await self.runtime.status(handle)
        if not status.running:
            raise _Exited(status.returncode)
        line = await self.runtime.last_log_line(handle)
        if line and line != u.last_log_line:
            u.last_log_line = line
            self._emit(u, log_only=True)
        return await self._probe(u)

    async def _watch(self, u: _Unit, handle: ServerHandle) -> str:
        failures = 0
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            status = await self.runtime.status(handle)
            if not status.running:
                return f"exited with status {status.returncode}"
            if await self._probe(u):
                if failures:
                    self._set_state(u, UnitState.HEALTHY, "passing health checks again")
                failures = 0
                continue
            failures += 1
            if failures >= self.settings.unhealthy_threshold:
                return f"failed {failures} health checks in a row"
            if failures == 1:
                self._set_state(u, UnitState.UNHEALTHY, "health check failed")

    async def _probe(self, u: _Unit) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(u.unit.spec.url + u.unit.health_path) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    # ----------------------------------------------------------------- reporting

    def _set_state(self, u: _Unit, state: UnitState, message: str) -> None:
        u.state = state
        u.message = message
        if state in (UnitState.HEALTHY, UnitState.FAILED, UnitState.RESTARTING):
            self._publish_backends()
        self._emit(u)

    def _emit(self, u: _Unit, log_only: bool = False) -> None:
        self._on_event(
            SupervisorEvent(
                name=u.name,
                role=u.unit.role,
                state=u.state,
                restarts=u.restarts,
                message=u.message,
                last_log_line=u.last_log_line,
                log_only=log_only,
            )
        )

    def _publish_backends(self) -> None:
        urls = self.healthy_urls()
        if urls != self._published:
            self._published = urls
            self._on_backends(urls)


def units_for(replicas: Iterable[ReplicaSpec], router: RouterSpec | None) -> list[SupervisedUnit]:
    units = [SupervisedUnit(spec) for spec in replicas]
    if router is not None:
        units.append(SupervisedUnit(router, health_path=ROUTER_HEALTH_PATH))
    return units


#: the router's liveness endpoint: it answers while serving, healthy backends or not.
ROUTER_HEALTH_PATH = "/health"
