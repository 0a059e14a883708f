"""`vllm-fleet status`: what a running fleet looks like, from any shell that sees its run directory.

The run directory's ``state.json`` says what the supervisor started (units, ports, GPUs, process
groups or containers); this command adds what it sees live: each unit's ``/health`` and, from the
router's ``/fleet/replicas``, the load on each replica.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from typing import Any, TextIO

import aiohttp

from vllm_fleet.launcher.commands.run_dir_option import add_run_dir_argument, run_dir_from_args
from vllm_fleet.launcher.rundir import FleetState, RunDir, UnitRecord
from vllm_fleet.launcher.runtime.process import process_alive
from vllm_fleet.launcher.slurm.job import add_job_arguments, job_status_command


def register(sub: argparse._SubParsersAction[Any]) -> None:
    status = sub.add_parser(
        "status",
        help="show the running fleet: replicas, GPUs, ports, health and load",
        description="Read the run directory of a fleet started by `up` and query it live.",
    )
    add_run_dir_argument(status)
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_job_arguments(status)
    status.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    if args.job:
        return job_status_command(args)
    run_dir = run_dir_from_args(args)
    state = run_dir.read_state()
    if state is None:
        print(f"No fleet running ({run_dir.state_path} does not exist).")
        return 1
    alive = process_alive(state.supervisor_pid)
    live = asyncio.run(_live_view(state)) if alive else LiveView({}, {}, "")
    if args.json:
        print(json.dumps(_status_json(state, alive, live), indent=2))
    else:
        _print_status(state, alive, live, run_dir, sys.stdout)
    return 0 if alive else 1


@dataclasses.dataclass(frozen=True)
class LiveView:
    #: unit name -> "ok" / "HTTP 503" / "down".
    health: dict[str, str]
    #: replica url -> the router's row from /fleet/replicas.
    load: dict[str, dict[str, Any]]
    #: why the router's view is missing ("" when present).
    router_problem: str


async def _live_view(state: FleetState) -> LiveView:
    timeout = aiohttp.ClientTimeout(total=3.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def health(unit: UnitRecord) -> tuple[str, str]:
            try:
                async with session.get(f"{unit.url}/health") as resp:
                    return unit.name, "ok" if resp.status == 200 else f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                return unit.name, "down"

        async def load() -> tuple[dict[str, dict[str, Any]], str]:
            try:
                async with session.get(f"{state.router_url}/fleet/replicas") as resp:
                    if resp.status != 200:
                        return {}, f"router answered HTTP {resp.status}"
                    rows = await resp.json()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                return {}, f"router unreachable ({type(exc).__name__})"
            return {str(r.get("url", "")).rstrip("/"): r for r in rows}, ""

        checks = await asyncio.gather(*(health(u) for u in state.units))
        rows, problem = await load()
    return LiveView(dict(checks), rows, problem)


def _status_json(state: FleetState, alive: bool, live: LiveView) -> dict[str, Any]:
    data = dataclasses.asdict(state)
    data["endpoint"] = state.endpoint
    data["supervisor_alive"] = alive
    for unit in data["units"]:
        unit["health"] = live.health.get(unit["name"], "unknown")
        unit["load"] = live.load.get(unit["url"])
    data["router_problem"] = live.router_problem
    data["models"] = {m: [u.name for u in units] for m, units in _by_model(state).items()}
    return data


def _print_status(
    state: FleetState, alive: bool, live: LiveView, run_dir: RunDir, out: TextIO
) -> None:
    healthy = sum(1 for u in state.replicas() if u.state == "healthy")
    uptime = _duration(time.time() - state.started_at) if state.started_at else "?"
    print(f"Fleet {state.endpoint}: {state.status} ({healthy}/{len(state.replicas())} "
          f"replicas healthy)", file=out)  # fmt: skip
    print(f"  model {state.model}, engine {state.engine}, runtime {state.runtime}, supervisor "
          f"pid {state.supervisor_pid}, up {uptime}, run dir {run_dir.path}", file=out)  # fmt: skip
    if not alive:
        print(f"  the supervisor (pid {state.supervisor_pid}) is gone: run `vllm-fleet down` "
              "to clean up leftovers", file=out)  # fmt: skip
    if state.message and state.status != "ready":
        print(f"  {state.message}", file=out)
    groups = _by_model(state)
    if len(groups) > 1:
        for model, units in groups.items():
            up = sum(1 for u in units if u.state == "healthy")
            print(f"  {model}: {up}/{len(units)} replicas healthy", file=out)
    header: tuple[str, ...] = ("NAME", "STATE", "HEALTH", "PORT", "GPUS", "PGID/CONTAINER",
                               "RESTARTS", "IN-FLIGHT", "WAITING", "RUNNING", "SERVED")  # fmt: skip
    several = len(groups) > 1
    if several:  # a MODEL column only where it tells the rows apart
        header = (header[0], "MODEL", *header[1:])
    rows: list[tuple[str, ...]] = [header]
    ordered = [u for units in groups.values() for u in units]
    for u in [*ordered, *(u for u in state.units if u.role != "replica")]:
        load = live.load.get(u.url) or {}
        rows.append(
            (
                u.name,
                *((u.model or "-",) if several else ()),
                u.state,
                live.health.get(u.name, "-"),
                str(u.port),
                ",".join(str(g) for g in u.gpus) or "-",
                str(u.pgid or u.container or "-"),
                str(u.restarts),
                *(_num(load.get(k)) for k in ("in_flight", "waiting", "running", "served")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(),
              file=out)  # fmt: skip
    if live.router_problem and alive:
        print(f"  load unavailable: {live.router_problem}", file=out)
    for u in state.units:
        if u.state in ("failed", "restarting") and u.last_log_line:
            print(f"  {u.name} last log: {u.last_log_line}", file=out)


def _by_model(state: FleetState) -> dict[str, list[UnitRecord]]:
    """Replicas grouped by the model they serve, in the order the plan lists the models."""
    groups: dict[str, list[UnitRecord]] = {}
    for u in state.replicas():
        groups.setdefault(u.model or state.model, []).append(u)
    return groups


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
