"""`vllm-fleet slurm`: the fleet as a SLURM job, one sbatch script from the same planner.

Reads fleet.yaml (its ``slurm:`` section for the site: partition, setup lines, container...),
lets flags override it, plans the nodes (``vllm_fleet.launcher.slurm.layout``), writes the script
(``vllm_fleet.launcher.slurm.script``) and, with ``--submit``, hands it to sbatch. `vllm-fleet
status --job` and `down --job` follow the job (``vllm_fleet.launcher.slurm.job``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from vllm_fleet.launcher.commands.plan import load_plan_inputs
from vllm_fleet.launcher.config import FleetConfig, config_to_mapping, load_config, parse_flag
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.fleet import router_spec
from vllm_fleet.launcher.plan_types import Inventory
from vllm_fleet.launcher.slurm.layout import NodesPlan, plan_nodes
from vllm_fleet.launcher.slurm.script import BACKENDS, PY, JobSpec, render_script

#: model name of the sim engine when the file names none (as `up` does).
SIM_MODEL = "sim-model"

#: flag dest -> fleet.yaml key, for the flags that override the file.
SETTING_FLAGS = {
    "partition": "slurm.partition",
    "time": "slurm.time",
    "account": "slurm.account",
    "qos": "slurm.qos",
    "constraint": "slurm.constraint",
    "gpus_per_node": "slurm.gpus_per_node",
    "container": "slurm.container",
    "container_runtime": "slurm.container_runtime",
    "log_dir": "slurm.log_dir",
    "job_name": "slurm.job_name",
    "python": "slurm.python",
    "shape": "slurm.shape",
    "model": "model",
    "gpus": "gpus",
    "engine": "engine",
}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "slurm",
        help="write (and submit) an sbatch script that runs the fleet on N nodes",
        description=(
            "Plan the fleet over N nodes and write a commented sbatch script: the replicas "
            "on every node behind one router (the model fits a node), or one model across "
            "the nodes with Ray (it does not). Flags override fleet.yaml's slurm: section. "
            "Follow the job with `vllm-fleet status --job ID`, stop it with `down --job ID`."
        ),
    )
    add = parser.add_argument
    add("--config", required=True, metavar="PATH", help="fleet.yaml (its slurm: section too)")
    add("--nodes", required=True, type=int, metavar="N", help="nodes to run on")
    add("--gpus-per-node", metavar="G", help="GPUs to request per node (default: --gpus)")
    add("--gpus", help="one node's GPUs, e.g. 8x80GB (login nodes have none to detect)")
    add("--model", help="override the file's model")
    add("--params", help="parameter count when no config.json is at hand, e.g. 70B")
    add("--engine", help="vllm (default) or sim")
    add("--shape", help="auto (default: the planner decides), replicas, or ray")
    for name, text in (
        ("partition", "partition"),
        ("time", "time limit, e.g. 4:00:00"),
        ("account", "account to charge"),
        ("qos", "quality of service"),
        ("constraint", "node features, e.g. 'h100&ib'"),
    ):
        add(f"--{name}", help=f"SLURM {text}")
    add("--exclusive", action="store_true", default=None, help="whole nodes only")
    add("--env", action="append", metavar="K=V", help="export in the job (repeatable)")
    add("--setup", action="append", metavar="LINE", help="shell line run first (repeatable)")
    add("--container", metavar="IMAGE", help="run every fleet process in this image")
    add("--container-runtime", metavar="KIND", help="apptainer (default) or pyxis")
    add("--log-dir", metavar="DIR", help="job log and endpoint file (default slurm-logs)")
    add("--job-name", metavar="NAME", help="SLURM job name (default vllm-fleet)")
    add("--python", metavar="PATH", help="Python with vllm-fleet on the nodes")
    add("-o", "--output", metavar="PATH", help="the script to write (--batch: the results)")
    add("--script", metavar="PATH", help="with --batch: the script (vllm-fleet-batch.sbatch)")
    add("--batch", metavar="INPUT", help="run `vllm-fleet batch` on INPUT in the job, then end")
    add("--submit", action="store_true", help="submit the script with sbatch")
    parser.set_defaults(func=run_slurm)


def _pairs(values: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--env {item!r}: expected NAME=VALUE, e.g. --env HF_HOME=/data/hf")
        env[key] = value
    return env


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    """fleet.yaml, then the flags; checked like the file (one line naming the flag)."""
    config = load_config(args.config)
    overrides: dict[str, Any] = {
        key: parse_flag(key, getattr(args, dest), "--" + dest.replace("_", "-"))
        for dest, key in SETTING_FLAGS.items()
        if getattr(args, dest) is not None
    }
    if args.exclusive:
        overrides["slurm.exclusive"] = True
    if args.env:
        overrides["slurm.env"] = {**config.slurm.env, **_pairs(args.env)}
    if args.setup:
        overrides["slurm.setup"] = [*config.slurm.setup, *args.setup]
    config = config.with_overrides(overrides)
    if config.models:
        raise ConfigError(
            f"{args.config}: models: a SLURM job serves one model; write a fleet file per model "
            "(model: at the top) and submit one job each"
        )
    if config.engine == "sim" and not config.model:
        config = config.with_overrides({"model": SIM_MODEL})
    if not config.model:
        raise ConfigError("--model: required; set model: in --config or pass --model")
    return config


def plan_job(
    config: FleetConfig, nodes: int, params: str | None = None
) -> tuple[NodesPlan, Inventory]:
    """The nodes' layout. A node's GPUs are declared (gpus:, --gpus): the machine running this
    command is a login node, whose GPUs (if any) say nothing about the compute nodes."""
    options = dataclasses.replace(config.to_plan_options(), python=PY)
    inventory, model = load_plan_inputs(
        options, config.gpus or "none", params, cpu_count=lambda: None
    )
    wanted = config.slurm.gpus_per_node
    if wanted and not inventory.gpus:
        raise ConfigError(
            f"--gpus-per-node {wanted}: declare what they are with --gpus (e.g. "
            f"{wanted}x80GB) so the planner can size the model"
        )
    if wanted is not None and inventory.gpus and wanted != len(inventory.gpus):
        raise ConfigError(
            f"--gpus-per-node {wanted} differs from --gpus ({len(inventory.gpus)} GPUs per "
            "node); give one or make them agree"
        )
    return plan_nodes(inventory, model, options, nodes, config.slurm.shape), inventory


def node_config(config: FleetConfig, layout: NodesPlan) -> str:
    """What every node's `vllm-fleet up` reads: the fleet file with the planned replica count,
    without the slurm: section and without API keys (the node-local routers are not exposed;
    the job's router reads FLEET_API_KEYS from the environment)."""
    data = config_to_mapping(config)
    data.pop("slurm", None)
    data["router"]["api_keys"] = []
    data["replicas"] = layout.replicas_per_node or None
    # only what differs from the defaults, so a reader sees the fleet's own choices.
    defaults = config_to_mapping(FleetConfig())
    for key, default in defaults.items():
        value = data.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            data[key] = {k: v for k, v in value.items() if default.get(k) != v}
        if data.get(key) in (default, {}):
            data.pop(key, None)
    text: str = yaml.safe_dump(data, sort_keys=False)
    return text


def job_spec(
    config: FleetConfig,
    layout: NodesPlan,
    log_dir: Path,
    batch: tuple[str, str] | None = None,
) -> JobSpec:
    settings = config.slurm
    python = settings.python or ("python3" if settings.container else sys.executable)
    public = config.with_overrides({"router.host": "0.0.0.0"})
    router = router_spec(public, Path(BACKENDS)).command
    return JobSpec(
        layout=layout,
        settings=settings,
        log_dir=str(log_dir),
        python=python,
        router_command=(PY, *router[1:]),
        node_config=node_config(config, layout),
        model=config.served_model_name or config.model or "",
        api_keys=bool(config.router.api_keys),
        batch_input=batch[0] if batch else None,
        batch_output=batch[1] if batch else None,
    )


def _paths(args: argparse.Namespace) -> tuple[Path, tuple[str, str] | None]:
    if args.batch:
        if not args.output:
            raise ConfigError("--batch: give the output file with -o, e.g. -o out.jsonl")
        batch = (str(Path(args.batch).resolve()), str(Path(args.output).resolve()))
        return Path(args.script or "vllm-fleet-batch.sbatch"), batch
    if args.script:
        raise ConfigError("--script: only with --batch; without it -o names the script")
    if not args.output:
        raise ConfigError("-o: required; the sbatch script to write, e.g. -o job.sbatch")
    return Path(args.output), None


def run_slurm(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes}: must be at least 1")
    script_path, batch = _paths(args)
    config = config_from_args(args)
    layout, _ = plan_job(config, args.nodes, args.params)
    log_dir = Path(config.slurm.log_dir).resolve()
    # sbatch does not create the --output directory: a job whose log cannot be opened fails
    # without a word, so it exists before the script is handed over.
    log_dir.mkdir(parents=True, exist_ok=True)
    script_path.write_text(render_script(job_spec(config, layout, log_dir, batch)))
    script_path.chmod(0o755)
    print(layout.describe())
    print(f"Wrote {script_path} (logs and the endpoint file in {log_dir}).")
    if not args.submit:
        print(f"Submit with: sbatch {script_path}")
        return 0
    return submit(script_path)


def submit(script_path: Path) -> int:
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", str(script_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=os.environ,
            check=False,
        )
    except FileNotFoundError:
        raise ConfigError("--submit: sbatch is not installed here; run on a login node") from None
    if done.returncode != 0:
        raise ConfigError(f"--submit: sbatch refused the job: {done.stderr.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    print(f"Submitted job {job_id}. Follow it with `vllm-fleet status --job {job_id}`; "
          f"stop it with `vllm-fleet down --job {job_id}`.")  # fmt: skip
    return 0
