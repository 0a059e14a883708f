"""`vllm-fleet compose`: write a Docker Compose file for the plan `vllm-fleet up` would run.

The file comes from the same planner and the same spec-to-container translation as
``--runtime docker`` (``vllm_fleet.launcher.runtime.docker.container_config``), so a compose
deployment and a launcher deployment of one fleet.yaml get the same replicas, GPUs, tensor-parallel
size and engine arguments. The hand-written compose/docker-compose.yml covers the common layouts
from a ``.env``; this command covers every other plan.

Each replica is one service with its ``device_ids``; the router gets the replica list as static
backends (service DNS names, each replica on its planned port) and is the only published port.

The file is often run on another machine, so nothing of this one goes into it but the GPUs
``--gpus`` leaves to detection: the CPU engine's threads per replica follow ``--cpus`` (the
target's CPU count) or are left to vLLM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vllm_fleet.launcher.commands.plan import add_plan_arguments
from vllm_fleet.launcher.commands.plan_fleet import plan_fleet_config, render_fleet
from vllm_fleet.launcher.commands.up import config_from_args
from vllm_fleet.launcher.config import FleetConfig
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.fleet_models import resolve_models
from vllm_fleet.launcher.plan_types import FleetPlan, ReplicaSpec
from vllm_fleet.launcher.rundir import atomic_write_text
from vllm_fleet.launcher.runtime.docker import (
    DEFAULT_CPU_IMAGE,
    DEFAULT_GPU_IMAGE,
    DockerSettings,
    container_config,
)

DEFAULT_ROUTER_IMAGE = "vllm-fleet-router:0.1.0"
#: Hugging Face cache shared by the replicas (the official vLLM image runs as root).
HF_CACHE_TARGET = "/root/.cache/huggingface"
#: how long a replica may load before its failing health checks count (downloads included).
ENGINE_START_PERIOD = "30m"


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "compose",
        help="write a docker compose file for the plan `up` would run",
        description=(
            "Plan the fleet exactly as `vllm-fleet up` does (same flags, same --config) and "
            "write a Docker Compose file with one service per replica, pinned to its GPUs, "
            "and the router in front. Start it with `docker compose -f FILE up -d --wait`."
        ),
    )
    add = parser.add_argument
    add("--config", metavar="PATH", help="fleet.yaml to read (see docs/fleet.example.yaml)")
    add_plan_arguments(parser)
    add("--port", default=None, help="host port of the router (default 8000)")
    add("--router-host", default=None, metavar="ADDR",
        help="host address the router port is published on (default 127.0.0.1)")  # fmt: skip
    add("--policy", default=None, metavar="NAME", help="router balancing policy")
    add("--cpus", default=None, metavar="N",
        help="CPUs of the host that will run the file, to size the CPU engine's threads per "
        "replica (default: not set, vLLM uses the CPUs its container sees)")  # fmt: skip
    add("-o", "--output", default="-", metavar="PATH",
        help="file to write (default: standard output)")  # fmt: skip
    add("--gpu-image", default=DEFAULT_GPU_IMAGE, metavar="IMAGE",
        help="engine image of GPU replicas (default %(default)s)")  # fmt: skip
    add("--cpu-image", default=None, metavar="IMAGE",
        help=f"engine image of CPU replicas (default {DEFAULT_CPU_IMAGE}; "
        f"sim engine: the router image)")  # fmt: skip
    add("--router-image", default=DEFAULT_ROUTER_IMAGE, metavar="IMAGE",
        help="router image (default %(default)s)")  # fmt: skip
    add("--project-name", default="vllm-fleet", metavar="NAME",
        help="compose project name written into the file (default %(default)s)")  # fmt: skip
    parser.set_defaults(func=run_compose)


def parse_cpus(raw: str | None) -> int | None:
    """``--cpus``, checked here so a bad value is one line, not an argparse usage dump."""
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"--cpus {raw!r} must be a whole number of CPUs >= 1, e.g. --cpus 16")
    return value


def plan_for_compose(config: FleetConfig, params: str | None, cpus: int | None) -> FleetPlan:
    """Plan as `up` does, except that the CPU count is the target host's (``--cpus``) or
    unknown, never this machine's: the file is often run somewhere else."""
    return plan_fleet_config(config, params, cpu_count=lambda: cpus)


