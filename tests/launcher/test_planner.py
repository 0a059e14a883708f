"""The layout planner on real model configs and common GPU boxes.

Every expectation is computed by hand in the row's comment with the rule of docs/planning.md:
per GPU, weights / TP + 2 GiB overhead + KV for max(context, 32768) tokens / TP must fit in
gpu_memory_utilization x the GPU's memory. Sizes (bf16, from tests/launcher/models):

  Llama-3.1-8B    16.06e9 B = 14.96 GiB, KV 128 KiB/token (2*32*8*128*2), 32 heads, ctx 131072
  Llama-3.1-70B  141.11e9 B = 131.42 GiB, KV 320 KiB/token (2*80*8*128*2), 64 heads, ctx 131072
  Llama-3.1-405B 811.71e9 B = 755.96 GiB, KV 504 KiB/token (2*126*8*128*2), 128 heads
  Mistral-Nemo   24.50e9 B = 22.81 GiB, KV 160 KiB/token (2*40*8*128*2), 32 heads, ctx 128000
  Mixtral-8x7B   93.41e9 B = 86.99 GiB, KV 128 KiB/token (2*32*8*128*2), 32 heads, ctx 32768
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.model_size import size_model
from vllm_fleet.launcher.plan_sizing import (
    MIN_KV_TOKENS,
    OVERHEAD_BYTES,
    kv_bytes_per_token_per_gpu,
)
from vllm_fleet.launcher.plan_topology import tp_groups
from vllm_fleet.launcher.plan_types import GIB, Gpu, Inventory, ModelSize
from vllm_fleet.launcher.planner import PlanError, PlanOptions, plan

MODELS = Path(__file__).parent / "models"


def model(name: str) -> ModelSize:
    return size_model(str(MODELS / name), fetch=None)


def gpus(count: int, memory_gib: float, name: str = "", start: int = 0, **extra: Any) -> list[Gpu]:
    label = name or f"{memory_gib:g}GB"
    return [Gpu(start + i, label, int(memory_gib * GIB), **extra) for i in range(count)]


def inventory(*groups: list[Gpu]) -> Inventory:
    return Inventory(gpus=tuple(g for group in groups for g in group))


ONE_24 = inventory(gpus(1, 24))
ONE_80 = inventory(gpus(1, 80))
FOUR_40 = inventory(gpus(4, 40))
EIGHT_80 = inventory(gpus(8, 80))
EIGHT_H200 = inventory(gpus(8, 141, "H200"))
L40S = inventory(gpus(1, 48, "L40S"))
MIXED = inventory(gpus(4, 80, "A100-80GB"), gpus(4, 40, "A100-40GB", start=4))


@dataclass(frozen=True)
class Row:
    id: str
    model: str
    inventory: Inventory
    tp: int
    groups: tuple[tuple[int, ...], ...]
    max_model_len: int
    options: dict[str, Any] = field(default_factory=dict)


ROWS = [
    # 8B, 1x24GB: usable 21.6; TP1 = 14.96 + 2 + 16 (131072 tok) = 32.96 > 21.6, no larger TP.
    # Shorter context: room = 21.6 - 14.96 - 2 = 4.64 GiB / 128 KiB = 38031 tok >= 32768
    # -> context 37 x 1024 = 37888.
    Row("8B-1x24", "Llama-3.1-8B", ONE_24, 1, ((0,),), 37888),
    # 8B, 1x80GB: 14.96 + 2 + 16 = 32.96 <= 72 -> TP1.
    Row("8B-1x80", "Llama-3.1-8B", ONE_80, 1, ((0,),), 131072),
    # 8B, 4x40GB: 32.96 <= 36 -> TP1 x 4.
    Row("8B-4x40", "Llama-3.1-8B", FOUR_40, 1, ((0,), (1,), (2,), (3,)), 131072),
    # 8B, 8x80GB: 32.96 <= 72 -> TP1 x 8.
    Row("8B-8x80", "Llama-3.1-8B", EIGHT_80, 1, tuple((i,) for i in range(8)), 131072),
    # 70B, 8x80GB: TP1 = 131.4 + 2 + 40 = 173.4 > 72; TP2 = 65.7 + 2 + 20 = 87.7 > 72;
    # TP4 = 32.9 + 2 + 10 = 44.9 <= 72 -> TP4 x 2.
    Row("70B-8x80", "Llama-3.1-70B", EIGHT_80, 4, ((0, 1, 2, 3), (4, 5, 6, 7)), 131072),
    # 70B, 8xH200: usable 0.9 x 141 = 126.9; TP1 = 131.4 + 2 + 40 > 126.9;
    # TP2 = 65.7 + 2 + 20 = 87.7 <= 126.9 -> TP2 x 4.
    Row("70B-8xH200", "Llama-3.1-70B", EIGHT_H200, 2, ((0, 1), (2, 3), (4, 5), (6, 7)), 131072),
    # 70B, 4x40GB: TP4 = 32.85 + 2 + 10 = 44.85 > 36 at full context; room at TP4 =
    # (38654705664 - 35276853248 - 2 GiB) / 80 KiB = 15019 tokens < 32768 -> one sequence of
    # 14 x 1024 = 14336 tokens (low-concurrency note).
    Row("70B-4x40", "Llama-3.1-70B", FOUR_40, 4, ((0, 1, 2, 3),), 14336),
    # 405B, 8xH200: TP4 = 189.0 + 2 + 15.75 > 126.9; TP8 = 94.5 + 2 + 7.9 = 104.4 <= 126.9
    # (811.7 GB / 8 = 101 GB < 127 GB) -> TP8 x 1.
    Row("405B-8xH200", "Llama-3.1-405B", EIGHT_H200, 8, (tuple(range(8)),), 131072),
    # Mistral-Nemo, 4x40GB: TP1 = 22.81 + 2 + 19.53 (128000 tok x 160 KiB) = 44.3 > 36;
    # TP2 = 11.41 + 2 + 9.77 = 23.2 <= 36 -> TP2 x 2.
    Row("nemo-4x40", "Mistral-Nemo-Base-2407", FOUR_40, 2, ((0, 1), (2, 3)), 128000),
    # Mistral-Nemo, 1x L40S (48GB) at 0.95: usable 45.6; TP1 = 22.81 + 2 + 19.53 = 44.3 fits.
    # With head_dim = hidden/heads = 160 the KV would be 24.4 GiB and it would NOT fit (49.2):
    # this row fails if the explicit head_dim is ignored.
    Row(
        "nemo-L40S-head-dim",
        "Mistral-Nemo-Base-2407",
        L40S,
        1,
        ((0,),),
        128000,
        {"gpu_memory_utilization": 0.95},
    ),
    # Mixtral, 8x80GB: all 8 experts resident. TP1 = 86.99 + 2 + 4 (32768 tok) = 93 > 72;
    # TP2 = 43.5 + 2 + 2 = 47.5 <= 72 -> TP2 x 4.
    Row("mixtral-8x80", "Mixtral-8x7B-v0.1", EIGHT_80, 2, ((0, 1), (2, 3), (4, 5), (6, 7)), 32768),
    # Mixtral, 4xA100-80 + 4xA100-40: 80s as above TP2 (47.5 <= 72) x 2; 40s: TP2 = 47.5 > 36,
    # TP4 = 21.75 + 2 + 1 = 24.75 <= 36 -> one TP4 replica. Like with like, never mixed.
    Row("mixtral-mixed", "Mixtral-8x7B-v0.1", MIXED, 2, ((0, 1), (2, 3), (4, 5, 6, 7)), 32768),
    # 70B mixed: 80s TP4 = 44.9 <= 72 -> 1 replica; 40s: TP4 = 32.85 + 2 + 10 > 36 and only
    # 15019 tokens of room (< 32768) -> unused rather than shrinking everyone's context.
    Row("70B-mixed", "Llama-3.1-70B", MIXED, 4, ((0, 1, 2, 3),), 131072),
    # 8B mixed: TP1 fits on both kinds (32.96 <= 36) -> 8 replicas.
    Row("8B-mixed", "Llama-3.1-8B", MIXED, 1, tuple((i,) for i in range(8)), 131072),
    # Overrides. TP8 for 8B on 8x80GB: honoured -> one replica on all GPUs.
    Row(
        "8B-tp8",
        "Llama-3.1-8B",
        EIGHT_80,
        8,
        (tuple(range(8)),),
        131072,
        {"tensor_parallel_size": 8},
    ),
    # --replicas 2 on 8x80GB for 8B: first two TP1 groups; 2..7 left over.
    Row("8B-replicas2", "Llama-3.1-8B", EIGHT_80, 1, ((0,), (1,)), 131072, {"replicas": 2}),
    # TP2 forced for 70B on 8x80GB: room = (77309411328 - 70553706496 - 2 GiB) / 160 KiB
    # = 28126 tokens < 32768 -> one sequence of 27 x 1024 = 27648 tokens, TP2 x 4.
    Row(
        "70B-tp2-forced",
        "Llama-3.1-70B",
        EIGHT_80,
        2,
        ((0, 1), (2, 3), (4, 5), (6, 7)),
        27648,
        {"tensor_parallel_size": 2},
    ),
    # 70B, --max-model-len 8192 at 0.95: usable 76; KV target is still 32768 tokens:
    # TP2 = 65.7 + 2 + 5 = 72.7 <= 76 -> TP2 x 4 (at 0.9, 72.7 > 72 and it would be TP4).
    Row(
        "70B-8k-0.95",
        "Llama-3.1-70B",
        EIGHT_80,
        2,
        ((0, 1), (2, 3), (4, 5), (6, 7)),
        8192,
        {"max_model_len": 8192, "gpu_memory_utilization": 0.95},
    ),
    Row(
        "70B-8k-0.9",
        "Llama-3.1-70B",
        EIGHT_80,
        4,
        ((0, 1, 2, 3), (4, 5, 6, 7)),
        8192,
        {"max_model_len": 8192},
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_layouts_match_hand_computation(row: Row) -> None:
    result = plan(row.inventory, model(row.model), PlanOptions(model=row.model, **row.options))

    assert result.tensor_parallel_size == row.tp
    assert tuple(r.gpus for r in result.replicas) == row.groups
    assert result.max_model_len == row.max_model_len
    used = {g for group in row.groups for g in group}
    assert result.leftover_gpus == tuple(g.index for g in row.inventory.gpus if g.index not in used)
    for i, replica in enumerate(result.replicas):
        assert replica.name == f"replica-{i}"
        assert replica.port == 8001 + i
        assert replica.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, replica.gpus))
        assert replica.tensor_parallel_size == len(replica.gpus)


def test_70b_on_8x80_explains_why_tp2_does_not_fit() -> None:
    result = plan(EIGHT_80, model("Llama-3.1-70B"), PlanOptions(model="m"))

    why = result.notes[0]
    assert "TP4 is the smallest" in why
    assert "TP2 needs 87.7 GiB per GPU" in why
    assert "> 72.0 GiB usable" in why
    tp2 = next(c for c in result.fit_checks if c.tensor_parallel_size == 2)
    assert not tp2.fits
    assert tp2.weight_bytes == 141107412992 // 2
    assert tp2.kv_bytes == 131072 * 327680 // 2
    assert [c.fits for c in result.fit_checks] == [False, False, True, True]


def test_reduced_context_is_reported() -> None:
    result = plan(ONE_24, model("Llama-3.1-8B"), PlanOptions(model="m"))

    assert any("max_model_len reduced from 131072 to 37888" in n for n in result.notes)
    assert result.kv_cache_tokens == 38031
    assert "--max-model-len" in result.replicas[0].command
    assert result.replicas[0].command[result.replicas[0].command.index("--max-model-len") + 1] == (
        "37888"
    )


def test_low_kv_room_says_so() -> None:
    result = plan(FOUR_40, model("Llama-3.1-70B"), PlanOptions(model="m"))

    assert any("fewer than 32768 tokens" in n for n in result.notes)


def test_smaller_tp_at_shorter_context_is_suggested() -> None:
    # 8B on 2x24GB: TP1 at full context does not fit (32.96 > 21.6), TP2 does
    # (7.48 + 2 + 8 = 17.5); TP1 would fit at 37888 tokens, which the notes point out.
    result = plan(inventory(gpus(2, 24)), model("Llama-3.1-8B"), PlanOptions(model="m"))

    assert result.tensor_parallel_size == 2
    assert "TP1 would fit with --max-model-len 37888 (2 replicas instead of 1)" in result.notes


def test_mixed_gpus_note_the_unused_kind() -> None:
    result = plan(MIXED, model("Llama-3.1-70B"), PlanOptions(model="m"))

    assert result.leftover_gpus == (4, 5, 6, 7)
    assert any(n.startswith("4x A100-40GB unused") for n in result.notes)


def test_mixed_gpus_with_different_tp_say_so() -> None:
    result = plan(MIXED, model("Mixtral-8x7B-v0.1"), PlanOptions(model="m"))

    assert [r.tensor_parallel_size for r in result.replicas] == [2, 2, 4]
    assert any("TP2, TP4" in n for n in result.notes)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "inv", "options", "needles"),
    [
        # 405B on 8x80GB: TP8 = 94.5 GiB of weights per GPU alone > 72 usable.
        (
            "Llama-3.1-405B",
            EIGHT_80,
            {},
            ["does not fit", "94.5 GiB weights", "72.0 GiB usable", "engine.multiNode"],
        ),
        # 70B on one 80GB GPU: 131.4 GiB of weights > 72.
        ("Llama-3.1-70B", ONE_80, {}, ["does not fit", "131.4 GiB weights", "helm/"]),
        # Mistral-Nemo on one 24GB GPU: 22.8 + 2 > 21.6 before any KV cache.
        ("Mistral-Nemo-Base-2407", ONE_24, {}, ["22.8 GiB weights", "21.6 GiB usable"]),
        # 64 heads do not split over 3 GPUs.
        ("Llama-3.1-70B", EIGHT_80, {"tensor_parallel_size": 3}, ["--tensor-parallel-size 3"]),
        ("Llama-3.1-8B", FOUR_40, {"tensor_parallel_size": 8}, ["--tensor-parallel-size 8"]),
        # TP1 forced for 70B: weights alone exceed the GPU.
        ("Llama-3.1-70B", EIGHT_80, {"tensor_parallel_size": 1}, ["--tensor-parallel-size 1"]),
        ("Llama-3.1-8B", EIGHT_80, {"replicas": 9}, ["--replicas 9", "at most 8"]),
        # a fixed context that no TP can hold: 405B on 8xH200, 131072 tokens x 504 KiB / 8 ...
        # fits; but 70B on 4x40 at a fixed 131072 does not (TP4 room 15019 tokens).
        ("Llama-3.1-70B", FOUR_40, {"max_model_len": 131072}, ["--max-model-len 131072"]),
        ("Llama-3.1-8B", ONE_80, {"max_model_len": 200000}, ["--max-model-len 200000", "131072"]),
        ("Llama-3.1-8B", ONE_80, {"gpu_memory_utilization": 1.5}, ["--gpu-memory-utilization"]),
        ("Llama-3.1-8B", ONE_80, {"base_port": 70000}, ["--base-port"]),
        ("Llama-3.1-8B", EIGHT_80, {"base_port": 65530}, ["--base-port 65530"]),
        ("Llama-3.1-8B", ONE_80, {"extra_args": ("--port", "9")}, ["--port", "--base-port"]),
        ("Llama-3.1-8B", ONE_80, {"dtype": "int3"}, ["--dtype"]),
        ("Llama-3.1-8B", ONE_80, {"engine": "tgi"}, ["--engine"]),
    ],
)
def test_plan_errors_carry_numbers_and_hint(
    name: str, inv: Inventory, options: dict[str, Any], needles: list[str]
) -> None:
    with pytest.raises(PlanError) as caught:
        plan(inv, model(name), PlanOptions(model=name, **options))

    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert isinstance(caught.value, ConfigError)


# --------------------------------------------------------------------------- commands and env


def test_replica_command_and_env() -> None:
    options = PlanOptions(
        model="meta-llama/Llama-3.1-70B",
        served_model_name="llama",
        dtype="bf16",
        max_num_seqs=64,
        base_port=9000,
        host="0.0.0.0",
        extra_args=("--enable-prefix-caching",),
        env={"HF_HOME": "/data/hf"},
        python="/venv/bin/python",
    )

    result = plan(EIGHT_80, model("Llama-3.1-70B"), options)

    second = result.replicas[1]
    assert second.command == (
        "/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server",
        "--model", "meta-llama/Llama-3.1-70B", "--host", "0.0.0.0", "--port", "9001",
        "--tensor-parallel-size", "4", "--served-model-name", "llama", "--dtype", "bfloat16",
        "--max-model-len", "131072", "--gpu-memory-utilization", "0.9", "--max-num-seqs", "64",
        "--kv-events-config",
        '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:10001",'
        '"replay_endpoint":"tcp://*:11001"}',
        "--disable-uvicorn-access-log", "--enable-prefix-caching",
    )  # fmt: skip
    assert second.kv_events_port == 10001
    assert second.env == {"HF_HOME": "/data/hf", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert second.url == "http://127.0.0.1:9001"


def test_cpu_plan_uses_the_cpu_engine() -> None:
    options = PlanOptions(model="tiny", replicas=2, python="py", env={"HF_HOME": "/hf"})

    result = plan(Inventory(gpus=(), source="none", cpus=8), None, options)

    assert [r.port for r in result.replicas] == [8001, 8002]
    assert all(r.gpus == () and r.tensor_parallel_size == 1 for r in result.replicas)
    # The measured CPU settings of vllm_fleet.launcher.vllm_args: 8 CPUs, 2 replicas -> (8 - 2) // 2
    # threads.
    assert result.replicas[0].env == {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": "3",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HOME": "/hf",
    }
    assert result.replicas[0].command == (
        "py", "-m", "vllm.entrypoints.openai.api_server", "--model", "tiny",
        "--host", "127.0.0.1", "--port", "8001", "--tensor-parallel-size", "1",
        "--kv-events-config",
        '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:9001",'
        '"replay_endpoint":"tcp://*:10001"}',
        "--disable-uvicorn-access-log", "--enforce-eager",
    )  # fmt: skip
    assert any("no GPU found" in n and "CPU engine" in n for n in result.notes)
    assert "OMP_NUM_THREADS=3 per replica (2 replica(s) on 8 CPUs)" in result.notes


def test_cpu_plan_without_a_cpu_count_leaves_the_threads_to_vllm() -> None:
    # `vllm-fleet compose` without --cpus: the file runs on a host the planner knows nothing of.
    result = plan(Inventory(gpus=(), source="declared"), None, PlanOptions(model="tiny"))

    assert "OMP_NUM_THREADS" not in result.replicas[0].env
    assert result.replicas[0].env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert any("OMP_NUM_THREADS is left to vLLM" in n for n in result.notes)


@pytest.mark.parametrize("engine", ["vllm", "sim"])
def test_plan_is_the_same_whatever_the_host_it_runs_on(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner is pure: the same inventory plans the same fleet on a 1-CPU or a 64-CPU
    host, and it never asks the host (a compose file is often written for another machine)."""
    inventories = [Inventory(gpus=(), source="declared", cpus=cpus) for cpus in (None, 4)]
    inventories.append(EIGHT_80)
    options = PlanOptions(model="tiny", engine=engine, replicas=2, python="py")

    def planned(host_cpus: int) -> list[Any]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(host_cpus)))
        monkeypatch.setattr(os, "cpu_count", lambda: host_cpus)
        return [plan(inventory, None, options) for inventory in inventories]

    on_one = planned(1)
    assert on_one == planned(64)

    def no_host(*args: object) -> set[int]:
        raise AssertionError("the planner read the host's CPUs")

    monkeypatch.setattr(os, "sched_getaffinity", no_host)
    monkeypatch.setattr(os, "cpu_count", no_host)
    assert [plan(inventory, None, options) for inventory in inventories] == on_one


