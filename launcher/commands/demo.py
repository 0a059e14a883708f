"""`vllm-fleet demo`: a whole fleet on any laptop, no GPU and no download needed.

It builds a tiny random-weight model, starts two real vLLM CPU replicas and the router through
the same supervisor as `up`, and sends one chat request with the official ``openai`` client, so
a first-time user sees every moving part work before pointing the launcher at real GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from vllm_fleet.launcher.config import FleetConfig, RestartConfig, RouterLaunchConfig
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.fleet import FleetRun, ensure_no_fleet, ensure_ports_free
from vllm_fleet.launcher.plan_types import Inventory, ModelSize, Plan, ReplicaSpec
from vllm_fleet.launcher.planner import PlanOptions, plan
from vllm_fleet.launcher.rundir import FleetState, RunDir
from vllm_fleet.launcher.vllm_args import OFFLINE_ENV

DEMO_PROMPT = "Say hello to the fleet in five words."
#: how long a CPU replica may take to load (first start compiles kernels).
VLLM_HEALTH_TIMEOUT_S = 600.0
SIM_HEALTH_TIMEOUT_S = 60.0
INSTALL_HINT = (
    "vLLM is not installed in this Python ({python}): install the CPU build with "
    "`pip install -e '.[cpu]'` then `pip uninstall -y torchvision`, or try the simulator "
    "with `vllm-fleet demo --engine sim`"
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "demo",
        help="start a 2-replica fleet of a tiny model on the CPU and send it a request",
        description=(
            "Build a tiny model, start real vLLM CPU replicas behind the router, send one chat "
            "request through the router with the openai client and keep serving until Ctrl-C "
            "(--smoke: exit after the check). No GPU or download needed."
        ),
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="exit after the check: 0 when it worked")
    add("--replicas", type=int, default=2, metavar="N", help="replicas (default %(default)s)")
    add("--port", type=int, default=8000, help="router port (default %(default)s)")
    add("--base-port", type=int, default=8001, metavar="PORT",
        help="port of the first replica (default %(default)s)")  # fmt: skip
    add("--engine", choices=("vllm", "sim"), default="vllm",
        help="vllm: real vLLM on the CPU (default); sim: simulated replicas (fast)")  # fmt: skip
    add("--run-dir", default=".fleet", metavar="DIR",
        help="state and logs (default %(default)s)")  # fmt: skip
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise ConfigError(f"--replicas {args.replicas}: must be at least 1")
    config, replicas = demo_fleet(args)
    run_dir = RunDir(Path(args.run_dir))
    ensure_no_fleet(run_dir)
    ensure_ports_free(replicas, config)
    out = sys.stdout
    print(f"vllm-fleet demo: {len(replicas)} {args.engine} replica(s) of "
          f"{config.served_model_name} behind http://127.0.0.1:{args.port}/v1",
          file=out, flush=True)  # fmt: skip

    async def check(state: FleetState) -> int | None:
        ok = await check_fleet(state, config.served_model_name or "", out, args.engine)
        if args.smoke:
            return 0 if ok else 1
        if not ok:
            return 1
        print("Serving until Ctrl-C. Try:\n"
              f"  curl {state.endpoint}/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{config.served_model_name}\", \"messages\": "
              "[{\"role\": \"user\", \"content\": \"Hi\"}]}'", file=out, flush=True)  # fmt: skip
        return None

    run = FleetRun(config, replicas, run_dir, out=out, after_ready=check)
    return asyncio.run(run.run())


def demo_fleet(args: argparse.Namespace) -> tuple[FleetConfig, tuple[ReplicaSpec, ...]]:
    from vllm_fleet.launcher.tiny_model import SERVED_MODEL_NAME

    common: dict[str, Any] = {
        "served_model_name": SERVED_MODEL_NAME,
        "replicas": args.replicas,
        "base_port": args.base_port,
        "engine": args.engine,
        "router": RouterLaunchConfig(port=args.port),
        "run_dir": args.run_dir,
        "health_interval_s": 0.5,
        "stop_timeout_s": 10.0,
        "restart": RestartConfig(max_restarts=2, backoff_initial_s=1.0, backoff_max_s=5.0),
    }
    if args.engine == "sim":
        config = FleetConfig(
            model=SERVED_MODEL_NAME, health_timeout_s=SIM_HEALTH_TIMEOUT_S, **common
        )
        size: ModelSize | None = None
    else:
        config = FleetConfig(health_timeout_s=VLLM_HEALTH_TIMEOUT_S, **common)
        config, size = _vllm_cpu_setup(config)
    inventory = demo_inventory(args.engine)
    if inventory.gpus:
        # one tiny replica per GPU at most: the planner refuses more replicas than GPUs.
        config = dataclasses.replace(config, replicas=min(args.replicas, len(inventory.gpus)))
    result = plan(inventory, size, config.to_plan_options())
    return config, result.replicas


def demo_inventory(engine: str) -> Inventory:
    """The GPUs and CPU count of this machine for real vLLM, so a GPU box runs the demo on its
    GPUs (the GPU build of vLLM cannot run on the CPU) and CPU replicas share this machine's
    cores; the simulator plans CPU replicas and needs neither."""
    if engine != "vllm":
        return Inventory(gpus=(), source="none")
    from vllm_fleet.launcher.commands.plan import host_cpus
    from vllm_fleet.launcher.inventory import detect_inventory

    return dataclasses.replace(detect_inventory(), cpus=host_cpus())


#: float32 runs on every x86 CPU; 1024 tokens is plenty for the demo and keeps the KV small.
DEMO_DTYPE = "float32"
DEMO_MAX_MODEL_LEN = 1024


def tiny_cpu_options(
    model_dir: str,
    *,
    replicas: int,
    base_port: int,
    python: str,
    max_num_seqs: int | None = None,
) -> PlanOptions:
    """The plan options of the demo's replicas of the tiny model on the CPU.

    The demo's fleet config says the same (``tiny_cpu_config``), and the e2e tests and the bench
    plan their replicas from these options too, so every one of them runs vLLM with the command
    line `up` would use (vllm_fleet.launcher.vllm_args builds it).
    """
    from vllm_fleet.launcher.tiny_model import SERVED_MODEL_NAME  # numpy: not at every CLI start

    return PlanOptions(
        model=model_dir,
        served_model_name=SERVED_MODEL_NAME,
        dtype=DEMO_DTYPE,
        max_model_len=DEMO_MAX_MODEL_LEN,
        max_num_seqs=max_num_seqs,
        replicas=replicas,
        base_port=base_port,
        env=dict(OFFLINE_ENV),
        python=python,
    )


def tiny_cpu_plan(
    model_dir: str,
    *,
    replicas: int,
    base_port: int,
    python: str,
    cpus: int,
    max_num_seqs: int | None = None,
) -> Plan:
    """The planner's layout of the tiny model on a host with `cpus` CPUs and no GPU."""
    options = tiny_cpu_options(
        model_dir, replicas=replicas, base_port=base_port, python=python,
        max_num_seqs=max_num_seqs,
    )  # fmt: skip
    return plan(Inventory(gpus=(), source="none", cpus=cpus), None, options)


