"""Decide how many replicas to run, how wide each is, and which GPUs and port each gets.

A pure function: ``plan`` sees an ``Inventory``, a ``ModelSize`` and the user's ``PlanOptions``
and returns a ``Plan``, so every layout decision can be tested with hand-computed numbers and no
GPU. This module checks the options and picks the engine; the parts live where a reader looks:

* ``plan_gpu``: the GPU plan (per kind of GPU a TP size, groups, replicas, the notes why);
* ``plan_sizing``: the GPU memory model, the tensor-parallel size and the context it allows;
* ``plan_topology``: which GPUs form a TP group (NUMA node, NVLink, PCIe order);
* ``plan_multi_node``: the Helm command suggested when a model does not fit one node;
* ``plan_cpu``: vLLM's CPU engine when there is no GPU;
* ``plan_replicas``: the replicas' ports and command lines (through ``vllm_args``).

``PlanOptions`` (``plan_types``) and ``PlanError`` (``errors``) are importable from here too:
with ``plan`` they are the planner's interface.
"""

from __future__ import annotations

from vllm_fleet.launcher.errors import ConfigError, PlanError
from vllm_fleet.launcher.model_size import normalize_dtype
from vllm_fleet.launcher.plan_cpu import plan_cpu
from vllm_fleet.launcher.plan_gpu import plan_gpu
from vllm_fleet.launcher.plan_replicas import replica_ports, sim_replica_command
from vllm_fleet.launcher.plan_types import Inventory, ModelSize, Plan, PlanOptions, ReplicaSpec
from vllm_fleet.launcher.vllm_args import OWNED_FLAGS

__all__ = ["PlanError", "PlanOptions", "plan"]


def plan(inventory: Inventory, model: ModelSize | None, options: PlanOptions) -> Plan:
    """Lay ``model`` out on ``inventory``; raise ``PlanError`` when it cannot be done."""
    _validate_options(options)
    if options.engine == "sim":
        return _plan_sim(inventory, model, options)
    if options.engine != "vllm":
        raise PlanError(f"--engine {options.engine!r} is unknown; use vllm or sim")
    if not inventory.gpus:
        return plan_cpu(inventory, model, options)
    return plan_gpu(inventory, model, options)


def _validate_options(options: PlanOptions) -> None:
    """Every option checked before any layout, so the error names the flag the user typed."""
    if not options.model:
        raise PlanError("--model is required: a Hugging Face name or a local model directory")
    if not 0 < options.gpu_memory_utilization <= 1:
        raise PlanError(
            f"--gpu-memory-utilization {options.gpu_memory_utilization:g} must be in (0, 1], "
            "e.g. 0.9"
        )
    for name, value in (
        ("--max-model-len", options.max_model_len),
        ("--max-num-seqs", options.max_num_seqs),
        ("--tensor-parallel-size", options.tensor_parallel_size),
        ("--replicas", options.replicas),
    ):
        if value is not None and value < 1:
            raise PlanError(f"{name} {value} must be a positive integer")
    try:
        normalize_dtype(options.dtype)
    except ConfigError as exc:
        raise PlanError(str(exc)) from None
    if not 1 <= options.base_port <= 65535:
        raise PlanError(f"--base-port {options.base_port} must be a TCP port (1-65535)")
    for arg in options.extra_args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise PlanError(
                f"extra engine argument {flag} is set by the planner; "
                f"use vllm-fleet's {OWNED_FLAGS[flag]} option instead"
            )


def _plan_sim(inventory: Inventory, model: ModelSize | None, options: PlanOptions) -> Plan:
    """Simulated replicas use no memory: one per GPU (or --replicas), no tensor parallel."""
    if options.tensor_parallel_size not in (None, 1):
        raise PlanError(
            f"--tensor-parallel-size {options.tensor_parallel_size} does not apply to the sim "
            "engine; leave it unset"
        )
    count = options.replicas or len(inventory.gpus) or 1
    replicas = tuple(
        ReplicaSpec(
            name=f"replica-{i}",
            host=options.host,
            port=port,
            model=options.model,
            gpus=(),
            tensor_parallel_size=1,
            command=sim_replica_command(options, port),
            env=dict(options.env),
        )
        for i, port in enumerate(replica_ports(options, count))
    )
    why = "--replicas" if options.replicas else ("one per GPU" if inventory.gpus else "default")
    return Plan(
        model=model,
        inventory=inventory,
        tensor_parallel_size=1,
        replicas=replicas,
        notes=(f"sim engine: {count} simulated replica(s) ({why}); no GPU memory is used",),
        engine="sim",
        max_model_len=options.max_model_len,
    )
