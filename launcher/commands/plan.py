"""`vllm-fleet plan`: show how the model would be laid out over the GPUs, and why.

The flags are added by ``add_plan_arguments`` so `vllm-fleet up` takes the same ones; every flag
defaults to ``None`` ("not given") so a fleet file can supply the value instead. Values are
parsed here rather than by argparse so a bad one is one ``ConfigError`` line, not a usage dump.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.inventory import resolve_inventory
from vllm_fleet.launcher.model_files import Fetcher, fetch_from_hub
from vllm_fleet.launcher.model_size import human_params, normalize_dtype, size_model
from vllm_fleet.launcher.plan_types import GIB, FitCheck, Inventory, ModelSize, Plan, gib
from vllm_fleet.launcher.planner import PlanOptions, plan


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "plan",
        help="show the replica / tensor-parallel layout for a model on these GPUs",
        description=(
            "Find the GPUs (or take --gpus), size the model, and print the replicas vllm-fleet "
            "up would start: tensor-parallel size and why, GPUs and port of each replica. "
            "Nothing is started."
        ),
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="fleet.yaml to plan (one model or a models: list); flags override its values",
    )
    add_plan_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help="plan for N nodes like this one (the shape `vllm-fleet slurm` runs)",
    )
    parser.set_defaults(func=run)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared by `plan` and `up`; all default to None (= not given)."""
    add = parser.add_argument
    add("--model", help="Hugging Face model name or local model directory (as vLLM's --model)")
    add(
        "--gpus",
        help="declare the GPUs instead of detecting them: 8x80GB, 4xA100-40GB, 2xH200, "
        "4xA100-80GB+4xA100-40GB, none, or an inventory YAML file",
    )
    add("--params", help="parameter count when no config.json is at hand, e.g. 70B")
    add("--dtype", help="weight dtype: auto (default), bfloat16/bf16, float16/fp16, float32")
    add("--max-model-len", help="context length (default: the model's, reduced if needed)")
    add("--gpu-memory-utilization", help="fraction of each GPU's memory vLLM may use (0.9)")
    add("--max-num-seqs", help="maximum concurrent sequences per replica (vLLM's default)")
    add("--tensor-parallel-size", help="GPUs per replica (default: the smallest that fits)")
    add("--replicas", help="number of replicas (default: as many as the GPUs hold; CPU: 1)")
    add("--engine", help="vllm (default) or sim (the built-in simulator, no GPU memory)")
    add("--base-port", help="port of replica-0; replica i gets base-port + i (8001)")
    add("--host", help="address the engine servers bind to (127.0.0.1)")
    add("--served-model-name", help="model name clients send (default: --model)")
    add(
        "--engine-arg",
        action="append",
        metavar="ARG",
        help="extra engine argument, repeatable: --engine-arg=--enable-prefix-caching",
    )


def _number(args: argparse.Namespace, name: str, kind: type, example: str) -> Any:
    raw = getattr(args, name, None)
    if raw is None:
        return None
    try:
        return kind(raw)
    except (TypeError, ValueError):
        flag = "--" + name.replace("_", "-")
        noun = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{flag} {raw!r} is not {noun}; e.g. {flag} {example}") from None


def plan_options_from_args(args: argparse.Namespace, python: str) -> PlanOptions:
    """PlanOptions from the shared flags alone (defaults for everything not given)."""
    engine = getattr(args, "engine", None) or "vllm"
    if engine not in ("vllm", "sim"):
        raise ConfigError(f"--engine {engine!r} is unknown; use vllm or sim")
    model = getattr(args, "model", None)
    if not model:
        raise ConfigError("--model is required: a Hugging Face name or a local model directory")
    defaults = PlanOptions(model=model)
    values = {
        "max_model_len": _number(args, "max_model_len", int, "8192"),
        "gpu_memory_utilization": _number(args, "gpu_memory_utilization", float, "0.9"),
        "max_num_seqs": _number(args, "max_num_seqs", int, "256"),
        "tensor_parallel_size": _number(args, "tensor_parallel_size", int, "2"),
        "replicas": _number(args, "replicas", int, "2"),
        "base_port": _number(args, "base_port", int, "8001"),
    }
    return PlanOptions(
        model=model,
        engine=engine,
        served_model_name=getattr(args, "served_model_name", None),
        dtype=normalize_dtype(getattr(args, "dtype", None) or "auto"),
        max_model_len=values["max_model_len"],
        gpu_memory_utilization=(
            values["gpu_memory_utilization"]
            if values["gpu_memory_utilization"] is not None
            else defaults.gpu_memory_utilization
        ),
        max_num_seqs=values["max_num_seqs"],
        tensor_parallel_size=values["tensor_parallel_size"],
        replicas=values["replicas"],
        base_port=values["base_port"] if values["base_port"] is not None else defaults.base_port,
        host=getattr(args, "host", None) or defaults.host,
        extra_args=tuple(getattr(args, "engine_arg", None) or ()),
        python=python,
    )


