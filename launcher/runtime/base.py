"""The interface between the supervisor and whatever actually runs a replica.

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

from launcher.plan_types import ReplicaSpec


@dataclass
class ReplicaHandle:
    """One started server. ``pid`` is also its process-group id (each replica is a session)."""

    spec: ReplicaSpec
    pid: int
    log_path: Path
    #: time.monotonic() when started.
    started_at: float


@dataclass(frozen=True)
class ReplicaStatus:
    running: bool
    #: exit status once it has exited (negative: killed by that signal), else None.
    returncode: int | None = None


class Runtime(Protocol):
    async def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        """Launch the server without waiting for it to become healthy."""
        ...

    async def stop(self, handle: ReplicaHandle, timeout: float) -> ReplicaStatus:
        """Ask politely, then force after ``timeout`` seconds; nothing of it may survive."""
        ...

    async def status(self, handle: ReplicaHandle) -> ReplicaStatus:
        """Whether it still runs; called every health interval, so it must be cheap."""
        ...

    async def last_log_line(self, handle: ReplicaHandle) -> str:
        """Most recent non-empty output line, for progress messages ("" when none yet)."""
        ...
