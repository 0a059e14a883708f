"""Decide how many replicas to run, how wide each is, and which GPUs and port each gets.

A pure function: it sees an ``Inventory`` and a ``ModelSize`` and returns a ``Plan``, so every
layout decision can be tested with hand-computed numbers and no GPU. The memory model (see
docs/planning.md) is deliberately simple and conservative: vLLM profiles the real numbers at
start-up, the planner only has to pick a tensor-parallel size that will not fail to load or run
out of KV cache.

Per GPU of a TP group, with ``usable = gpu_memory_utilization * memory of the smallest GPU``::

    weight_bytes / TP  +  OVERHEAD_BYTES  +  kv_tokens * kv_bytes_per_token_per_gpu(TP)  <= usable

``kv_tokens`` is ``max(max_model_len, MIN_KV_TOKENS)``: one full-length sequence at least, and
room for a useful batch of ordinary requests, since a replica that can hold one request at a time
wastes the GPUs it pins.
"""

from __future__ import annotations

import math
import shlex
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.model_size import normalize_dtype
from vllm_fleet.launcher.plan_types import (
    GIB,
    FitCheck,
    Gpu,
    Inventory,
    ModelSize,
    Plan,
    ReplicaSpec,
)
from vllm_fleet.launcher.vllm_args import (
    DEFAULT_KV_CACHE_GIB,
    OWNED_FLAGS,
    cpu_engine_env,
    vllm_command,
)

#: tensor-parallel sizes tried, smallest first (more GPUs per replica = fewer replicas).
TP_SIZES = (1, 2, 4, 8)
#: per-GPU memory outside weights and KV cache: peak activations at vLLM's default batch,
#: CUDA graphs, NCCL buffers, the sampler. vLLM measures it at start-up; 2 GiB covers 7B-405B
#: models at the default max_num_batched_tokens with some margin.
OVERHEAD_BYTES = 2 * GIB
#: KV cache tokens a replica should hold at least: 16 concurrent requests of 2048 tokens.
MIN_KV_TOKENS = 16 * 2048
#: never shrink the context below this when making a model fit.
CONTEXT_FLOOR = 4096
#: a reduced context is rounded down to a multiple of this.
CONTEXT_STEP = 1024
#: default KV cache of the CPU engine in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE).
CPU_KVCACHE_SPACE_GIB = DEFAULT_KV_CACHE_GIB

#: the Helm chart, from a checkout of this repository; the multi-node hint names it.
HELM_CHART = "./helm/vllm-fleet"
#: most nodes the multi-node hint proposes (pipeline-parallel stages).
MAX_HINT_NODES = 16


class PlanError(ConfigError):
    """The model cannot be laid out on these GPUs (or an override contradicts them).

    The message is one line with the numbers (need X GiB, have Y GiB) and what to do instead.
    """


@dataclass(frozen=True)
class PlanOptions:
    model: str
    engine: str = "vllm"
    served_model_name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    tensor_parallel_size: int | None = None
    replicas: int | None = None
    base_port: int = 8001
    host: str = "127.0.0.1"
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = "python3"


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def plan(inventory: Inventory, model: ModelSize | None, options: PlanOptions) -> Plan:
    """Lay ``model`` out on ``inventory``; raise ``PlanError`` when it cannot be done."""
    _validate_options(options)
    if options.engine == "sim":
        return _plan_sim(inventory, model, options)
    if options.engine != "vllm":
        raise PlanError(f"--engine {options.engine!r} is unknown; use vllm or sim")
    if not inventory.gpus:
        return _plan_cpu(inventory, model, options)
    return _plan_gpu(inventory, model, options)


# --------------------------------------------------------------------------- validation


def _validate_options(options: PlanOptions) -> None:
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


def _ports(options: PlanOptions, count: int) -> list[int]:
    last = options.base_port + count - 1
    if last > 65535:
        raise PlanError(
            f"--base-port {options.base_port} leaves no room for {count} replicas "
            f"(last port would be {last}); use a lower --base-port"
        )
    return [options.base_port + i for i in range(count)]


# --------------------------------------------------------------------------- commands


