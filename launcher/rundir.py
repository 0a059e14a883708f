"""The run directory (``.fleet/`` by default): what a running fleet leaves for other shells.

``status`` and ``down`` run in a different process than the supervisor, possibly much later, so
everything they need (process groups, containers, ports, GPUs, the router URL) is written to
``state.json`` here. Every file is replaced atomically so a reader never sees half of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vllm_fleet.launcher.errors import ConfigError


@dataclass(frozen=True)
class UnitRecord:
    """One supervised process (a replica or the router) as last seen by the supervisor."""

    name: str
    #: "replica" or "router".
    role: str
    port: int
    url: str
    gpus: tuple[int, ...] = ()
    #: the model a replica serves, as clients name it ("" for the router); `status` groups by it.
    model: str = ""
    #: process-group id of a host process (signal it to stop the server and its workers);
    #: None for a container and while not running.
    pgid: int | None = None
    #: name of the container it runs in ("" for a host process): `down` removes containers,
    #: it never signals them.
    container: str = ""
    #: supervisor state: loading, healthy, unhealthy, restarting, failed, stopped.
    state: str = "loading"
    restarts: int = 0
    log: str = ""
    last_log_line: str = ""


@dataclass(frozen=True)
class FleetState:
    supervisor_pid: int
    #: starting, ready, failed, stopping, stopped.
    status: str
    router_url: str
    model: str = ""
    engine: str = ""
    #: unix time the supervisor started.
    started_at: float = 0.0
    units: tuple[UnitRecord, ...] = ()
    message: str = ""
    #: SIGTERM-to-SIGKILL grace the supervisor uses, so `down` knows how long to wait.
    stop_timeout_s: float = 30.0
    #: "process" or "docker": `down` removes a docker fleet's leftover containers too, and
    #: never needs Docker for a process fleet (state files without the key are process fleets).
    runtime: str = "process"

    @property
    def endpoint(self) -> str:
        return f"{self.router_url}/v1"

    def replicas(self) -> list[UnitRecord]:
        return [u for u in self.units if u.role == "replica"]

    def pgids(self) -> list[int]:
        """Process groups of the host processes (the containers are not among them)."""
        return [u.pgid for u in self.units if u.pgid is not None]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FleetState:
        data: dict[str, Any] = json.loads(text)
        units = tuple(_unit_record(u) for u in data.pop("units", []))
        return cls(**data, units=units)


def _unit_record(data: dict[str, Any]) -> UnitRecord:
    """One unit of state.json; a file written before ``pid`` became ``pgid`` (a fleet started
    by the previous version) still reads, so `down` can stop that fleet."""
    fields = {**data, "gpus": tuple(data.get("gpus", ()))}
    if "pid" in fields:
        fields.setdefault("pgid", fields.pop("pid"))
    return UnitRecord(**fields)


def atomic_write_text(path: Path, text: str) -> None:
    """tmp file in the same directory + os.replace: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class RunDir:
    path: Path = field(default_factory=lambda: Path(".fleet"))

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def backends_path(self) -> Path:
        return self.path / "backends.yaml"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def supervisor_log_path(self) -> Path:
        return self.logs_dir / "supervisor.log"

    def create(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)

    def write_state(self, state: FleetState) -> None:
        atomic_write_text(self.state_path, state.to_json() + "\n")

    def read_state(self) -> FleetState | None:
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return FleetState.from_json(text)
        except (ValueError, TypeError, KeyError):
            raise ConfigError(
                f"{self.state_path}: unreadable fleet state; delete it if no fleet is running"
            ) from None

    def clear_state(self) -> None:
        self.state_path.unlink(missing_ok=True)

    def write_backends(self, urls: Iterable[str]) -> None:
        """The router watches this file; only healthy replicas are listed."""
        atomic_write_text(
            self.backends_path, yaml.safe_dump(sorted(urls), default_flow_style=False)
        )
