"""How many GPUs a replica needs: the GPU memory model, the tensor-parallel size and the context.

Pure arithmetic over a ``ModelSize`` and GPUs of one kind; ``vllm_fleet.launcher.plan_gpu`` asks
it per kind of GPU and places the chosen groups. The memory model (see docs/planning.md) is
deliberately simple and conservative: vLLM profiles the real numbers at start-up, the planner
only has to pick a tensor-parallel size that will not fail to load or run out of KV cache.

Per GPU of a TP group, with ``usable = gpu_memory_utilization * memory of the smallest GPU``::

    weight_bytes / TP  +  OVERHEAD_BYTES  +  kv_tokens * kv_bytes_per_token_per_gpu(TP)  <= usable

``kv_tokens`` is ``max(max_model_len, MIN_KV_TOKENS)``: one full-length sequence at least, and
room for a useful batch of ordinary requests, since a replica that can hold one request at a time
wastes the GPUs it pins.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_fleet.launcher.plan_types import GIB, FitCheck, Gpu, ModelSize, PlanOptions, gib

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


@dataclass(frozen=True)
class GpuPool:
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


def gpu_pools(gpus: Sequence[Gpu]) -> list[GpuPool]:
    """GPUs grouped by kind, most memory first: the biggest GPUs decide first."""
    kinds: dict[tuple[str, int], list[Gpu]] = defaultdict(list)
    for gpu in gpus:
        kinds[(gpu.name, gpu.memory_bytes)].append(gpu)
    pools = [GpuPool(name, mem, tuple(members)) for (name, mem), members in kinds.items()]
    # most memory first: the biggest GPUs decide the TP size and get the first replicas.
    pools.sort(key=lambda p: (-p.memory_bytes, min(g.index for g in p.gpus)))
    return pools


def kv_bytes_per_token_per_gpu(model: ModelSize, tp: int) -> int:
    """KV heads are split over the TP ranks; below one head per rank they are replicated."""
    heads = model.num_key_value_heads
    if heads <= 0:
        return math.ceil(model.kv_bytes_per_token / tp)
    return math.ceil(model.kv_bytes_per_token * math.ceil(heads / tp) / heads)


def fit_check(
    model: ModelSize, pool: GpuPool, tp: int, max_len: int, utilization: float, want_tokens: int
) -> FitCheck:
    """Does TP ``tp`` on ``pool`` hold the weights and ``want_tokens`` of KV cache?"""
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


def tp_candidates(model: ModelSize, pool: GpuPool, options: PlanOptions) -> list[int]:
    """TP sizes to try on ``pool``: the user's, or those that divide the heads."""
    if options.tensor_parallel_size is not None:
        return (
            [options.tensor_parallel_size] if options.tensor_parallel_size <= len(pool.gpus) else []
        )
    heads = model.num_attention_heads
    return [tp for tp in TP_SIZES if tp <= len(pool.gpus) and (heads <= 0 or heads % tp == 0)]


def round_context(tokens: int) -> int:
    """A context the KV cache holds, rounded down to CONTEXT_STEP."""
    return tokens // CONTEXT_STEP * CONTEXT_STEP if tokens >= CONTEXT_STEP else tokens


@dataclass(frozen=True)
class TpChoice:
    """The TP size chosen for one pool at the plan's context length."""

    pool: GpuPool
    tp: int
    capacity_tokens: int


def smallest_fitting(
    model: ModelSize, pool: GpuPool, options: PlanOptions, max_len: int, want_tokens: int
) -> TpChoice | None:
    """The smallest TP size of ``pool`` that fits (fewer GPUs, more replicas)."""
    for tp in tp_candidates(model, pool, options):
        check = fit_check(model, pool, tp, max_len, options.gpu_memory_utilization, want_tokens)
        if check.fits:
            return TpChoice(pool, tp, check.capacity_tokens)
    return None


def best_reduced_context(
    model: ModelSize, pool: GpuPool, options: PlanOptions, target: int, min_tokens: int
) -> int:
    """Longest context <= target this pool can serve with ``min_tokens`` of KV (0: none)."""
    for tp in tp_candidates(model, pool, options):
        check = fit_check(model, pool, tp, target, options.gpu_memory_utilization, min_tokens)
        if check.fits:
            return min(target, round_context(check.capacity_tokens))
    return 0


def choose_sizes(
    model: ModelSize, pools: list[GpuPool], options: PlanOptions
) -> tuple[int, int, list[TpChoice], list[str]]:
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

    def at(max_len: int, want: int) -> list[TpChoice]:
        found = (smallest_fitting(model, p, options, max_len, want) for p in pools)
        return [c for c in found if c is not None]

    want = max(target, MIN_KV_TOKENS)
    choices = at(target, want)
    if choices:
        return target, want, choices, notes
    if not fixed:
        best = max(best_reduced_context(model, p, options, target, MIN_KV_TOKENS) for p in pools)
        if best >= floor:
            notes.append(
                f"max_model_len reduced from {target} to {best}: the full context does not leave "
                f"KV cache room for {max(target, MIN_KV_TOKENS)} tokens on any TP size "
                "(pass --max-model-len to choose, or add GPUs)"
            )
            want = max(best, MIN_KV_TOKENS)
            return best, want, at(best, want), notes
        best = max(best_reduced_context(model, p, options, target, floor) for p in pools)
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
