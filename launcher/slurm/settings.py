"""fleet.yaml's ``slurm:`` section: everything site-specific about running the fleet as a job.

Clusters differ in partitions, accounts, modules to load and container runtimes; none of that is
hard-coded in the script (``vllm_fleet.launcher.slurm.script``), it all comes from here, and every
value can be given as a `vllm-fleet slurm` flag too. ``vllm_fleet.launcher.config`` validates this
section like the rest of the file (unknown keys, types, and the checks in each field's metadata).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

ContainerRuntime = Literal["apptainer", "pyxis"]
ShapeChoice = Literal["auto", "replicas", "ray"]

#: SLURM's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
#: characters never allowed in a value pasted into an #SBATCH line.
_UNSAFE = re.compile(r"[\s'\"`$\\;]")


def _meta(example: str, check: Callable[[Any], str | None] | None = None) -> dict[str, Any]:
    return {"example": example, "check": check}


def check_time(value: str | None) -> str | None:
    if value is None or _TIME.match(value):
        return None
    return "must be a SLURM time limit like 60, 4:00:00 or 1-00:00:00"


def check_word(value: str | None) -> str | None:
    """Partition, account, QOS and the like go into #SBATCH lines: one word each."""
    if value is None or (value and not _UNSAFE.search(value)):
        return None
    return "must be one word without spaces, quotes or $"


def _check_constraint(value: str | None) -> str | None:
    # constraints use &, |, [] and () but never spaces or shell quoting.
    return check_word(value)


def _check_image(value: str | None) -> str | None:
    if value is None or (value and not any(c.isspace() for c in value)):
        return None
    return "must be an image reference or a .sif path, e.g. docker://vllm/vllm-openai:v0.32.0"


def _check_env(value: dict[str, str]) -> str | None:
    bad = [k for k in value if not k.isidentifier()]
    return f"{bad[0]!r} is not a variable name; use letters, digits and _" if bad else None


def _check_sbatch(value: tuple[str, ...]) -> str | None:
    bad = [v for v in value if not v.startswith("--") or "\n" in v]
    return f"{bad[0]!r} is not an sbatch option; write it like --mem=0" if bad else None


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v >= low else f"must be >= {low:g}"


@dataclass(frozen=True)
class SlurmSettings:
    """How the fleet runs as a SLURM job; ``None`` leaves the choice to the cluster's default."""

    partition: str | None = field(
        default=None, metadata=_meta("slurm: {partition: gpu}", check_word)
    )
    #: wall-clock limit in SLURM's format.
    time: str | None = field(default=None, metadata=_meta("slurm: {time: '4:00:00'}", check_time))
    account: str | None = field(
        default=None, metadata=_meta("slurm: {account: proj42}", check_word)
    )
    qos: str | None = field(default=None, metadata=_meta("slurm: {qos: normal}", check_word))
    constraint: str | None = field(
        default=None, metadata=_meta("slurm: {constraint: 'h100&ib'}", _check_constraint)
    )
    #: whole nodes only (no other job shares them).
    exclusive: bool = field(default=False, metadata=_meta("slurm: {exclusive: true}"))
    #: GPUs to request per node; None: as many as the declared inventory (gpus:) has.
    gpus_per_node: int | None = field(
        default=None, metadata=_meta("slurm: {gpus_per_node: 8}", _at_least(0))
    )
    #: shell lines run first on every node, e.g. module loads or a venv activation.
    setup: tuple[str, ...] = field(
        default=(), metadata=_meta("slurm: {setup: ['module load cuda/12.4']}")
    )
    #: variables exported in the job (HF_HOME, NCCL settings...).
    env: dict[str, str] = field(
        default_factory=dict,
        metadata=_meta("slurm: {env: {HF_HOME: /scratch/hf}}", _check_env),
    )
    #: image every fleet process runs in; None runs on the node's own software.
    container: str | None = field(
        default=None, metadata=_meta("slurm: {container: /images/vllm.sif}", _check_image)
    )
    container_runtime: ContainerRuntime = field(
        default="apptainer", metadata=_meta("slurm: {container_runtime: pyxis}")
    )
    #: where the job's log, its endpoint file (<job id>.json) and the nodes' run directories go;
    #: must be on a filesystem every node and the login node see.
    log_dir: str = field(default="slurm-logs", metadata=_meta("slurm: {log_dir: /scratch/fleet}"))
    job_name: str = field(
        default="vllm-fleet", metadata=_meta("slurm: {job_name: chat}", check_word)
    )
    #: Python with vllm-fleet installed on the nodes; None: the one running `vllm-fleet slurm`
    #: (python3 inside a container).
    python: str | None = field(
        default=None, metadata=_meta("slurm: {python: /opt/venv/bin/python}")
    )
    #: auto: the planner decides (replicas when the model fits a node, else Ray across nodes).
    shape: ShapeChoice = field(default="auto", metadata=_meta("slurm: {shape: ray}"))
    #: seconds the job waits for its fleet to become ready before it gives up.
    ready_timeout_s: float = field(
        default=1800.0, metadata=_meta("slurm: {ready_timeout_s: 1800}", _at_least(1))
    )
    #: further #SBATCH options, verbatim (e.g. --mem=0).
    extra_sbatch: tuple[str, ...] = field(
        default=(), metadata=_meta("slurm: {extra_sbatch: ['--mem=0']}", _check_sbatch)
    )
