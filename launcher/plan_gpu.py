"""The plan on GPUs: per kind of GPU the smallest TP size that fits (``plan_sizing``), grouped
by topology (``plan_topology``), one replica per group, and the notes that say why.

When nothing fits, the error carries the numbers and, for a model too big for one node, the
multi-node command (``plan_multi_node``).
"""

from __future__ import annotations

from vllm_fleet.launcher.errors import PlanError
from vllm_fleet.launcher.plan_multi_node import multi_node_hint
from vllm_fleet.launcher.plan_replicas import (
    replica_kv_events_port,
    replica_ports,
    vllm_replica_command,
)
from vllm_fleet.launcher.plan_sizing import (
    CONTEXT_FLOOR,
    MIN_KV_TOKENS,
    GpuPool,
    TpChoice,
    best_reduced_context,
    choose_sizes,
    fit_check,
    gpu_pools,
    round_context,
    tp_candidates,
)
from vllm_fleet.launcher.plan_topology import gpu_indices, tp_groups
from vllm_fleet.launcher.plan_types import (
    FitCheck,
    Gpu,
    Inventory,
    ModelSize,
    Plan,
    PlanOptions,
    ReplicaSpec,
    gib,
)


def plan_gpu(inventory: Inventory, model: ModelSize | None, options: PlanOptions) -> Plan:
    """Per kind of GPU the smallest TP that fits, its groups, one replica each."""
    pools = gpu_pools(inventory.gpus)
    notes: list[str] = []
    checks: list[FitCheck] = []
    if model is None:
        tp = options.tensor_parallel_size or 1
        choices = [TpChoice(p, tp, 0) for p in pools if len(p.gpus) >= tp]
        max_len = options.max_model_len
        notes.append(
            f"model size unknown: tensor-parallel size {tp} "
            f"({'--tensor-parallel-size' if options.tensor_parallel_size else 'default'})"
        )
        if not choices:
            raise PlanError(
                f"--tensor-parallel-size {tp} needs {tp} GPUs of one kind, found "
                f"{', '.join(p.label for p in pools)}"
            )
    else:
        _validate_model_options(model, pools, options)
        max_len, want, choices, context_notes = choose_sizes(model, pools, options)
        checks = [
            fit_check(model, pool, tp, max_len, options.gpu_memory_utilization, want)
            for pool in pools
            for tp in tp_candidates(model, pool, options)
        ]
        if not choices:
            raise _no_fit_error(model, pools, options, max_len)
        notes += _why_notes(model, choices, checks, options)
        notes += context_notes

    groups: list[tuple[tuple[Gpu, ...], int]] = []
    leftovers: list[Gpu] = []
    used_pools = {c.pool.name + str(c.pool.memory_bytes) for c in choices}
    for pool in pools:
        if pool.name + str(pool.memory_bytes) not in used_pools:
            leftovers += pool.gpus
            notes.append(_unused_pool_note(model, pool, options, max_len))
    for choice in choices:
        found, rest, topo_notes = tp_groups(choice.pool.gpus, choice.tp)
        groups += [(g, choice.tp) for g in found]
        leftovers += rest
        notes += topo_notes
        if rest:
            notes.append(
                f"GPUs {gpu_indices(rest)} unused: {len(choice.pool.gpus)} GPUs of "
                f"{choice.pool.name} do not split evenly into TP{choice.tp} groups"
            )
    groups.sort(key=lambda item: min(g.index for g in item[0]))
    if options.replicas is not None:
        if options.replicas > len(groups):
            raise PlanError(
                f"--replicas {options.replicas} is more than these GPUs hold: at most "
                f"{len(groups)} replica(s) of TP{groups[0][1] if groups else 1}; "
                "lower --replicas or --tensor-parallel-size"
            )
        for group, _ in groups[options.replicas :]:
            leftovers += group
        if options.replicas < len(groups):
            unused = [g for group, _ in groups[options.replicas :] for g in group]
            notes.append(f"--replicas {options.replicas}: GPUs {gpu_indices(unused)} unused")
        groups = groups[: options.replicas]

    replicas = []
    for i, ((group, tp), port) in enumerate(
        zip(groups, replica_ports(options, len(groups)), strict=True)
    ):
        indices = tuple(sorted(g.index for g in group))
        env = dict(options.env)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(x) for x in indices)
        replicas.append(
            ReplicaSpec(
                name=f"replica-{i}",
                host=options.host,
                port=port,
                model=options.model,
                gpus=indices,
                tensor_parallel_size=tp,
                command=vllm_replica_command(options, port, tp, max_len, on_gpu=True),
                kv_events_port=replica_kv_events_port(options, port),
                env=env,
            )
        )
    tps = sorted({tp for _, tp in groups})
    if len(tps) > 1:
        notes.append(
            "GPU kinds differ: replicas use tensor-parallel sizes "
            + ", ".join(f"TP{t}" for t in tps)
        )
    kv_tokens = min((c.capacity_tokens for c in choices), default=0)
    return Plan(
        model=model,
        inventory=inventory,
        tensor_parallel_size=groups[0][1] if groups else 1,
        replicas=tuple(replicas),
        notes=tuple(notes),
        engine="vllm",
        max_model_len=max_len,
        kv_cache_tokens=kv_tokens,
        leftover_gpus=tuple(sorted(g.index for g in leftovers)),
        fit_checks=tuple(checks),
    )