def host_cpus() -> int:
    """CPUs this process may run on (respects taskset and container CPU sets)."""
    return len(os.sched_getaffinity(0))


def load_plan_inputs(
    options: PlanOptions,
    gpus: str | Sequence[str] | None = None,
    params: str | None = None,
    env: Mapping[str, str] | None = None,
    fetch: Fetcher | None = fetch_from_hub,
    cpu_count: Callable[[], int | None] = host_cpus,
) -> tuple[Inventory, ModelSize | None]:
    """The I/O before planning: find or read the GPUs and the CPU count, size the model.

    The planner never reads the machine: `cpu_count` is this host's for `plan` and `up`, and
    what `compose --cpus` says (or nothing) for a file another host runs. The sim engine needs
    no size. Without GPUs the size is only used to fit the CPU KV cache, so a model that
    cannot be sized there still plans (vLLM will size it when it starts).
    """
    inventory = dataclasses.replace(resolve_inventory(gpus), cpus=cpu_count())
    if options.engine == "sim" and params is None:
        return inventory, None
    try:
        model = size_model(options.model, params=params, dtype=options.dtype, env=env, fetch=fetch)
    except ConfigError:
        if inventory.gpus or params is not None:
            raise
        return inventory, None
    return inventory, model


def options_from_args(
    args: argparse.Namespace, python: str = sys.executable
) -> tuple[PlanOptions, Inventory, ModelSize | None]:
    """Everything `plan` (or `up`) needs from the shared flags."""
    options = plan_options_from_args(args, python)
    inventory, model = load_plan_inputs(
        options, getattr(args, "gpus", None), getattr(args, "params", None)
    )
    return options, inventory, model


def run(args: argparse.Namespace) -> int:
    if args.config and args.nodes is None:
        return _run_config(args)
    options, inventory, model = options_from_args(args)
    if args.nodes is not None:
        from vllm_fleet.launcher.slurm.layout import plan_nodes

        nodes = plan_nodes(inventory, model, options, args.nodes)
        layout_notes = set(nodes.node_plan.notes)
        if args.json:
            print(json.dumps({"shape": nodes.shape, "nodes": nodes.nodes,
                              "node_plan": plan_to_json(nodes.node_plan)}, indent=2))  # fmt: skip
        else:
            notes = "".join(f"\n  - {note}" for note in nodes.notes if note not in layout_notes)
            print(f"{nodes.describe()}{notes}\nEach node:\n{render(nodes.node_plan, options)}")
        return 0
    layout = plan(inventory, model, options)
    if args.json:
        print(json.dumps(plan_to_json(layout), indent=2))
    else:
        print(render(layout, options))
    return 0


def _run_config(args: argparse.Namespace) -> int:
    """`plan --config fleet.yaml`: every model of the file, placed together."""
    from vllm_fleet.launcher.commands.plan_fleet import (
        fleet_to_json,
        plan_fleet_config,
        render_fleet,
    )
    from vllm_fleet.launcher.commands.up import config_from_args

    config = config_from_args(args)
    fleet = plan_fleet_config(config, getattr(args, "params", None), source=args.config)
    print(json.dumps(fleet_to_json(fleet), indent=2) if args.json else render_fleet(fleet))
    return 0


# --------------------------------------------------------------------------- output


def _plain(value: Any) -> Any:
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def plan_to_json(layout: Plan) -> dict[str, Any]:
    model = layout.model
    data: dict[str, Any] = {
        "engine": layout.engine,
        "tensor_parallel_size": layout.tensor_parallel_size,
        "max_model_len": layout.max_model_len,
        "kv_cache_tokens": layout.kv_cache_tokens,
        "model_bytes": model.weight_bytes if model else None,
        "kv_bytes_per_token": model.kv_bytes_per_token if model else None,
        "model": _plain(dataclasses.asdict(model)) if model else None,
        "inventory": _plain(dataclasses.asdict(layout.inventory)),
        "replicas": [
            {
                "name": r.name,
                "gpus": list(r.gpus),
                "port": r.port,
                "url": r.url,
                "tensor_parallel_size": r.tensor_parallel_size,
                "command": list(r.command),
                "env": dict(r.env),
            }
            for r in layout.replicas
        ],
        "leftover_gpus": list(layout.leftover_gpus),
        "notes": list(layout.notes),
        "fit_checks": [_plain(dataclasses.asdict(c)) for c in layout.fit_checks],
    }
    return data


def _gpu_summary(inventory: Inventory) -> str:
    if not inventory.gpus:
        if inventory.source == "declared":
            return "GPUs: none (declared)"
        why = "; ".join(inventory.notes)
        return f"GPUs: none found{f' ({why})' if why else ''}"
    kinds: dict[tuple[str, int], int] = {}
    for gpu in inventory.gpus:
        kinds[(gpu.name, gpu.memory_bytes)] = kinds.get((gpu.name, gpu.memory_bytes), 0) + 1
    parts = [
        f"{n}x {name}" + ("" if f"{round(mem / GIB)}GB" in name.upper() else f" ({gib(mem)})")
        for (name, mem), n in kinds.items()
    ]
    line = f"GPUs: {' + '.join(parts)}, {inventory.source}"
    numa = sorted({g.numa_node for g in inventory.gpus if g.numa_node >= 0})
    if numa:
        line += f"; NUMA nodes {','.join(map(str, numa))}"
    if any(g.nvlink_peers for g in inventory.gpus):
        line += "; NVLink"
    return "\n".join([line, *(f"  {n}" for n in inventory.notes)])