def test_cpu_plan_fits_context_into_the_kv_space() -> None:
    # 1 GiB / 128 KiB per token = 8192 tokens < 131072 -> context 8192.
    small = plan(Inventory(gpus=()), model("Llama-3.1-8B"), PlanOptions(model="m"))
    # 40 GiB / 128 KiB = 327680 tokens >= 131072 -> the model's context, untouched.
    roomy = plan(
        Inventory(gpus=()),
        model("Llama-3.1-8B"),
        PlanOptions(model="m", env={"VLLM_CPU_KVCACHE_SPACE": "40"}),
    )

    assert small.max_model_len == 8192
    assert "--max-model-len" in small.replicas[0].command
    assert roomy.max_model_len is None
    assert roomy.replicas[0].env["VLLM_CPU_KVCACHE_SPACE"] == "40"


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"tensor_parallel_size": 2}, "--tensor-parallel-size 2"),
        ({"env": {"VLLM_CPU_KVCACHE_SPACE": "lots"}}, "VLLM_CPU_KVCACHE_SPACE"),
        ({"max_model_len": 65536}, "VLLM_CPU_KVCACHE_SPACE"),
    ],
)
def test_cpu_plan_errors(options: dict[str, Any], needle: str) -> None:
    with pytest.raises(PlanError, match=needle):
        plan(Inventory(gpus=()), model("Llama-3.1-8B"), PlanOptions(model="m", **options))


