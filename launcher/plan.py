"""Plain data that flows through the launcher: inventory -> model size -> plan -> replica specs.

The planner (``launcher.planner``) is a pure function from the first two to a ``Plan``; the
runtimes (``launcher.runtime``) turn each ``ReplicaSpec`` into a running server.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    #: where the inventory came from: "nvml", "nvidia-smi", "declared", "none".
    source: str = "declared"


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


@dataclass(frozen=True)
class ReplicaSpec:
    """One engine server to start: everything a runtime needs, nothing it must compute."""

    name: str
    port: int
    gpus: tuple[int, ...]
    tensor_parallel_size: int
    #: full argv of the server process (the runtime may wrap it, e.g. in a container).
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Plan:
    model: ModelSize | None
    inventory: Inventory
    tensor_parallel_size: int
    replicas: tuple[ReplicaSpec, ...]
    #: human-readable reasons, printed by `vllm-fleet plan`.
    notes: tuple[str, ...] = ()
