"""The interface between the supervisor and whatever actually runs a server (replica or router).

The supervisor only needs to start, stop, poll and peek at the log of a server; keeping that
surface this small is what lets a container runtime slot in without touching it.

Every method is a coroutine: the supervisor runs one asyncio loop for every replica's health
checks, and one blocking call there (a Docker daemon request, a process group that takes
seconds to exit) would stall all of them. An implementation does its blocking work with
``asyncio.to_thread`` or asyncio's own subprocess and sleep; it never blocks the loop itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vllm_fleet.launcher.plan_types import ServerSpec


@dataclass
class ServerHandle:
    """One started server: a host process group, or a container. Exactly one of ``pgid`` and
    ``container`` is set, so nobody signals a container's pid as if it were a process group."""

    spec: ServerSpec
    log_path: Path
    #: time.monotonic() when started.
    started_at: float
    #: process-group id of a host process (its pid too: each server is its own session);
    #: signalling the group reaches the engine's worker processes as well.
    pgid: int | None = None
    #: name of the container it runs in (``docker logs -f NAME``).
    container: str | None = None

    def describe(self) -> str:
        """For progress lines: "pgid 4242" or "container vllm-fleet-...-replica-0"."""
        return f"pgid {self.pgid}" if self.pgid is not None else f"container {self.container}"


@dataclass(frozen=True)
class ServerStatus:
    running: bool
    #: exit status once it has exited (negative: killed by that signal), else None.
    returncode: int | None = None


class Runtime(Protocol):
    async def start(self, spec: ServerSpec) -> ServerHandle:
        """Launch the server without waiting for it to become healthy."""
        ...

    async def stop(self, handle: ServerHandle, timeout: float) -> ServerStatus:
        """Ask politely, then force after ``timeout`` seconds; nothing of it may survive."""
        ...

    async def status(self, handle: ServerHandle) -> ServerStatus:
        """Whether it still runs; called every health interval, so it must be cheap."""
        ...

    async def last_log_line(self, handle: ServerHandle) -> str:
        """Most recent non-empty output line, for progress messages ("" when none yet)."""
        ...