def _vllm_command(
    options: PlanOptions, port: int, tp: int, max_model_len: int | None, on_gpu: bool
) -> tuple[str, ...]:
    """The replica's vLLM command line, from vllm_fleet.launcher.vllm_args (the only builder of
    one)."""
    return vllm_command(
        python=options.python,
        model=options.model,
        host=options.host,
        port=port,
        tensor_parallel_size=tp,
        served_model_name=options.served_model_name,
        dtype=normalize_dtype(options.dtype),
        max_model_len=max_model_len,
        gpu_memory_utilization=options.gpu_memory_utilization if on_gpu else None,
        max_num_seqs=options.max_num_seqs,
        on_cpu=not on_gpu,
        extra_args=options.extra_args,
    )


def _sim_command(options: PlanOptions, port: int) -> tuple[str, ...]:
    argv = [
        options.python,
        "-m",
        "vllm_fleet.launcher.cli",
        "sim",
        "--host",
        options.host,
        "--port",
        str(port),
        "--model",
        options.served_model_name or options.model,
    ]
    if options.max_model_len is not None:
        argv += ["--max-model-len", str(options.max_model_len)]
    if options.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(options.max_num_seqs)]
    return (*argv, *options.extra_args)


# --------------------------------------------------------------------------- sim and CPU


def _plan_sim(inventory: Inventory, model: ModelSize | None, options: PlanOptions) -> Plan:
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
            command=_sim_command(options, port),
            env=dict(options.env),
        )
        for i, port in enumerate(_ports(options, count))
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


def _plan_cpu(inventory: Inventory, model: ModelSize | None, options: PlanOptions) -> Plan:
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
            command=_vllm_command(options, port, 1, max_len, on_gpu=False),
            env=dict(env),
        )
        for i, port in enumerate(_ports(options, count))
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


# --------------------------------------------------------------------------- GPU memory model


@dataclass(frozen=True)
class _Pool:
    """GPUs of one kind (same name and memory): a TP group never mixes kinds."""

    name: str
    memory_bytes: int
    gpus: tuple[Gpu, ...]

    @property
    def label(self) -> str:
        label = f"{len(self.gpus)}x {self.name}"
        if f"{round(self.memory_bytes / GIB)}GB" not in self.name.upper():
            label += f" ({gib(self.memory_bytes)})"
        return label


def _pools(gpus: Sequence[Gpu]) -> list[_Pool]:
    kinds: dict[tuple[str, int], list[Gpu]] = defaultdict(list)
    for gpu in gpus:
        kinds[(gpu.name, gpu.memory_bytes)].append(gpu)
    pools = [_Pool(name, mem, tuple(members)) for (name, mem), members in kinds.items()]
    # most memory first: the biggest GPUs decide the TP size and get the first replicas.
    pools.sort(key=lambda p: (-p.memory_bytes, min(g.index for g in p.gpus)))
    return pools


def kv_bytes_per_token_per_gpu(model: ModelSize, tp: int) -> int:
    """KV heads are split over the TP ranks; below one head per rank they are replicated."""
    heads = model.num_key_value_heads
    if heads <= 0:
        return math.ceil(model.kv_bytes_per_token / tp)
    return math.ceil(model.kv_bytes_per_token * math.ceil(heads / tp) / heads)


def _check(
    model: ModelSize, pool: _Pool, tp: int, max_len: int, utilization: float, want_tokens: int
) -> FitCheck:
    usable = int(utilization * pool.memory_bytes)
    weights = math.ceil(model.weight_bytes / tp)
    per_token = kv_bytes_per_token_per_gpu(model, tp)
    left = usable - weights - OVERHEAD_BYTES
    capacity = left // per_token if per_token > 0 else (1 << 62 if left >= 0 else -1)
    kv_bytes = want_tokens * per_token
    fits = weights + OVERHEAD_BYTES + kv_bytes <= usable
    reason = ""
    if not fits:
        reason = (
            f"TP{tp} needs {gib(weights + OVERHEAD_BYTES + kv_bytes)} per GPU "
            f"({gib(weights)} weights + {gib(OVERHEAD_BYTES)} overhead + {gib(kv_bytes)} KV "
            f"for {want_tokens} tokens) > {gib(usable)} usable "
            f"({utilization:g} x {gib(pool.memory_bytes)})"
        )
    return FitCheck(
        gpu_name=pool.name,
        tensor_parallel_size=tp,
        usable_bytes=usable,
        weight_bytes=weights,
        overhead_bytes=OVERHEAD_BYTES,
        kv_bytes=kv_bytes,
        kv_tokens=want_tokens,
        capacity_tokens=int(capacity),
        max_model_len=max_len,
        fits=fits,
        reason=reason,
    )


