"""What to suggest when a model does not fit one node: the Helm chart's multi-node mode.

The hint is the whole ``helm install`` command a user pastes (tests/helm renders exactly it),
with as many pipeline stages as the planner's own memory model (``plan_sizing``) needs.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence

from vllm_fleet.launcher.plan_sizing import (
    MIN_KV_TOKENS,
    OVERHEAD_BYTES,
    TP_SIZES,
    GpuPool,
    kv_bytes_per_token_per_gpu,
)
from vllm_fleet.launcher.plan_types import ModelSize, PlanOptions

#: the Helm chart, from a checkout of this repository; the multi-node hint names it.
HELM_CHART = "./helm/vllm-fleet"
#: most nodes the multi-node hint proposes (pipeline-parallel stages).
MAX_HINT_NODES = 16


def _nodes_needed(model: ModelSize, pool: GpuPool, tp: int, utilization: float, tokens: int) -> int:
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


def multi_node_hint(model: ModelSize, pools: Sequence[GpuPool], options: PlanOptions) -> str:
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
