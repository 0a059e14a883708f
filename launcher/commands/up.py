"""`vllm-fleet up`, `status` and `down`: run a fleet, look at it, stop it.

``up`` plans, then runs the fleet in this process (``launcher.fleet``) or, with ``--detach``,
in a background supervisor started in its own session, returning once the fleet is ready.
Everything another shell needs is in the run directory, so ``status`` and ``down`` work from
anywhere that can see it.

``--runtime docker`` runs each engine in a container (``launcher.runtime.docker``); ``down``
then also removes whatever containers of that fleet a dead supervisor left behind. Only docker
fleets talk to Docker: a process fleet needs neither the daemon nor the images.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml

from launcher.commands.plan import add_plan_arguments, load_plan_inputs, render
from launcher.config import FleetConfig, config_to_mapping, load_config, parse_flag
from launcher.errors import ConfigError
from launcher.fleet import FleetRun, ensure_no_fleet, ensure_ports_free, make_runtime
from launcher.model_size import check_local_path
from launcher.plan_types import Plan, ReplicaSpec
from launcher.planner import PlanOptions, plan
from launcher.rundir import FleetState, RunDir, UnitRecord, atomic_write_text
from launcher.runtime.docker import docker_client, fleet_name_for, remove_fleet_containers
from launcher.runtime.process import (
    group_members,
    process_alive,
    rotate_log,
    stop_process_group,
)

#: model name the sim engine serves when none is given.
SIM_DEFAULT_MODEL = "sim-model"
PLAN_FILE = "plan.json"
RESOLVED_CONFIG_FILE = "fleet.resolved.yaml"
#: `down`: extra seconds beyond the fleet's own stop timeout for the supervisor to exit.
DOWN_MARGIN_S = 15.0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    up = sub.add_parser(
        "up",
        help="plan and start the replicas and the router, and keep them running",
        description=(
            "Plan replicas over the GPUs, start each engine pinned to its GPUs, start the "
            "router in front of them and supervise everything (restart on crash, with a "
            "restart budget). Ctrl-C stops the whole fleet. Flags override --config values."
        ),
    )
    add_up_arguments(up)
    up.set_defaults(func=run_up)

    status = sub.add_parser(
        "status",
        help="show the running fleet: replicas, GPUs, ports, health and load",
        description="Read the run directory of a fleet started by `up` and query it live.",
    )
    add_run_dir_argument(status)
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.set_defaults(func=run_status)

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
    down.set_defaults(func=run_down)


def add_run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="where state.json, backends.yaml and logs/ live (default: .fleet)",
    )


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", metavar="PATH", help="fleet.yaml to read (see docs/fleet.example.yaml)")
    add_plan_arguments(parser)
    add("--port", default=None, help="router port clients use (default 8000)")
    add("--router-host", default=None, metavar="ADDR",
        help="address the router listens on (default 127.0.0.1; 0.0.0.0: all)")  # fmt: skip
    add("--policy", default=None, metavar="NAME", help="router balancing policy")
    add("--api-key", action="append", default=None, metavar="KEY",
        help="accept only clients sending this bearer key (repeatable)")  # fmt: skip
    add("--health-timeout", default=None, metavar="S",
        help="seconds a replica may take to become healthy (default 900)")  # fmt: skip
    add("--runtime", default=None, metavar="KIND",
        help="process (default): each replica is a local process group; docker: each "
        "replica is a container (the router stays a local process)")  # fmt: skip
    add("--image", default=None, metavar="IMAGE",
        help="engine image for --runtime docker (default: vllm/vllm-openai:v0.32.0 on GPUs, "
        "vllm-fleet-engine-cpu:0.1.0 without; sim engine: vllm-fleet-router:0.1.0)")  # fmt: skip
    add_run_dir_argument(parser)
    add("--detach", action="store_true",
        help="run the supervisor in the background and return once the fleet is ready")  # fmt: skip
    # internal: the background supervisor started by --detach runs exactly the parent's plan
    # (already checked and printed by the parent).
    add("--plan-file", default=None, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- config and plan


#: argparse dest -> (fleet.yaml key path, flag) for every flag that overrides the file.
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "--model"),
    "gpus": ("gpus", "--gpus"),
    "dtype": ("dtype", "--dtype"),
    "max_model_len": ("max_model_len", "--max-model-len"),
    "gpu_memory_utilization": ("gpu_memory_utilization", "--gpu-memory-utilization"),
    "max_num_seqs": ("max_num_seqs", "--max-num-seqs"),
    "tensor_parallel_size": ("tensor_parallel_size", "--tensor-parallel-size"),
    "replicas": ("replicas", "--replicas"),
    "engine": ("engine", "--engine"),
    "base_port": ("base_port", "--base-port"),
    "host": ("host", "--host"),
    "served_model_name": ("served_model_name", "--served-model-name"),
    "engine_arg": ("extra_args", "--engine-arg"),
    "port": ("router.port", "--port"),
    "router_host": ("router.host", "--router-host"),
    "policy": ("router.policy", "--policy"),
    "api_key": ("router.api_keys", "--api-key"),
    "health_timeout": ("health_timeout_s", "--health-timeout"),
    "runtime": ("runtime", "--runtime"),
    "image": ("image", "--image"),
}


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    """fleet.yaml (if any), then every flag that was given."""
    config = load_config(args.config) if args.config else FleetConfig()
    overrides = {
        key: parse_flag(key, getattr(args, dest), flag)
        for dest, (key, flag) in FLAG_KEYS.items()
        if getattr(args, dest, None) is not None
    }
    config = config.with_overrides(overrides)
    if config.engine == "sim" and not config.model:
        config = config.with_overrides({"model": SIM_DEFAULT_MODEL})
    if not config.model:
        raise ConfigError("--model: required; pass --model NAME or set model: in --config")
    return config


def check_runtime_options(config: FleetConfig) -> None:
    """Mistakes that depend on the runtime, caught before anything starts.

    An engine image only means something to the Docker runtime: with processes it would be
    silently ignored, which hides a forgotten --runtime docker. A local model path must exist
    for processes; in a container it may be a path inside the image.
    """
    if config.image and config.runtime != "docker":
        raise ConfigError(
            f"--image {config.image}: only used with --runtime docker; add --runtime docker "
            "(runtime: docker in --config) or drop --image (image: in --config)"
        )
    if config.runtime == "process" and config.engine == "vllm" and config.model:
        check_local_path(config.model)


def plan_fleet(config: FleetConfig, params: str | None = None) -> tuple[Plan, PlanOptions]:
    options = config.to_plan_options()
    inventory, size = load_plan_inputs(options, config.gpus, params)
    return plan(inventory, size, options), options


def write_plan_file(path: Path, model_label: str, replicas: Sequence[ReplicaSpec]) -> None:
    data = {"model": model_label, "replicas": [dataclasses.asdict(s) for s in replicas]}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_plan_file(path: Path) -> tuple[str, tuple[ReplicaSpec, ...]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        replicas = tuple(
            ReplicaSpec(
                name=r["name"],
                host=str(r["host"]),
                port=int(r["port"]),
                model=str(r["model"]),
                gpus=tuple(int(g) for g in r["gpus"]),
                tensor_parallel_size=int(r["tensor_parallel_size"]),
                command=tuple(str(c) for c in r["command"]),
                env={str(k): str(v) for k, v in r["env"].items()},
            )
            for r in data["replicas"]
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--plan-file {path}: unreadable plan ({exc})") from None
    return str(data.get("model", "")), replicas


# --------------------------------------------------------------------------- up


def run_up(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_runtime_options(config)
    run_dir = RunDir(Path(args.run_dir or config.run_dir))
    model_label = config.served_model_name or config.model or ""
    runtime = None
    if args.plan_file:
        model_label, replicas = read_plan_file(Path(args.plan_file))
    else:
        layout, options = plan_fleet(config, getattr(args, "params", None))
        replicas = layout.replicas
        ensure_no_fleet(run_dir)
        ensure_ports_free(replicas, config)
        # docker: the daemon answers and every image is there, checked here in the user's
        # terminal rather than in a background supervisor's log.
        runtime = make_runtime(config, run_dir, replicas)
        print(render(layout, options), flush=True)
    if args.detach:
        return detach(config, model_label, replicas, run_dir, sys.stdout)
    run = FleetRun(
        config, replicas, run_dir, out=sys.stdout, model_label=model_label, runtime=runtime
    )
    return asyncio.run(run.run())


def detach(
    config: FleetConfig,
    model_label: str,
    replicas: Sequence[ReplicaSpec],
    run_dir: RunDir,
    out: TextIO,
) -> int:
    """Start the supervisor in its own session, echo its progress, return once it is ready."""
    run_dir.create()
    base = run_dir.path.resolve()
    config_path = base / RESOLVED_CONFIG_FILE
    plan_path = base / PLAN_FILE
    atomic_write_text(config_path, yaml.safe_dump(config_to_mapping(config), sort_keys=False))
    write_plan_file(plan_path, model_label, replicas)
    command = [
        sys.executable, "-m", "launcher.cli", "up",
        "--config", str(config_path), "--plan-file", str(plan_path), "--run-dir", str(base),
    ]  # fmt: skip
    log_path = run_dir.supervisor_log_path
    rotate_log(log_path, backups=3)
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        status = _follow_child(child, run_dir, log_path, _detach_deadline(config), out)
    except KeyboardInterrupt:
        print("interrupted: stopping the background fleet", file=out, flush=True)
        child.send_signal(signal.SIGTERM)
        child.wait()
        return 130
    if status == 0:
        flag = "" if run_dir.path == Path(".fleet") else f" --run-dir {run_dir.path}"
        print(
            f"Supervisor running in the background (pid {child.pid}); logs in "
            f"{run_dir.logs_dir}. See `vllm-fleet status{flag}`, stop with "
            f"`vllm-fleet down{flag}`.",
            file=out,
            flush=True,
        )
    return status


def _detach_deadline(config: FleetConfig) -> float:
    """Worst case of the child's own bounded start: every allowed restart times out."""
    r = config.restart
    attempts = r.max_restarts + 1
    return attempts * (config.health_timeout_s + r.backoff_max_s + config.stop_timeout_s) + 120


