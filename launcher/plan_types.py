"""The plan's types, the plain data that flows through the launcher: inventory, model size and
options -> plan -> server specs (the function that makes a plan is
``vllm_fleet.launcher.planner``).

The planner is a pure function from the first three to a ``Plan``; the
runtimes (``vllm_fleet.launcher.runtime``) turn each ``ServerSpec`` (a ``ReplicaSpec`` of the plan,
or the ``RouterSpec`` the fleet adds) into a running server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

GIB = 1024**3


def gib(n: float) -> str:
    """Bytes as the planner's notes and errors print them."""
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class Gpu:
    """One accelerator as found by NVML / nvidia-smi or declared by the user."""

    index: int
    name: str
    memory_bytes: int
    #: NUMA node of the GPU's PCIe root, -1 when unknown.
    numa_node: int = -1
    #: PCI bus id, used to order GPUs by PCIe distance when NVLink info is absent.
    pci_bus_id: str = ""
    #: indices of GPUs reachable over NVLink / P2P from this one.
    nvlink_peers: frozenset[int] = frozenset()
    #: "GPU-..." id, so a CUDA_VISIBLE_DEVICES given as UUIDs can be honoured.
    uuid: str = ""


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    #: where the inventory came from: "nvml", "nvidia-smi", "declared", "none".
    source: str = "declared"
    #: what detection noticed on the way (CUDA_VISIBLE_DEVICES filtering, missing topology).
    notes: tuple[str, ...] = ()
    #: CPUs of the host that runs the replicas (sizes the CPU engine's threads); None: not
    #: known, e.g. a compose file written for another machine.
    cpus: int | None = None


@dataclass(frozen=True)
class ModelSize:
    """What the planner needs to know about a model, all in bytes or counts."""

    name: str
    weight_bytes: int
    #: bytes of KV cache per token, over all layers, K and V.
    kv_bytes_per_token: int
    num_attention_heads: int
    num_key_value_heads: int
    max_model_len: int
    dtype: str = "bfloat16"
    num_params: int = 0
    #: where the numbers came from ("config.json + index", "--params 70B (...)"), for the report.
    source: str = ""
    #: caveats of the sizing (estimates, quantization, MoE), printed by `vllm-fleet plan`.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked of the plan (flags or fleet.yaml); ``plan`` checks it first."""

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
    #: LoRA adapters every replica serves from the start: (name, local path or hub id).
    lora_modules: tuple[tuple[str, str], ...] = ()
    max_lora_rank: int | None = None
    #: vLLM's --scheduling-policy ("fcfs", its default, or "priority").
    scheduling_policy: str = "fcfs"


#: listen addresses that mean "every interface": a server bound there is reached on loopback.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True, kw_only=True)
class ServerSpec:
    """One server to start and keep running: everything a runtime needs, nothing it must compute.

    The runtimes (``vllm_fleet.launcher.runtime``) take this; the plan's replicas and the router are
    its two kinds, so nothing has to pretend the router is a replica.
    """

    name: str
    #: address the server listens on, as its command line says; a container runtime publishes
    #: the port there (the server itself listens on every interface of the container).
    host: str
    port: int
    #: full argv of the server process (the runtime may wrap it, e.g. in a container).
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    #: GPU indices it is pinned to (CUDA_VISIBLE_DEVICES, or the container's device request).
    gpus: tuple[int, ...] = ()

    @property
    def url(self) -> str:
        """Where the supervisor (and the router, for a replica) reaches it on this host."""
        host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class ReplicaSpec(ServerSpec):
    """One engine server of the plan."""

    #: what ``--model`` names: a Hugging Face id, or a local directory (which a container
    #: runtime bind-mounts at the same path).
    model: str
    tensor_parallel_size: int = 1
    #: the name clients send ("" for plans written before fleets had several models); `status`
    #: groups replicas by it.
    served_model: str = ""
    #: the port the replica publishes vLLM KV events on (the router subscribes; a container
    #: runtime publishes it next to ``port``); None when it publishes none we know of.
    kv_events_port: int | None = None
    #: LoRA adapters' paths or hub ids (from lora_modules): a container runtime mounts the local
    #: ones, as it mounts a local model.
    lora_paths: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RouterSpec(ServerSpec):
    """The router in front of the replicas: supervised like them, never one of its backends."""

    #: the file the router re-reads its backends from (the supervisor writes it).
    backends_file: str


@dataclass(frozen=True)
class FitCheck:
    """One tensor-parallel size tried on one kind of GPU: the per-GPU memory budget.

    Kept in the plan so `vllm-fleet plan` can say why smaller TP sizes were rejected.
    """

    gpu_name: str
    tensor_parallel_size: int
    usable_bytes: int
    weight_bytes: int
    overhead_bytes: int
    #: KV cache this plan wants on each GPU (target tokens x per-GPU bytes per token).
    kv_bytes: int
    #: tokens the KV cache wants to hold (one full sequence, or the concurrency target).
    kv_tokens: int
    #: tokens of KV cache that fit in what is left after weights and overhead (<= 0: none).
    capacity_tokens: int
    max_model_len: int
    fits: bool
    #: why it was rejected when it does not fit ("" when it fits or was not a candidate).
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    model: ModelSize | None
    inventory: Inventory
    tensor_parallel_size: int
    replicas: tuple[ReplicaSpec, ...]
    #: human-readable reasons, printed by `vllm-fleet plan`.
    notes: tuple[str, ...] = ()
    engine: str = "vllm"
    #: context length every replica is started with (None: left to the engine).
    max_model_len: int | None = None
    #: tokens of KV cache each replica should hold at the chosen layout (0 when not sized).
    kv_cache_tokens: int = 0
    #: GPU indices no replica uses.
    leftover_gpus: tuple[int, ...] = ()
    #: the budgets that decided the tensor-parallel size, smallest TP first.
    fit_checks: tuple[FitCheck, ...] = ()


@dataclass(frozen=True)
class ModelRequest:
    """One model of a fleet as the planner takes it (``plan_models``): its options and what
    the user asked for its share of the GPUs."""

    options: PlanOptions
    #: a count; "auto": as many as fit on the GPUs no other model takes; None: as many as fit
    #: for a fleet of one model, else one.
    replicas: int | str | None = None
    #: the GPUs this model gets, by id (instead of replicas).
    gpu_ids: tuple[int, ...] = ()
    #: the number of GPUs this model gets (instead of replicas).
    gpu_count: int | None = None

    @property
    def name(self) -> str:
        """What clients send as ``model``."""
        return self.options.served_model_name or self.options.model


@dataclass(frozen=True)
class ModelPlan:
    """One model's part of a fleet plan: its own ``Plan`` (replicas, TP, notes)."""

    name: str
    options: PlanOptions
    plan: Plan
    #: what the user asked, as the plan table shows it ("2", "auto", "GPUs 0,1", "4 GPUs").
    asked: str


@dataclass(frozen=True)
class FleetPlan:
    """Every model of the fleet placed over one inventory."""

    inventory: Inventory
    models: tuple[ModelPlan, ...]
    #: GPU indices no replica of any model uses.
    leftover_gpus: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def replicas(self) -> tuple[ReplicaSpec, ...]:
        return tuple(r for m in self.models for r in m.plan.replicas)