def _tp_candidates(model: ModelSize, pool: _Pool, options: PlanOptions) -> list[int]:
    if options.tensor_parallel_size is not None:
        return (
            [options.tensor_parallel_size] if options.tensor_parallel_size <= len(pool.gpus) else []
        )
    heads = model.num_attention_heads
    return [tp for tp in TP_SIZES if tp <= len(pool.gpus) and (heads <= 0 or heads % tp == 0)]


def _round_context(tokens: int) -> int:
    return tokens // CONTEXT_STEP * CONTEXT_STEP if tokens >= CONTEXT_STEP else tokens


@dataclass(frozen=True)
class _Choice:
    """The TP size chosen for one pool at the plan's context length."""

    pool: _Pool
    tp: int
    capacity_tokens: int


def _smallest_fitting(
    model: ModelSize, pool: _Pool, options: PlanOptions, max_len: int, want_tokens: int
) -> _Choice | None:
    for tp in _tp_candidates(model, pool, options):
        check = _check(model, pool, tp, max_len, options.gpu_memory_utilization, want_tokens)
        if check.fits:
            return _Choice(pool, tp, check.capacity_tokens)
    return None


def _best_reduced_context(
    model: ModelSize, pool: _Pool, options: PlanOptions, target: int, min_tokens: int
) -> int:
    """Longest context <= target this pool can serve with ``min_tokens`` of KV (0: none)."""
    for tp in _tp_candidates(model, pool, options):
        check = _check(model, pool, tp, target, options.gpu_memory_utilization, min_tokens)
        if check.fits:
            return min(target, _round_context(check.capacity_tokens))
    return 0


def _choose(
    model: ModelSize, pools: list[_Pool], options: PlanOptions
) -> tuple[int, int, list[_Choice], list[str]]:
    """Pick the context length, the KV tokens wanted, and per pool the smallest TP that fits.

    Tiers, first that places at least one replica wins:
      1. the target context with room for max(context, MIN_KV_TOKENS) tokens;
      2. (context not fixed by the user) a shorter context, still with MIN_KV_TOKENS of room;
      3. one sequence at the context (fixed) or at >= CONTEXT_FLOOR tokens (not fixed).
    """
    target = options.max_model_len or model.max_model_len
    fixed = options.max_model_len is not None
    floor = min(CONTEXT_FLOOR, target)
    notes: list[str] = []

    def at(max_len: int, want: int) -> list[_Choice]:
        found = (_smallest_fitting(model, p, options, max_len, want) for p in pools)
        return [c for c in found if c is not None]

    want = max(target, MIN_KV_TOKENS)
    choices = at(target, want)
    if choices:
        return target, want, choices, notes
    if not fixed:
        best = max(_best_reduced_context(model, p, options, target, MIN_KV_TOKENS) for p in pools)
        if best >= floor:
            notes.append(
                f"max_model_len reduced from {target} to {best}: the full context does not leave "
                f"KV cache room for {max(target, MIN_KV_TOKENS)} tokens on any TP size "
                "(pass --max-model-len to choose, or add GPUs)"
            )
            want = max(best, MIN_KV_TOKENS)
            return best, want, at(best, want), notes
        best = max(_best_reduced_context(model, p, options, target, floor) for p in pools)
        if best >= floor:
            notes.append(
                f"max_model_len reduced from {target} to {best}, and the KV cache holds fewer "
                f"than {MIN_KV_TOKENS} tokens: expect few concurrent requests per replica"
            )
            return best, best, at(best, best), notes
        return target, want, [], notes
    choices = at(target, target)
    if choices:
        notes.append(
            f"KV cache holds fewer than {MIN_KV_TOKENS} tokens at --max-model-len {target}: "
            "expect few concurrent requests per replica"
        )
        want = target
    return target, want, choices, notes


