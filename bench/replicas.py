"""The replicas a scenario routes to: simulated vLLM servers or real vLLM on the CPU.

Each replica is a child process on its own loopback port, so a router under test cannot tell
it from a real deployment, and a crash is a real crash (SIGKILL, port closed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp

from tests.support.metrics import metric_value, parse_samples
from tests.support.ports import free_port, free_port_run
from tests.support.procs import ChildProcess, wait_http
from tests.support.sim import get_stats, post_control, sim_command
from vllm_fleet.launcher.commands.demo import tiny_cpu_plan
from vllm_fleet.launcher.commands.plan import host_cpus


@dataclass(frozen=True)
class SimSettings:
    """The simulator flags a scenario chooses (see `vllm-fleet sim --help`)."""

    model: str = "sim-model"
    max_num_seqs: int = 16
    step_ms: float = 20.0
    batch_slowdown: float = 0.05
    speed: float = 1.0
    #: KV capacity and context length (None: the simulator's defaults).
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None
    #: vLLM's --scheduling-policy (None: the simulator's default, fcfs).
    scheduling_policy: str | None = None


@dataclass
class SimReplica:
    """One `vllm-fleet sim` process; `kill()` then `start()` brings it back on the same port."""

    settings: SimSettings
    workdir: Path
    python: str = sys.executable
    port: int = field(default_factory=free_port)
    #: VLLM_SERVER_DEV_MODE=1: serves POST /reset_prefix_cache (the prefix scenario's reset).
    dev_mode: bool = False
    child: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        flags = {k: v for k, v in dataclasses.asdict(self.settings).items() if v is not None}
        argv = sim_command(self.port, self.python, **flags)
        self.child = ChildProcess(argv, self.workdir / f"sim-{self.port}.log")
        await wait_http(f"{self.url}/health", 30.0, self.child)

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    async def control(self, **knobs: float | bool) -> None:
        await post_control(self.url, **knobs)

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, int]:
        return await get_stats(self.url, session)


@dataclass
class SimFleet:
    """The replicas of one scenario, started together and stopped together."""

    replicas: list[SimReplica]

    @classmethod
    def of(cls, settings: list[SimSettings], workdir: Path, python: str) -> SimFleet:
        return cls([SimReplica(s, workdir, python) for s in settings])

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    async def start(self) -> None:
        await asyncio.gather(*(r.start() for r in self.replicas))

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    async def received(self) -> list[int]:
        """Requests each replica has received so far (its lifetime counter)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            out = []
            for replica in self.replicas:
                try:
                    out.append((await replica.stats(session))["received"])
                except (aiohttp.ClientError, TimeoutError):
                    out.append(-1)
            return out

    async def prefix_counters(self) -> list[tuple[float, float]]:
        return await prefix_counters(self.urls)

    async def reset_prefix_caches(self, deadline_s: float = 30.0) -> None:
        await reset_prefix_caches(self.urls, deadline_s)

    async def reset_speeds(self) -> None:
        for replica in self.replicas:
            await replica.control(speed=replica.settings.speed)

    async def wait_idle(self, deadline_s: float = 30.0) -> None:
        """Wait until no replica runs or queues anything (bounded), so runs do not overlap."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while loop.time() < deadline:
                busy = 0
                for replica in self.replicas:
                    try:
                        stats = await replica.stats(session)
                    except (aiohttp.ClientError, TimeoutError):
                        continue
                    busy += stats["running"] + stats["waiting"]
                if busy == 0:
                    return
                await asyncio.sleep(0.1)


async def prefix_counters(urls: list[str]) -> list[tuple[float, float]]:
    """Per replica, its `vllm:prefix_cache_hits_total` and `queries_total` (tokens) so far:
    the hit rate a scenario reports is the replicas' own, not a router's estimate."""
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for url in urls:
            async with session.get(f"{url}/metrics") as response:
                samples = parse_samples(await response.text())
            out.append(
                (
                    metric_value(samples, "vllm:prefix_cache_hits_total"),
                    metric_value(samples, "vllm:prefix_cache_queries_total"),
                )
            )
    return out


async def reset_prefix_caches(urls: list[str], deadline_s: float = 30.0) -> None:
    """Empty every replica's prefix cache (`POST /reset_prefix_cache`; real vLLM serves it in
    dev mode), so a router never finds what the one before it left cached. Replicas refuse
    (409) while requests run: wait for idle and retry, bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for url in urls:
            while True:
                async with session.post(f"{url}/reset_prefix_cache") as response:
                    if response.status == 200:
                        break
                    if response.status != 409 or loop.time() > deadline:
                        response.raise_for_status()
                        raise TimeoutError(f"{url} kept refusing to reset its cache")
                await asyncio.sleep(0.2)


