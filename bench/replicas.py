"""The replicas a scenario routes to: simulated vLLM servers or real vLLM on the CPU.

Each replica is a child process on its own loopback port, so a router under test cannot tell
it from a real deployment, and a crash is a real crash (SIGKILL, port closed).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.procs import ChildProcess, free_port, wait_http


@dataclass(frozen=True)
class SimSettings:
    """The simulator flags a scenario chooses (see `vllm-fleet sim --help`)."""

    model: str = "sim-model"
    max_num_seqs: int = 16
    step_ms: float = 20.0
    batch_slowdown: float = 0.05
    speed: float = 1.0


@dataclass
class SimReplica:
    """One `vllm-fleet sim` process; `kill()` then `start()` brings it back on the same port."""

    settings: SimSettings
    workdir: Path
    python: str = sys.executable
    port: int = field(default_factory=free_port)
    child: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        s = self.settings
        argv = [
            self.python, "-m", "launcher.cli", "sim",
            "--host", "127.0.0.1", "--port", str(self.port), "--model", s.model,
            "--max-num-seqs", str(s.max_num_seqs), "--step-ms", str(s.step_ms),
            "--batch-slowdown", str(s.batch_slowdown), "--speed", str(s.speed),
        ]  # fmt: skip
        self.child = ChildProcess(argv, self.workdir / f"sim-{self.port}.log")
        await wait_http(f"{self.url}/health", 30.0, self.child)

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    async def control(self, session: aiohttp.ClientSession, **knobs: float | bool) -> None:
        async with session.post(f"{self.url}/sim/control", json=knobs) as response:
            response.raise_for_status()

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, int]:
        async with session.get(f"{self.url}/sim/stats") as response:
            response.raise_for_status()
            result: dict[str, int] = await response.json()
            return result


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

    async def reset_speeds(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for replica in self.replicas:
                await replica.control(session, speed=replica.settings.speed)

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