def _follow_child(
    child: subprocess.Popen[bytes],
    run_dir: RunDir,
    log_path: Path,
    deadline_s: float,
    out: TextIO,
) -> int:
    deadline = time.monotonic() + deadline_s
    with open(log_path, "rb") as log:
        while True:
            chunk = log.read()
            if chunk:
                out.write(chunk.decode("utf-8", errors="replace"))
                out.flush()
            code = child.poll()
            if code is not None:
                out.write(log.read().decode("utf-8", errors="replace"))
                print(
                    f"vllm-fleet up: the background supervisor exited with status {code}; "
                    f"see {log_path}",
                    file=out,
                    flush=True,
                )
                return code or 1
            state = run_dir.read_state()
            if state and state.supervisor_pid == child.pid and state.status == "ready":
                return 0
            if time.monotonic() > deadline:
                child.send_signal(signal.SIGTERM)
                child.wait()
                print(f"vllm-fleet up: not ready after {deadline_s:g}s; stopped", file=out)
                return 1
            time.sleep(0.1)


# --------------------------------------------------------------------------- status


def run_status(args: argparse.Namespace) -> int:
    run_dir = RunDir(Path(args.run_dir or ".fleet"))
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
    header = ("NAME", "STATE", "HEALTH", "PORT", "GPUS", "PGID/CONTAINER", "RESTARTS",
              "IN-FLIGHT", "WAITING", "RUNNING", "SERVED")  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for u in state.units:
        load = live.load.get(u.url) or {}
        rows.append(
            (
                u.name,
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


# --------------------------------------------------------------------------- down


def run_down(args: argparse.Namespace) -> int:
    run_dir = RunDir(Path(args.run_dir or ".fleet"))
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
    return b"launcher.cli" in cmdline or b"vllm-fleet" in cmdline


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
