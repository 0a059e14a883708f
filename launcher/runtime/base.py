"""The interface between the supervisor and whatever actually runs a replica.

The supervisor only needs to start, stop, poll and peek at the log of a server; keeping that
surface this small is what lets a container runtime slot in later without touching it.
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
    def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        """Launch the server without waiting for it to become healthy."""
        ...

    def stop(self, handle: ReplicaHandle, timeout: float) -> ReplicaStatus:
        """Ask politely, then force after ``timeout`` seconds; nothing of it may survive."""
        ...

    def status(self, handle: ReplicaHandle) -> ReplicaStatus: ...

    def last_log_line(self, handle: ReplicaHandle) -> str:
        """Most recent non-empty output line, for progress messages ("" when none yet)."""
        ...
