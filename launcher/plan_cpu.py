"""The plan without GPUs: vLLM's CPU engine, its KV cache space, context and OpenMP threads.

Pure like the rest of the planner: the host's CPU count comes in the inventory
(``Inventory.cpus``), read at the command line's edge, never here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from vllm_fleet.launcher.errors import PlanError
from vllm_fleet.launcher.plan_replicas import (
    replica_kv_events_port,
    replica_ports,
    vllm_replica_command,
)
from vllm_fleet.launcher.plan_sizing import CONTEXT_FLOOR, CONTEXT_STEP
from vllm_fleet.launcher.plan_types import GIB, Inventory, ModelSize, Plan, PlanOptions, ReplicaSpec
from vllm_fleet.launcher.vllm_args import DEFAULT_KV_CACHE_GIB, cpu_engine_env

#: default KV cache of the CPU engine in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE).
CPU_KVCACHE_SPACE_GIB = DEFAULT_KV_CACHE_GIB


def _cpu_kv_space_gib(options: PlanOptions) -> int:
    raw = options.env.get("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_SPACE_GIB))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise PlanError(
            f"VLLM_CPU_KVCACHE_SPACE={raw!r} must be a whole number of GiB >= 1, e.g. 4"
        )
    return value


def plan_cpu(inventory: Inventory, model: ModelSize | None, options: PlanOptions) -> Plan:
    """Replicas of vLLM's CPU engine, the context cut to what its KV cache holds."""
    if options.tensor_parallel_size not in (None, 1):
        raise PlanError(
            f"--tensor-parallel-size {options.tensor_parallel_size} needs GPUs, but none was "
            "found; the CPU engine runs tensor-parallel size 1 (leave it unset)"
        )
    space = _cpu_kv_space_gib(options)
    count = options.replicas or 1
    # Measured settings that let several CPU replicas share a small machine
    # (vllm_fleet.launcher.vllm_args); the user's env wins. Offline mode only when the user asks: a
    # hub model must download. The thread count comes from the inventory's CPU count, a fact of the
    # host that runs the replicas: read at the command line's edge (up, demo), given by `compose
    # --cpus`, or unknown.
    env = {**cpu_engine_env(count, inventory.cpus, kv_cache_gib=space), **options.env}
    notes = [
        "no GPU found: using vLLM's CPU engine "
        f"(KV cache {space} GiB per replica, set VLLM_CPU_KVCACHE_SPACE to change)",
        _threads_note(inventory.cpus, count, env),
    ]
    max_len = options.max_model_len
    kv_tokens = 0
    if model is not None and model.kv_bytes_per_token > 0:
        kv_tokens = space * GIB // model.kv_bytes_per_token
        target = options.max_model_len or model.max_model_len
        if kv_tokens < target:
            floor = min(CONTEXT_FLOOR, target)
            if options.max_model_len is not None or kv_tokens < floor:
                need = math.ceil(
                    max(target if options.max_model_len else floor, 1)
                    * model.kv_bytes_per_token
                    / GIB
                )
                raise PlanError(
                    f"{model.name}: a {target if options.max_model_len else floor}-token context "
                    f"needs {need} GiB of CPU KV cache, VLLM_CPU_KVCACHE_SPACE gives {space} GiB "
                    f"({kv_tokens} tokens); raise VLLM_CPU_KVCACHE_SPACE or lower --max-model-len"
                )
            max_len = kv_tokens // CONTEXT_STEP * CONTEXT_STEP
            notes.append(
                f"max_model_len reduced from {target} to {max_len}: the {space} GiB CPU KV cache "
                f"holds {kv_tokens} tokens (raise VLLM_CPU_KVCACHE_SPACE for more)"
            )
        elif options.max_model_len is None and target != model.max_model_len:
            max_len = target
    replicas = tuple(
        ReplicaSpec(
            name=f"replica-{i}",
            host=options.host,
            port=port,
            model=options.model,
            gpus=(),
            tensor_parallel_size=1,
            command=vllm_replica_command(options, port, 1, max_len, on_gpu=False),
            kv_events_port=replica_kv_events_port(options, port),
            env=dict(env),
        )
        for i, port in enumerate(replica_ports(options, count))
    )
    return Plan(
        model=model,
        inventory=inventory,
        tensor_parallel_size=1,
        replicas=replicas,
        notes=tuple(notes),
        engine="vllm",
        max_model_len=max_len,
        kv_cache_tokens=kv_tokens,
    )


def _threads_note(cpus: int | None, replicas: int, env: Mapping[str, str]) -> str:
    threads = env.get("OMP_NUM_THREADS")
    if cpus is None:
        if threads is not None:
            return f"OMP_NUM_THREADS={threads} per replica, as given"
        return (
            "CPU count of the host not given: OMP_NUM_THREADS is left to vLLM (each replica "
            "uses every CPU it sees); `vllm-fleet compose --cpus N` sets it"
        )
    return f"OMP_NUM_THREADS={threads} per replica ({replicas} replica(s) on {cpus} CPUs)"
