"""`vllm-fleet up`: plan a fleet and run it.

``up`` plans, then runs the fleet in this process (``vllm_fleet.launcher.fleet``) or, with
``--detach``, in a background supervisor started in its own session, returning once the fleet is
ready. Everything another shell needs is in the run directory, so `status` (``commands/status.py``)
and `down` (``commands/down.py``) work from anywhere that can see it.

``--runtime docker`` runs each engine in a container (``vllm_fleet.launcher.runtime.docker``). Only
docker fleets talk to Docker: a process fleet needs neither the daemon nor the images.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from vllm_fleet.launcher.commands.plan import add_plan_arguments
from vllm_fleet.launcher.commands.plan_fleet import plan_fleet_config, render_fleet
from vllm_fleet.launcher.commands.run_dir_option import DEFAULT_RUN_DIR, add_run_dir_argument
from vllm_fleet.launcher.config import FleetConfig, config_to_mapping, load_config, parse_flag
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.fleet import FleetRun, ensure_no_fleet, ensure_ports_free, make_runtime
from vllm_fleet.launcher.fleet_models import model_label as model_names
from vllm_fleet.launcher.fleet_models import resolve_models
from vllm_fleet.launcher.model_files import check_local_path
from vllm_fleet.launcher.plan_types import FleetPlan, ReplicaSpec
from vllm_fleet.launcher.rundir import RunDir, atomic_write_text
from vllm_fleet.launcher.runtime.process import (
    rotate_log,
)

#: model name the sim engine serves when none is given.
SIM_DEFAULT_MODEL = "sim-model"
PLAN_FILE = "plan.json"
RESOLVED_CONFIG_FILE = "fleet.resolved.yaml"


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
    if config.models:
        resolve_models(config, args.config or "fleet.yaml")  # cross-field mistakes, early
        return config
    if config.engine == "sim" and not config.model:
        config = config.with_overrides({"model": SIM_DEFAULT_MODEL})
    if not config.model:
        raise ConfigError(
            "--model: required; pass --model NAME or set model: (or models:) in --config"
        )
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
    engines = {req.options.engine for req in resolve_models(config)}
    if config.runtime == "docker" and len(engines) > 1:
        raise ConfigError(
            "models: engine: sim next to vLLM models runs only with runtime: process (the engine "
            "images have no simulator); use runtime: process, or `vllm-fleet compose`"
        )
    if config.runtime == "process":
        for req in resolve_models(config):
            if req.options.engine == "vllm":
                check_local_path(req.options.model)


def plan_fleet(config: FleetConfig, params: str | None = None) -> FleetPlan:
    return plan_fleet_config(config, params)


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
                served_model=str(r.get("served_model", "")),
                lora_paths=tuple(str(p) for p in r.get("lora_paths", ())),
                kv_events_port=int(r["kv_events_port"]) if r.get("kv_events_port") else None,
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
    model_label = model_names(config)
    runtime = None
    if args.plan_file:
        model_label, replicas = read_plan_file(Path(args.plan_file))
    else:
        layout = plan_fleet_config(config, getattr(args, "params", None), source=args.config)
        replicas = layout.replicas
        ensure_no_fleet(run_dir)
        ensure_ports_free(replicas, config)
        # docker: the daemon answers and every image is there, checked here in the user's
        # terminal rather than in a background supervisor's log.
        runtime = make_runtime(config, run_dir, replicas)
        print(render_fleet(layout), flush=True)
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
        sys.executable, "-m", "vllm_fleet.launcher.cli", "up",
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
        flag = "" if run_dir.path == DEFAULT_RUN_DIR else f" --run-dir {run_dir.path}"
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
                out.write(log.read().decode("utf-8", errors="replace"))  # up to "Fleet ready"
                out.flush()
                return 0
            if time.monotonic() > deadline:
                child.send_signal(signal.SIGTERM)
                child.wait()
                print(f"vllm-fleet up: not ready after {deadline_s:g}s; stopped", file=out)
                return 1
            time.sleep(0.1)