# --------------------------------------------------------------------------- topology


def _bus_key(gpu: Gpu) -> tuple[int, ...]:
    parts = gpu.pci_bus_id.lower().replace(".", ":").split(":")
    try:
        return tuple(int(p, 16) for p in parts) if gpu.pci_bus_id else ()
    except ValueError:
        return ()


def _order(gpu: Gpu) -> tuple[tuple[int, ...], int]:
    # no bus id sorts before any bus id; index breaks ties so the order is total.
    return (_bus_key(gpu), gpu.index)


def _linked(a: Gpu, b: Gpu) -> bool:
    return b.index in a.nvlink_peers or a.index in b.nvlink_peers


def _groups_within(gpus: list[Gpu], tp: int) -> tuple[list[tuple[Gpu, ...]], list[Gpu]]:
    """Greedy: start at the lowest PCIe address, add GPUs NVLinked to every member, then the
    next by PCIe address."""
    remaining = sorted(gpus, key=_order)
    groups: list[tuple[Gpu, ...]] = []
    while len(remaining) >= tp:
        group = [remaining.pop(0)]
        for cand in list(remaining):
            if len(group) == tp:
                break
            if all(_linked(cand, member) for member in group):
                group.append(cand)
                remaining.remove(cand)
        while len(group) < tp:
            group.append(remaining.pop(0))
        groups.append(tuple(group))
    return groups, remaining


def tp_groups(gpus: Sequence[Gpu], tp: int) -> tuple[list[tuple[Gpu, ...]], list[Gpu], list[str]]:
    """Split GPUs of one kind into TP groups: within a NUMA node first, across nodes only for
    what is left over. Returns (groups, leftover GPUs, notes)."""
    by_node: dict[int, list[Gpu]] = defaultdict(list)
    for gpu in gpus:
        by_node[gpu.numa_node].append(gpu)
    groups: list[tuple[Gpu, ...]] = []
    rest: list[Gpu] = []
    for node in sorted(by_node):
        found, left = _groups_within(by_node[node], tp)
        groups += found
        rest += left
    notes: list[str] = []
    if len(rest) >= tp:
        found, rest = _groups_within(rest, tp)
        for group in found:
            nodes = sorted({g.numa_node for g in group})
            if len(nodes) > 1:
                notes.append(
                    f"GPUs {_indices(group)} span NUMA nodes {','.join(map(str, nodes))}: "
                    "no node has enough free GPUs for a TP group"
                )
        groups += found
    for group in groups:
        if tp > 1 and any(g.nvlink_peers for g in gpus):
            pairs = [(a, b) for i, a in enumerate(group) for b in group[i + 1 :]]
            if not all(_linked(a, b) for a, b in pairs):
                notes.append(
                    f"GPUs {_indices(group)} are not all NVLink peers: TP traffic uses PCIe"
                )
    groups.sort(key=lambda g: min(x.index for x in g))
    return groups, rest, notes


def _indices(gpus: Sequence[Gpu]) -> str:
    return ",".join(str(i) for i in sorted(g.index for g in gpus))


# --------------------------------------------------------------------------- GPU plan


