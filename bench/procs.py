"""Child processes of the benchmark: start on free loopback ports, wait ready, always stop.

Every program the harness starts (simulators, routers, nginx, HAProxy, vLLM) goes through
`ChildProcess`, so there is one place that guarantees a process group per child, a log file per
child, and SIGTERM-then-SIGKILL on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ChildProcess:
    """One program in its own process group, output to `log`; `stop()` is idempotent."""

    def __init__(
        self,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 5) -> str:
        """Last lines of the log, for "why did it not start" messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])[-400:]

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, for failover scenarios."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        # Children that outlive their parent (nginx workers) die with the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of `pid` and all its live descendants (nginx/HAProxy work in children)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry.name))
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        total += times.get(current, 0.0)
        stack.extend(children.get(current, ()))
    return total


def own_cpu_seconds() -> float:
    """CPU of this process plus every child it has reaped (and theirs): the benchmark's own."""
    stat = Path("/proc/self/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (
        sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
        + tree_cpu_seconds(os.getpid())
        - (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    )


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat), to see what else ran."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLOCK_TICKS


async def wait_http(
    url: str,
    deadline_s: float,
    child: ChildProcess | None = None,
    accept: tuple[int, ...] = (200,),
) -> None:
    """Poll GET `url` until its status is in `accept`.

    Raises RuntimeError when the child exits first, TimeoutError after `deadline_s`.
    """
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while True:
            if child is not None and not child.alive():
                raise RuntimeError(f"exited with status {child.proc.returncode}: {child.tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(url) as response:
                    if response.status in accept:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready within {deadline_s:.0f}s")
            await asyncio.sleep(0.1)
