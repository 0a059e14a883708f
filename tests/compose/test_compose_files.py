"""The hand-written compose files agree with the code and with Compose's own types, checked by
reading them (no Docker needed; test_compose_config.py resolves them with `docker compose config`).

Two defaults once disagreed: compose and .env.example started the router with least-busy while
the router, the chart and the README said cost; and a tensor-parallel replica's GPUs were one
comma-joined device id (``["0,1,2,3"]``) where Compose and the NVIDIA runtime expect one id per
GPU (``["0", "1", "2", "3"]``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.compose.support import COMPOSE_DIR, REPO_ROOT, SAMPLE_ENV
from vllm_fleet.router.config import RouterConfig

GPU_FILE = COMPOSE_DIR / "docker-compose.yml"
CPU_FILE = COMPOSE_DIR / "docker-compose.cpu.yml"
_VARIABLE = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def _env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs if not k.startswith("#")}


def _resolve(value: str, env: dict[str, str]) -> str:
    """``${VAR:-default}`` as Compose substitutes it (set and non-empty wins)."""
    return _VARIABLE.sub(lambda m: env.get(m.group(1)) or m.group(2), value)


def _gpu_replicas(env: dict[str, str]) -> dict[str, tuple[list[str], int]]:
    """Replica services the profiles in ``env`` start -> (device ids, tensor-parallel size)."""
    active = set(env.get("COMPOSE_PROFILES", "").split(","))
    layout = {}
    for name, service in _load(GPU_FILE)["services"].items():
        if name == "router" or not active & set(service["profiles"]):
            continue
        (devices,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices["driver"] == "nvidia" and devices["capabilities"] == ["gpu"]
        command = service["command"].split()
        tp = int(command[command.index("--tensor-parallel-size") + 1])
        layout[name] = ([_resolve(d, env) for d in devices["device_ids"]], tp)
    return layout


def test_every_file_starts_the_router_with_its_own_default_policy() -> None:
    (default,) = (f.default for f in dataclasses.fields(RouterConfig) if f.name == "policy")
    for path in (GPU_FILE, CPU_FILE):
        policy = _load(path)["services"]["router"]["environment"]["FLEET_POLICY"]
        assert policy == f"${{FLEET_POLICY:-{default}}}", path.name
    assert _env(SAMPLE_ENV)["FLEET_POLICY"] == default
    chart = yaml.safe_load((REPO_ROOT / "helm" / "vllm-fleet" / "values.yaml").read_text())
    assert chart["router"]["config"]["policy"] == default


def test_every_gpu_replica_lists_one_device_id_per_gpu_of_its_group() -> None:
    for name, service in _load(GPU_FILE)["services"].items():
        if name == "router":
            continue
        (devices,) = service["deploy"]["resources"]["reservations"]["devices"]
        ids = devices["device_ids"]
        command = service["command"].split()
        tp = int(command[command.index("--tensor-parallel-size") + 1])
        assert len(ids) == tp, name
        assert all(_VARIABLE.fullmatch(i) for i in ids), f"{name}: {ids} are not GPU slots"


@pytest.mark.parametrize(
    ("profiles", "layout"),
    [
        ("replicas-2", {"replica-0": (["0"], 1), "replica-1": (["1"], 1)}),
        ("replicas-4", {f"replica-{i}": ([str(i)], 1) for i in range(4)}),
        ("tp4-replicas-1", {"tp4-replica-0": (["0", "1", "2", "3"], 4)}),
        ("tp2-replicas-2", {"tp2-replica-0": (["0", "1"], 2), "tp2-replica-1": (["2", "3"], 2)}),
        ("tp8-replicas-1", {"tp8-replica-0": ([str(i) for i in range(8)], 8)}),
        ("tp4-replicas-2", {"tp4-replica-0": (["0", "1", "2", "3"], 4),
                            "tp4-replica-1": (["4", "5", "6", "7"], 4)}),
    ],
)  # fmt: skip
def test_the_documented_layouts(profiles: str, layout: dict[str, tuple[list[str], int]]) -> None:
    env = {**_env(SAMPLE_ENV), "COMPOSE_PROFILES": profiles}

    assert _gpu_replicas(env) == layout


def test_gpu_slots_remap_whole_groups() -> None:
    env = {**_env(SAMPLE_ENV), "COMPOSE_PROFILES": "tp2-replicas-2", "GPU_1": "2", "GPU_2": "1"}

    assert _gpu_replicas(env) == {
        "tp2-replica-0": (["0", "2"], 2),
        "tp2-replica-1": (["1", "3"], 2),
    }


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_no_two_replicas_of_a_layout_share_a_gpu(tp: int) -> None:
    prefix = "replicas" if tp == 1 else f"tp{tp}-replicas"
    for count in range(1, 8 // tp + 1):
        env = {**_env(SAMPLE_ENV), "COMPOSE_PROFILES": f"{prefix}-{count}"}
        layout = _gpu_replicas(env)
        ids = [i for devices, size in layout.values() for i in devices]
        assert len(layout) == count
        assert sorted(ids, key=int) == [str(i) for i in range(count * tp)]


def test_every_file_lets_the_router_use_its_cores() -> None:
    """FLEET_WORKERS passes through with the router's default (one process), and the sample
    .env documents it (docs/router-workers.md)."""
    for path in (GPU_FILE, CPU_FILE):
        workers = _load(path)["services"]["router"]["environment"]["FLEET_WORKERS"]
        assert workers == "${FLEET_WORKERS:-1}", path.name
        assert _resolve(workers, {"FLEET_WORKERS": "auto"}) == "auto"
    assert _env(SAMPLE_ENV)["FLEET_WORKERS"] == "1"
