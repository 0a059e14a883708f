"""The fleet plan of a fleet file: every model sized and placed (``plan_models``), printed as
one table per fleet (`vllm-fleet plan --config`) or as JSON, and used by `up` and `compose`.

A fleet of one model prints exactly as `vllm-fleet plan --model` always has.
"""

from __future__ import annotations

import itertools
import shlex
from collections.abc import Callable
from typing import Any

from vllm_fleet.launcher.commands.plan import host_cpus, load_plan_inputs, plan_to_json, render
from vllm_fleet.launcher.config import FleetConfig
from vllm_fleet.launcher.fleet_models import resolve_models
from vllm_fleet.launcher.plan_models import plan_models
from vllm_fleet.launcher.plan_types import FleetPlan, Inventory, ModelPlan, ModelSize


def plan_fleet_config(
    config: FleetConfig,
    params: str | None = None,
    cpu_count: Callable[[], int | None] = host_cpus,
    source: str = "fleet.yaml",
) -> FleetPlan:
    """Read the GPUs once, size every model, place them all (the I/O before the pure plan)."""
    requests = resolve_models(config, source)
    sizes: dict[str, ModelSize | None] = {}
    inventory: Inventory | None = None
    for req in requests:
        found, size = load_plan_inputs(
            req.options, config.gpus, params if len(requests) == 1 else None, cpu_count=cpu_count
        )
        inventory = inventory or found
        sizes[req.name] = size
    assert inventory is not None  # resolve_models returns at least one model
    return plan_models(inventory, sizes, requests)


def render_fleet(fleet: FleetPlan) -> str:
    """The plan as `vllm-fleet plan` prints it: a table of models, then each replica."""
    if len(fleet.models) == 1:
        only = fleet.models[0]
        return render(only.plan, only.options)
    lines = [render(fleet.models[0].plan, fleet.models[0].options).splitlines()[0]]
    header = ("MODEL", "ENGINE", "ASKED", "REPLICAS", "TP", "GPUS", "PORTS", "MAX_LEN", "LORA")
    rows: list[tuple[str, ...]] = [header, *(_model_row(m) for m in fleet.models)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines.append(f"Plan: {len(fleet.replicas)} replicas of {len(fleet.models)} models")
    for row in rows:
        lines.append(
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        )
    lines.append("Replicas:")
    for m in fleet.models:
        for r in m.plan.replicas:
            gpus = "GPUs " + ",".join(map(str, r.gpus)) if r.gpus else "no GPU"
            lines.append(f"  {r.name}  {m.name}  {gpus}  port {r.port}  TP{r.tensor_parallel_size}")
    if fleet.inventory.gpus:
        lines.append(f"Leftover GPUs: {','.join(map(str, fleet.leftover_gpus)) or 'none'}")
    for m in fleet.models:
        if m.plan.replicas:
            first = m.plan.replicas[0]
            env = " ".join(
                f"{k}={shlex.quote(v)}" for k, v in first.env.items() if k not in m.options.env
            )
            lines.append(f"Command of {first.name}:")
            lines.append(f"  {env + ' ' if env else ''}{shlex.join(first.command)}")
    notes = [*fleet.notes, *(f"{m.name}: {n}" for m in fleet.models for n in m.plan.notes)]
    if notes:
        lines.append("Notes:")
        lines += [f"  - {note}" for note in notes]
    return "\n".join(lines)


def _model_row(m: ModelPlan) -> tuple[str, ...]:
    replicas = m.plan.replicas
    sizes = sorted({r.tensor_parallel_size for r in replicas})
    ports = [r.port for r in replicas]
    port_text = (
        "-" if not ports else str(ports[0]) if len(ports) == 1 else f"{min(ports)}-{max(ports)}"
    )
    gpus = " ".join(",".join(map(str, r.gpus)) for r in replicas if r.gpus) or "-"
    return (
        m.name,
        m.plan.engine,
        m.asked,
        str(len(replicas)),
        "/".join(map(str, sizes)) or "-",
        gpus,
        port_text
        if len(set(ports)) == len(ports) and _consecutive(ports)
        else ",".join(map(str, ports)),
        str(m.plan.max_model_len or "-"),
        ",".join(name for name, _ in m.options.lora_modules) or "-",
    )


def _consecutive(ports: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(ports))


def fleet_to_json(fleet: FleetPlan) -> dict[str, Any]:
    """One object for machines. A one-model fleet keeps the single-model keys at the top (what
    `plan --json` always printed) and adds ``models``, like every fleet."""
    models = [
        {
            "name": m.name,
            "model": m.options.model,
            "engine": m.plan.engine,
            "asked": m.asked,
            "replicas": len(m.plan.replicas),
            "tensor_parallel_size": m.plan.tensor_parallel_size,
            "gpus": [list(r.gpus) for r in m.plan.replicas],
            "ports": [r.port for r in m.plan.replicas],
            "max_model_len": m.plan.max_model_len,
            "lora_modules": dict(m.options.lora_modules),
            "plan": plan_to_json(m.plan),
        }
        for m in fleet.models
    ]
    if len(fleet.models) == 1:
        return {**plan_to_json(fleet.models[0].plan), "models": models}
    return {
        "inventory": plan_to_json(fleet.models[0].plan)["inventory"],
        "models": models,
        "replicas": [
            {
                "name": r.name,
                "model": r.served_model,
                "gpus": list(r.gpus),
                "port": r.port,
                "url": r.url,
                "tensor_parallel_size": r.tensor_parallel_size,
                "command": list(r.command),
                "env": dict(r.env),
            }
            for r in fleet.replicas
        ],
        "leftover_gpus": list(fleet.leftover_gpus),
        "notes": list(fleet.notes),
    }