# -- real vLLM on the CPU -------------------------------------------------------------------

#: Served name of vllm_fleet.launcher.tiny_model's model.
TINY_MODEL = "tiny-llama"


def vllm_python_candidates(repo: Path) -> list[str]:
    """Interpreters that may have vLLM: $BENCH_VLLM_PYTHON, the project's .venv, /work/venv."""
    found = [os.environ.get("BENCH_VLLM_PYTHON", ""), str(repo / ".venv" / "bin" / "python")]
    found.append("/work/venv/bin/python")
    return [p for p in found if p and Path(p).exists()]


def find_vllm_python(repo: Path) -> str:
    """The first interpreter that imports vllm, or "" when none does."""
    for python in vllm_python_candidates(repo):
        check = subprocess.run(
            [python, "-c", "import vllm"], capture_output=True, timeout=120, check=False
        )
        if check.returncode == 0:
            return python
    return ""


@dataclass
class VllmReplica:
    """Real vLLM serving the tiny model on the CPU, started as `up` starts a replica."""

    model_dir: Path
    python: str
    #: how many replicas share the machine (sizes each one's OpenMP threads).
    replicas: int
    workdir: Path
    #: its HTTP port, with its KV events and replay ports free too (tests.support.ports).
    port: int = field(default_factory=lambda: free_port_run(1))
    #: VLLM_SERVER_DEV_MODE=1: serves POST /reset_prefix_cache (the prefix scenario's reset).
    dev_mode: bool = False
    child: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, deadline_s: float = 300.0) -> None:
        """Start with the command line and environment the planner gives `up` and the demo
        (this replica is the first of `replicas` sharing this machine)."""
        layout = tiny_cpu_plan(
            str(self.model_dir), replicas=self.replicas, base_port=self.port,
            python=self.python, cpus=host_cpus(),
        )  # fmt: skip
        spec = layout.replicas[0]
        log = self.workdir / f"vllm-{self.port}.log"
        env = {**os.environ, **spec.env}
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        self.child = ChildProcess(list(spec.command), log, env=env)
        await wait_http(f"{self.url}/health", deadline_s, self.child)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(grace=10.0)


@dataclass
class VllmFleet:
    """Real vLLM replicas; counters come from their Prometheus /metrics."""

    replicas: list[VllmReplica]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    async def start(self) -> None:
        # One at a time: two engines compiling and profiling at once on two cores take longer
        # than one after the other.
        for replica in self.replicas:
            await replica.start()

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    async def _gauges(self, names: tuple[str, ...]) -> list[float]:
        """Per replica, the sum of the samples `names` on its /metrics (-1 if unreachable)."""
        out = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for replica in self.replicas:
                try:
                    async with session.get(f"{replica.url}/metrics") as response:
                        samples = parse_samples(await response.text())
                except (aiohttp.ClientError, TimeoutError):
                    out.append(-1.0)
                    continue
                out.append(sum(metric_value(samples, name) for name in names))
        return out

    async def prefix_counters(self) -> list[tuple[float, float]]:
        return await prefix_counters(self.urls)

    async def reset_prefix_caches(self, deadline_s: float = 60.0) -> None:
        await reset_prefix_caches(self.urls, deadline_s)

    async def received(self) -> list[int]:
        totals = await self._gauges(
            (
                "vllm:request_success_total",
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
            )
        )
        return [int(t) for t in totals]

    async def wait_idle(self, deadline_s: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        while loop.time() < deadline:
            busy = await self._gauges(("vllm:num_requests_running", "vllm:num_requests_waiting"))
            if all(b <= 0 for b in busy):
                return
            await asyncio.sleep(0.2)


class Fleet(Protocol):
    """What a scenario needs from its replicas, simulated or real."""

    @property
    def urls(self) -> list[str]: ...

    async def received(self) -> list[int]: ...

    async def wait_idle(self, deadline_s: float = ...) -> None: ...


class PrefixFleet(Fleet, Protocol):
    """Replicas whose prefix caches a scenario empties and counts (simulated or real)."""

    async def prefix_counters(self) -> list[tuple[float, float]]: ...

    async def reset_prefix_caches(self, deadline_s: float = ...) -> None: ...