def _validate_model_options(model: ModelSize, pools: list[GpuPool], options: PlanOptions) -> None:
    if options.max_model_len is not None and options.max_model_len > model.max_model_len:
        raise PlanError(
            f"--max-model-len {options.max_model_len} is longer than {model.name}'s context of "
            f"{model.max_model_len} tokens; use at most {model.max_model_len} or leave it unset"
        )
    tp = options.tensor_parallel_size
    if tp is None:
        return
    heads = model.num_attention_heads
    if heads > 0 and heads % tp:
        valid = ", ".join(str(t) for t in range(1, 9) if heads % t == 0)
        raise PlanError(
            f"--tensor-parallel-size {tp} must divide the model's {heads} attention heads; "
            f"use one of {valid}"
        )
    largest = max(len(p.gpus) for p in pools)
    if tp > largest:
        raise PlanError(
            f"--tensor-parallel-size {tp} needs {tp} GPUs of one kind, found "
            f"{', '.join(p.label for p in pools)}; lower it or leave it unset"
        )


def _why_notes(
    model: ModelSize, choices: list[TpChoice], checks: list[FitCheck], options: PlanOptions
) -> list[str]:
    """Why this TP: the next smaller one's budget, and what it would take to use it."""
    notes = []
    for choice in choices:
        smaller = [
            c
            for c in checks
            if c.gpu_name == choice.pool.name and c.tensor_parallel_size < choice.tp and not c.fits
        ]
        if options.tensor_parallel_size is not None:
            why = f"TP{choice.tp} from --tensor-parallel-size"
        else:
            why = f"TP{choice.tp} is the smallest tensor-parallel size that fits"
        why += f" on {choice.pool.label}"
        if not smaller:
            notes.append(why)
            continue
        rejected = smaller[-1]
        notes.append(f"{why}: {rejected.reason}")
        tp, room = rejected.tensor_parallel_size, rejected.capacity_tokens
        shorter = round_context(room)
        if options.max_model_len is None and room >= MIN_KV_TOKENS:
            count = len(choice.pool.gpus) // tp
            notes.append(
                f"TP{tp} would fit with --max-model-len {shorter} "
                f"({count} replicas instead of {len(choice.pool.gpus) // choice.tp})"
            )
        elif room >= CONTEXT_FLOOR:
            notes.append(
                f"TP{tp} has KV cache room for only {room} tokens "
                f"(< {MIN_KV_TOKENS} wanted); force it with --tensor-parallel-size {tp}"
                + ("" if options.max_model_len else f" (context then {shorter})")
            )
    return notes


def _unused_pool_note(
    model: ModelSize | None, pool: GpuPool, options: PlanOptions, max_len: int | None
) -> str:
    note = f"{pool.label} unused: "
    if model is None:
        return note + f"fewer GPUs than --tensor-parallel-size {options.tensor_parallel_size}"
    reduced = best_reduced_context(
        model, pool, options, max_len or model.max_model_len, MIN_KV_TOKENS
    )
    note += f"no TP size serves {model.name} with a {max_len}-token context on them"
    if reduced >= CONTEXT_FLOOR:
        note += f" (they could at --max-model-len {reduced}, for every replica)"
    return note


def _no_fit_error(
    model: ModelSize, pools: list[GpuPool], options: PlanOptions, max_len: int
) -> PlanError:
    fixed = options.max_model_len is not None
    tokens = max_len if fixed else min(CONTEXT_FLOOR, max_len)
    best: FitCheck | None = None
    for pool in pools:
        for tp in tp_candidates(model, pool, options):
            check = fit_check(model, pool, tp, tokens, options.gpu_memory_utilization, tokens)
            if best is None or check.capacity_tokens > best.capacity_tokens:
                best = check
    total = sum(len(p.gpus) for p in pools)
    where = ", ".join(p.label for p in pools)
    if best is None:
        return PlanError(f"{model.name}: no valid tensor-parallel size on {where}")
    context = f"--max-model-len {tokens}" if fixed else f"a {tokens}-token context"
    if options.tensor_parallel_size is not None:
        return PlanError(
            f"--tensor-parallel-size {options.tensor_parallel_size}: {model.name} "
            f"({gib(model.weight_bytes)} weights) with {context} does not fit: {best.reason}; "
            "use a larger --tensor-parallel-size or leave it unset"
        )
    hint = "use bigger GPUs, a quantized checkpoint, or " + multi_node_hint(model, pools, options)
    if fixed:
        hint = "lower --max-model-len, or " + hint
    return PlanError(
        f"{model.name} ({gib(model.weight_bytes)} weights) does not fit on {where} "
        f"({total} GPUs) with {context}: at best {best.reason}; {hint}"
    )
