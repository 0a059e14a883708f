"""Programs a test or the benchmark starts: one process group each, output to a log file,
ready once an HTTP probe answers, always stopped with the whole group.

    child = ChildProcess([sys.executable, "-m", "vllm_fleet.launcher.cli", "sim", ...],
        tmp_path / "sim.log")
    try:
        await wait_http(f"{url}/health", 10.0, child)   # fails at once if the child exits
        ...
    finally:
        child.stop()

The benchmark (bench/) runs every simulator, router, nginx, HAProxy and vLLM through this class
too, so a fix to starting or stopping lands in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

from vllm_fleet.launcher.runtime.process import signal_group, stop_process_group

#: How long a child stopped without a grace of its own gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 5.0


class ChildProcess:
    """One program in its own process group (session), stdout and stderr to `log`.

    `stop()` (SIGTERM, then SIGKILL for what is left) and `kill()` (SIGKILL at once: a crash)
    act on the whole group, so helpers a program forks (nginx workers, vLLM's engine core) go
    with it; both are idempotent.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: a chatty child can never block on a full pipe.
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 5) -> str:
        """Last lines of the log on one line, for "why did it not start" messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])[-400:]

    def kill(self) -> None:
        """SIGKILL the whole group at once and reap the leader: a crash."""
        signal_group(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_GRACE_S)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the group, SIGKILL whatever is left after `grace` seconds."""
        stop_process_group(self.proc.pid, grace, reap=self.proc)


async def wait_http(
    url: str,
    deadline_s: float,
    child: ChildProcess | None = None,
    accept: tuple[int, ...] = (200,),
    interval_s: float = 0.1,
) -> None:
    """Poll GET `url` until its status is in `accept`.

    RuntimeError (with the log's tail) when `child` exits first, TimeoutError after `deadline_s`.
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
            await asyncio.sleep(interval_s)