def run_compose(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    cpus = parse_cpus(args.cpus)
    layout = plan_for_compose(config, getattr(args, "params", None), cpus)
    cpu_image = args.cpu_image or (
        args.router_image if config.engine == "sim" else DEFAULT_CPU_IMAGE
    )
    mixed = len({req.options.engine for req in resolve_models(config)}) > 1
    images = Images(
        gpu=args.gpu_image,
        cpu=cpu_image,
        router=args.router_image,
        sim=args.router_image if mixed else None,
    )
    source = args.config or "command-line flags"
    text = render_compose(
        compose_document(layout.replicas, config, images, args.project_name), source
    )
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    print(render_fleet(layout), file=sys.stderr)
    print(
        f"Wrote {out} ({len(layout.replicas)} replica(s)). Start it with:\n"
        f"  docker compose -f {out} up -d --wait",
        file=sys.stderr,
    )
    return 0


@dataclass(frozen=True)
class Images:
    gpu: str
    cpu: str
    router: str
    #: sim replicas in a fleet whose other models run vLLM: the engine images lack the simulator.
    sim: str | None = None


def _escape(value: str) -> str:
    """Compose substitutes ``$VAR`` everywhere; a literal dollar is written ``$$``."""
    return value.replace("$", "$$")


def replica_service(spec: ReplicaSpec, images: Images) -> dict[str, Any]:
    """One compose service from one replica spec, through the Docker runtime's translation."""
    simulated = "vllm_fleet.launcher.cli" in spec.command and "sim" in spec.command
    cpu_image = images.sim if simulated and images.sim else images.cpu
    settings = DockerSettings(fleet="compose", gpu_image=images.gpu, cpu_image=cpu_image)
    container = container_config(spec, settings)
    environment = {k: _escape(v) for k, v in container.environment.items()}
    environment["HF_TOKEN"] = "${HF_TOKEN:-}"
    volumes = [f"{_escape(src)}:{_escape(dst)}:ro" for src, dst, _ in container.binds]
    service: dict[str, Any] = {
        "image": container.image,
        "entrypoint": [_escape(arg) for arg in container.entrypoint],
        "restart": "unless-stopped",
        "init": True,
        "environment": environment,
        "labels": {k: v for k, v in container.labels.items() if k != "vllm-fleet.fleet"},
        "healthcheck": {
            "test": [
                "CMD",
                "python3",
                "-c",
                "import urllib.request; urllib.request.urlopen("
                f"'http://127.0.0.1:{spec.port}/health', timeout=4)",
            ],
            # Docker before 25 has no start_interval: a short interval keeps `up --wait` quick.
            "interval": "5s",
            "timeout": "5s",
            "retries": 3,
            "start_period": ENGINE_START_PERIOD,
        },
    }
    if spec.gpus:
        service["ipc"] = "host"
        volumes.append(f"hf-cache:{HF_CACHE_TARGET}")
        service["deploy"] = {
            "resources": {
                "reservations": {
                    "devices": [
                        {
                            "driver": "nvidia",
                            "device_ids": list(container.device_ids),
                            "capabilities": ["gpu"],
                        }
                    ]
                }
            }
        }
    else:
        service["shm_size"] = container.shm_size
        service["cap_add"] = list(container.cap_add)
    if volumes:
        service["volumes"] = volumes
    return service


def router_service(
    replicas: Sequence[ReplicaSpec], config: FleetConfig, images: Images
) -> dict[str, Any]:
    backends = ",".join(f"http://{spec.name}:{spec.port}" for spec in replicas)
    environment = {
        "FLEET_BACKENDS": backends,
        # API keys are secrets: they come from the environment of `docker compose`, not the file.
        "FLEET_API_KEYS": "${FLEET_API_KEYS:-}",
    }
    if config.router.policy:
        environment["FLEET_POLICY"] = config.router.policy
    if any(spec.kv_events_port is not None for spec in replicas):
        # the replicas publish vLLM KV events (vllm_args): the router asks each where.
        environment["FLEET_KV_EVENTS"] = "auto"
    if config.router.workers != 1:
        environment["FLEET_WORKERS"] = str(config.router.workers)
    service: dict[str, Any] = {
        "image": images.router,
        "restart": "unless-stopped",
        "ports": [f"{config.router.host}:{config.router.port}:8000"],
        "environment": environment,
    }
    if config.router.extra_args:
        service["command"] = [_escape(arg) for arg in config.router.extra_args]
    return service


def compose_document(
    replicas: Sequence[ReplicaSpec], config: FleetConfig, images: Images, project: str
) -> dict[str, Any]:
    services = {spec.name: replica_service(spec, images) for spec in replicas}
    services["router"] = router_service(replicas, config, images)
    document: dict[str, Any] = {"name": project, "services": services}
    if any(spec.gpus for spec in replicas):
        document["volumes"] = {"hf-cache": {}}
    return document


def render_compose(document: dict[str, Any], source: str) -> str:
    header = (
        f"# Generated by `vllm-fleet compose` from {source}: re-run it instead of editing.\n"
        "# Start: docker compose -f THIS_FILE up -d --wait   Stop: docker compose -f THIS_FILE "
        "down\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False, width=100)