def test_sim_engine_one_replica_per_gpu_without_sizing() -> None:
    options = PlanOptions(model="sim-model", engine="sim", python="py", max_num_seqs=8)

    on_gpus = plan(FOUR_40, None, options)
    on_cpu = plan(Inventory(gpus=()), None, options)
    counted = plan(Inventory(gpus=()), None, replace(options, replicas=3))

    assert len(on_gpus.replicas) == 4
    assert len(on_cpu.replicas) == 1
    assert len(counted.replicas) == 3
    assert on_gpus.replicas[2].command == (
        "py", "-m", "vllm_fleet.launcher.cli", "sim", "--host", "127.0.0.1", "--port", "8003",
        "--model", "sim-model", "--max-num-seqs", "8",
    )  # fmt: skip
    assert on_gpus.replicas[0].env == {}
    assert on_gpus.engine == "sim"


def test_unsized_model_on_gpus_uses_the_requested_tp() -> None:
    result = plan(EIGHT_80, None, PlanOptions(model="m", tensor_parallel_size=2))

    assert [r.gpus for r in result.replicas] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert any("model size unknown" in n for n in result.notes)


# --------------------------------------------------------------------------- topology


def test_tp_groups_stay_inside_numa_nodes() -> None:
    # node 0 holds GPUs 0,1,4,5 and node 1 holds 2,3,6,7: TP4 groups follow the nodes.
    layout = [Gpu(i, "H100", 80 * GIB, numa_node=0 if i in (0, 1, 4, 5) else 1) for i in range(8)]

    result = plan(Inventory(tuple(layout)), model("Llama-3.1-70B"), PlanOptions(model="m"))

    assert [r.gpus for r in result.replicas] == [(0, 1, 4, 5), (2, 3, 6, 7)]


