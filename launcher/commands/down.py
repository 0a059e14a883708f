"""`vllm-fleet down`: stop a fleet started by `up` (usually with --detach) from any shell.

It asks the fleet's supervisor to stop (router first, then replicas), waits for it, then checks
that nothing of the fleet is left: a host process group still alive is killed, and for a
``--runtime docker`` fleet every container labelled with the fleet is removed (a supervisor
that was killed leaves them running). Only docker fleets talk to Docker.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from vllm_fleet.launcher.commands.run_dir_option import add_run_dir_argument, run_dir_from_args
from vllm_fleet.launcher.rundir import FleetState, RunDir, UnitRecord
from vllm_fleet.launcher.runtime.docker import (
    docker_client,
    fleet_name_for,
    remove_fleet_containers,
)
from vllm_fleet.launcher.runtime.process import group_members, process_alive, stop_process_group
from vllm_fleet.launcher.slurm.job import add_job_arguments, job_down_command

#: extra seconds beyond the fleet's own stop timeout for the supervisor to exit.
DOWN_MARGIN_S = 15.0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    down = sub.add_parser(
        "down",
        help="stop a fleet started by `up` (e.g. with --detach)",
        description=(
            "Ask the fleet's supervisor to stop (router first, then replicas), check that "
            "every process is gone and kill any leftover (for a --runtime docker fleet: also "
            "remove every container of the fleet)."
        ),
    )
    add_run_dir_argument(down)
    add_job_arguments(down)
    down.set_defaults(func=run_down)


def run_down(args: argparse.Namespace) -> int:
    if args.job:
        return job_down_command(args)
    run_dir = run_dir_from_args(args)
    state = run_dir.read_state()
    if state is None:
        print(f"No fleet running ({run_dir.state_path} does not exist); nothing to stop.")
        return 0
    supervisor = state.supervisor_pid
    if process_alive(supervisor) and _is_fleet_process(supervisor):
        os.kill(supervisor, signal.SIGTERM)
        _wait_gone(supervisor, state.stop_timeout_s * 2 + DOWN_MARGIN_S)
        if process_alive(supervisor):
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGKILL)
            print(f"the supervisor (pid {supervisor}) did not exit; killed it")
    # the supervisor may have restarted units after we read the state: read the latest.
    state = run_dir.read_state() or state
    grace = min(5.0, state.stop_timeout_s)
    containers: list[str] = []
    if state.runtime == "docker":
        # before clear_state: without the daemon this fails and the state stays for a retry.
        containers = _remove_containers(run_dir, grace)
    leftovers = []
    host_units = _host_units(state)
    for unit in host_units:
        if unit.pgid is not None and group_members(unit.pgid):
            stop_process_group(unit.pgid, timeout=grace)
            leftovers.append(f"{unit.name} (pgid {unit.pgid})")
    run_dir.clear_state()
    units = ", ".join(
        f"{u.name} ({f'pgid {u.pgid}' if u.pgid is not None else f'container {u.container}'})"
        for u in state.units
        if u.pgid is not None or u.container
    )
    print(f"Stopped fleet {state.endpoint}: supervisor (pid {supervisor})"
          + (f", {units}" if units else "") + ".")  # fmt: skip
    if leftovers:
        print(f"Killed leftover processes: {', '.join(leftovers)}.")
    if containers:
        print(f"Removed leftover containers: {', '.join(containers)}.")
    survivors = [u.name for u in host_units if u.pgid is not None and group_members(u.pgid)]
    if survivors or process_alive(supervisor):
        print(f"vllm-fleet down: still running: {', '.join(survivors) or 'supervisor'}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _remove_containers(run_dir: RunDir, timeout: float) -> list[str]:
    """Every container labelled with this run directory's fleet: none after an orderly stop,
    whatever a killed supervisor left otherwise."""
    client = docker_client(
        lambda exc: (
            f"--run-dir {run_dir.path}: its fleet runs in Docker containers, but the "
            f"daemon is unreachable ({exc}); start dockerd (check DOCKER_HOST) and run "
            "`vllm-fleet down` again"
        )
    )
    return remove_fleet_containers(fleet_name_for(run_dir.path), client=client, timeout=timeout)


def _host_units(state: FleetState) -> list[UnitRecord]:
    """The units that are host process groups. A docker fleet's replicas are containers (no
    pgid; a state file of the previous version held their init's pid): removing the containers
    stops them, signalling would not."""
    if state.runtime == "docker":
        return [u for u in state.units if u.role != "replica"]
    return list(state.units)


def _is_fleet_process(pid: int) -> bool:
    """Guard against a recycled pid: only signal a process that runs vllm-fleet."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except FileNotFoundError:
        return not Path("/proc").is_dir()
    except OSError:
        return True
    return b"vllm_fleet.launcher.cli" in cmdline or b"vllm-fleet" in cmdline


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