def _plan_gpu(inventory: Inventory, model: ModelSize | None, options: PlanOptions) -> Plan:
    pools = _pools(inventory.gpus)
    notes: list[str] = []
    checks: list[FitCheck] = []
    if model is None:
        tp = options.tensor_parallel_size or 1
        choices = [_Choice(p, tp, 0) for p in pools if len(p.gpus) >= tp]
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
        max_len, want, choices, context_notes = _choose(model, pools, options)
        checks = [
            _check(model, pool, tp, max_len, options.gpu_memory_utilization, want)
            for pool in pools
            for tp in _tp_candidates(model, pool, options)
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
                f"GPUs {_indices(rest)} unused: {len(choice.pool.gpus)} GPUs of "
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
            notes.append(
                f"--replicas {options.replicas}: GPUs "
                f"{_indices([g for group, _ in groups[options.replicas :] for g in group])} unused"
            )
        groups = groups[: options.replicas]

    replicas = []
    for i, ((group, tp), port) in enumerate(zip(groups, _ports(options, len(groups)), strict=True)):
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
                command=_vllm_command(options, port, tp, max_len, on_gpu=True),
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


def _validate_model_options(model: ModelSize, pools: list[_Pool], options: PlanOptions) -> None:
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
    model: ModelSize, choices: list[_Choice], checks: list[FitCheck], options: PlanOptions
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
        shorter = _round_context(room)
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
    model: ModelSize | None, pool: _Pool, options: PlanOptions, max_len: int | None
) -> str:
    note = f"{pool.label} unused: "
    if model is None:
        return note + f"fewer GPUs than --tensor-parallel-size {options.tensor_parallel_size}"
    reduced = _best_reduced_context(
        model, pool, options, max_len or model.max_model_len, MIN_KV_TOKENS
    )
    note += f"no TP size serves {model.name} with a {max_len}-token context on them"
    if reduced >= CONTEXT_FLOOR:
        note += f" (they could at --max-model-len {reduced}, for every replica)"
    return note


def _no_fit_error(
    model: ModelSize, pools: list[_Pool], options: PlanOptions, max_len: int
) -> PlanError:
    fixed = options.max_model_len is not None
    tokens = max_len if fixed else min(CONTEXT_FLOOR, max_len)
    best: FitCheck | None = None
    for pool in pools:
        for tp in _tp_candidates(model, pool, options):
            check = _check(model, pool, tp, tokens, options.gpu_memory_utilization, tokens)
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


def _nodes_needed(model: ModelSize, pool: _Pool, tp: int, utilization: float, tokens: int) -> int:
    """Fewest nodes of ``pool``'s GPUs (TP ``tp`` each) whose pipeline stages hold the model.

    Each stage holds 1/stages of the layers, so of the weights and of the KV cache; 0 when
    even MAX_HINT_NODES nodes are not enough.
    """
    usable = int(utilization * pool.memory_bytes)
    per_token = kv_bytes_per_token_per_gpu(model, tp)
    for stages in range(2, MAX_HINT_NODES + 1):
        weights = math.ceil(model.weight_bytes / (tp * stages))
        if weights + OVERHEAD_BYTES + math.ceil(tokens * per_token / stages) <= usable:
            return stages
    return 0


def multi_node_hint(model: ModelSize, pools: Sequence[_Pool], options: PlanOptions) -> str:
    """The Helm chart's multi-node mode as the whole command to paste: nodes like the biggest
    GPUs here, every GPU of a node in one pod, as many pipeline stages as the memory model
    needs (tests/helm renders exactly this command)."""
    pool = pools[0]
    heads = model.num_attention_heads
    tps = [t for t in TP_SIZES if t <= len(pool.gpus) and (heads <= 0 or heads % t == 0)]
    tp = tps[-1] if tps else 1
    # The command leaves the context to the model unless --max-model-len fixed it.
    tokens = max(options.max_model_len or model.max_model_len, MIN_KV_TOKENS)
    nodes = _nodes_needed(model, pool, tp, options.gpu_memory_utilization, tokens)
    if nodes == 0:
        return f"the Helm chart's multi-node mode ({HELM_CHART}, engine.multiNode.enabled=true)"
    values = [
        f"model.name={options.model}",
        f"engine.tensorParallelSize={tp}",
        "engine.multiNode.enabled=true",
        f"engine.multiNode.pipelineParallelSize={nodes}",
    ]
    if options.served_model_name:
        values.append(f"model.servedName={options.served_model_name}")
    if options.max_model_len is not None:
        values.append(f"engine.maxModelLen={options.max_model_len}")
    if options.gpu_memory_utilization != PlanOptions.gpu_memory_utilization:
        values.append(f"engine.gpuMemoryUtilization={options.gpu_memory_utilization:g}")
    command = ["helm", "install", "fleet", HELM_CHART]
    for value in values:
        command += ["--set", value]
    return (
        f"the Helm chart's multi-node mode, {nodes} nodes of {tp}x {pool.name} per replica: "
        + shlex.join(command)
    )