def tiny_cpu_config(config: FleetConfig, model_dir: str) -> FleetConfig:
    """The demo's fleet config for real vLLM: the settings of ``tiny_cpu_options``."""
    return dataclasses.replace(
        config,
        model=model_dir,
        dtype=DEMO_DTYPE,
        max_model_len=DEMO_MAX_MODEL_LEN,
        env=dict(OFFLINE_ENV),
        extra_args=(),
    )


def _vllm_cpu_setup(config: FleetConfig) -> tuple[FleetConfig, ModelSize]:
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(INSTALL_HINT.format(python=sys.executable))
    from vllm_fleet.launcher.model_size import size_model
    from vllm_fleet.launcher.tiny_model import build_tiny_model, default_tiny_model_dir

    model_dir = default_tiny_model_dir()
    print(f"vllm-fleet demo: tiny model in {model_dir}", flush=True)
    build_tiny_model(model_dir)
    config = tiny_cpu_config(config, str(model_dir))
    return config, size_model(str(model_dir), dtype=DEMO_DTYPE, fetch=None)


async def check_fleet(state: FleetState, model: str, out: TextIO, engine: str = "vllm") -> bool:
    """One chat request through the router with the openai client, then who served it."""
    from openai import AsyncOpenAI, OpenAIError

    client = AsyncOpenAI(base_url=state.endpoint, api_key="demo", max_retries=2, timeout=120.0)
    try:
        reply = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": DEMO_PROMPT}],
            max_tokens=16,
            temperature=0.0,
        )
    except OpenAIError as exc:
        print(f"Demo request failed: {exc}", file=out, flush=True)
        return False
    finally:
        await client.close()
    answer = (reply.choices[0].message.content or "").strip()
    print(f"Asked {DEMO_PROMPT!r} through {state.endpoint}", file=out)
    why = "random weights, so expect gibberish" if engine == "vllm" else "simulated filler text"
    print(f"Answer ({why}): {answer!r}", file=out, flush=True)
    counts = await served_counts(state.router_url)
    names = {u.url: u.name for u in state.replicas()}
    print("Requests served per replica: "
          + ", ".join(f"{names.get(url, url)}={n}" for url, n in sorted(counts.items())),
          file=out, flush=True)  # fmt: skip
    return sum(counts.values()) >= 1


async def served_counts(router_url: str, deadline_s: float = 5.0) -> dict[str, int]:
    """The router counts a request once its response is finished: poll until it shows."""
    deadline = time.monotonic() + deadline_s
    counts: dict[str, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3.0)) as session:
        while True:
            async with session.get(f"{router_url}/fleet/replicas") as resp:
                rows = await resp.json()
            counts = {str(r["url"]): int(r["served"]) for r in rows}
            if sum(counts.values()) >= 1 or time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.1)