def test_tp_groups_prefer_nvlink_peers() -> None:
    # PCIe cards bridged in pairs 0-2 and 1-3: TP2 groups are the bridged pairs.
    peers = {0: {2}, 2: {0}, 1: {3}, 3: {1}}
    layout = [Gpu(i, "A6000", 48 * GIB, nvlink_peers=frozenset(peers[i])) for i in range(4)]

    groups, rest, notes = tp_groups(layout, 2)

    assert [tuple(g.index for g in group) for group in groups] == [(0, 2), (1, 3)]
    assert rest == []
    assert notes == []


def test_tp_groups_follow_pcie_order_without_nvlink() -> None:
    # indices interleave two PCIe switches: bus 0x01, 0x81, 0x02, 0x82 -> pairs (0,2), (1,3).
    buses = ["00000000:01:00.0", "00000000:81:00.0", "00000000:02:00.0", "00000000:82:00.0"]
    layout = [Gpu(i, "L4", 24 * GIB, pci_bus_id=bus) for i, bus in enumerate(buses)]

    groups, _, _ = tp_groups(layout, 2)

    assert [tuple(sorted(g.index for g in group)) for group in groups] == [(0, 2), (1, 3)]


def test_tp_groups_cross_numa_only_for_leftovers() -> None:
    # 3 GPUs per node, TP2: (0,1) and (3,4) inside their nodes, then (2,5) across, said so.
    layout = [Gpu(i, "A100-80GB", 80 * GIB, numa_node=i // 3) for i in range(6)]

    groups, rest, notes = tp_groups(layout, 2)

    assert [tuple(g.index for g in group) for group in groups] == [(0, 1), (2, 5), (3, 4)]
    assert rest == []
    assert any("2,5 span NUMA nodes 0,1" in n for n in notes)


def test_partial_nvlink_is_noted() -> None:
    peers = {0: {1}, 1: {0}, 2: set(), 3: set()}
    layout = [Gpu(i, "A6000", 48 * GIB, nvlink_peers=frozenset(peers[i])) for i in range(4)]

    _, _, notes = tp_groups(layout, 4)

    assert notes == ["GPUs 0,1,2,3 are not all NVLink peers: TP traffic uses PCIe"]


def test_uneven_gpu_count_leaves_gpus_over() -> None:
    # 70B needs TP4 on 80GB GPUs (see above); 6 GPUs hold one TP4 group, 2 are left.
    result = plan(inventory(gpus(6, 80)), model("Llama-3.1-70B"), PlanOptions(model="m"))

    assert [r.gpus for r in result.replicas] == [(0, 1, 2, 3)]
    assert result.leftover_gpus == (4, 5)
    assert any("GPUs 4,5 unused" in n for n in result.notes)


# --------------------------------------------------------------------------- memory model


def test_kv_heads_split_then_replicate() -> None:
    size = ModelSize("m", 0, kv_bytes_per_token=4 * 1024, num_attention_heads=32,
                     num_key_value_heads=4, max_model_len=4096)  # fmt: skip

    assert kv_bytes_per_token_per_gpu(size, 1) == 4096
    assert kv_bytes_per_token_per_gpu(size, 2) == 2048
    assert kv_bytes_per_token_per_gpu(size, 4) == 1024
    # 4 KV heads over 8 ranks: each rank keeps a whole head (replicated), not half of one.
    assert kv_bytes_per_token_per_gpu(size, 8) == 1024


def test_budget_constants_are_the_documented_ones() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "planning.md").read_text()

    assert OVERHEAD_BYTES == 2 * GIB and "2 GiB" in doc
    assert MIN_KV_TOKENS == 32768 and "32768" in doc