def _size(n: float) -> str:
    """GiB for model-sized numbers, smaller units for tiny test models."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale / 10:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _model_summary(model: ModelSize, layout: Plan) -> list[str]:
    lines = [
        f"Model: {model.name}: {human_params(model.num_params)} parameters, {model.dtype}, "
        f"{_size(model.weight_bytes)} of weights ({model.source})",
        f"  KV cache: {model.kv_bytes_per_token / 1024:g} KiB per token; context "
        f"{model.max_model_len} tokens = {_size(model.kv_bytes_per_token * model.max_model_len)}",
    ]
    if layout.max_model_len and layout.kv_cache_tokens:
        per_seq = layout.kv_cache_tokens / layout.max_model_len
        lines.append(
            f"  planned: max_model_len {layout.max_model_len}; each replica has KV cache room "
            f"for ~{layout.kv_cache_tokens} tokens "
            f"({_size(layout.kv_cache_tokens * model.kv_bytes_per_token)}, "
            f"{per_seq:.1f} full-length sequences)"
        )
    lines += [f"  {note}" for note in model.notes]
    return lines


def _fit_table(checks: Sequence[FitCheck], chosen: set[tuple[str, int]]) -> list[str]:
    if not checks:
        return []
    first = checks[0]
    lines = [
        f"Memory per GPU, GiB: weights/TP + {first.overhead_bytes / GIB:.1f} overhead + KV cache "
        f"for {first.kv_tokens} tokens/TP, against gpu_memory_utilization x GPU memory:"
    ]
    several = len({c.gpu_name for c in checks}) > 1
    for c in checks:
        total = c.weight_bytes + c.overhead_bytes + c.kv_bytes
        verdict = "fits" if c.fits else "does not fit"
        mark = "  <- chosen" if (c.gpu_name, c.tensor_parallel_size) in chosen else ""
        lines.append(
            f"  {c.gpu_name + ' ' if several else ''}TP{c.tensor_parallel_size}: "
            f"{c.weight_bytes / GIB:.1f} + {c.overhead_bytes / GIB:.1f} + {c.kv_bytes / GIB:.1f} "
            f"= {gib(total)} of {gib(c.usable_bytes)}  {verdict}{mark}"
        )
    return lines


def render(layout: Plan, options: PlanOptions) -> str:
    lines = [_gpu_summary(layout.inventory)]
    if layout.model is not None:
        lines += _model_summary(layout.model, layout)
    gpu_names = {g.index: g.name for g in layout.inventory.gpus}
    chosen = {(gpu_names[r.gpus[0]], r.tensor_parallel_size) for r in layout.replicas if r.gpus}
    lines += _fit_table(layout.fit_checks, chosen)
    count = len(layout.replicas)
    engine = "simulated " if layout.engine == "sim" else ""
    where = "CPU" if not layout.inventory.gpus and layout.engine == "vllm" else ""
    head = f"Plan: {count} {engine}replica{'s' if count != 1 else ''}"
    sizes = [r.tensor_parallel_size for r in layout.replicas]
    if layout.engine == "vllm" and len(set(sizes)) > 1:
        head += " (" + " + ".join(f"{sizes.count(t)}x TP{t}" for t in sorted(set(sizes))) + ")"
    elif layout.engine == "vllm":
        head += f" x TP{layout.tensor_parallel_size}"
    head += f" on {where}" if where else ""
    if layout.max_model_len:
        head += f", max_model_len {layout.max_model_len}"
    lines.append(head)
    for r in layout.replicas:
        gpus = "GPUs " + ",".join(map(str, r.gpus)) if r.gpus else "no GPU"
        tp = f"  TP{r.tensor_parallel_size}" if len(set(sizes)) > 1 else ""
        lines.append(f"  {r.name}  {gpus}  port {r.port}{tp}")
    if layout.inventory.gpus:
        left = ",".join(map(str, layout.leftover_gpus)) or "none"
        lines.append(f"Leftover GPUs: {left}")
    if layout.replicas:
        first = layout.replicas[0]
        env = " ".join(
            f"{k}={shlex.quote(v)}" for k, v in first.env.items() if k not in options.env
        )
        lines.append(f"Command of {first.name}:")
        lines.append(f"  {env + ' ' if env else ''}{shlex.join(first.command)}")
    if layout.notes:
        lines.append("Notes:")
        lines += [f"  - {note}" for note in layout.notes]
    return "\n".join(lines)


__all__ = [
    "add_plan_arguments",
    "host_cpus",
    "load_plan_inputs",
    "options_from_args",
    "plan_options_from_args",
    "plan_to_json",
    "register",
    "render",
]
