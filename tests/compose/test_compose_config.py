"""`docker compose config` accepts every compose file, and .env alone decides the layout.

The GPU file is only validated here (no GPU on CI): the sample .env and the documented layouts
must come out as the replicas, GPU groups and tensor-parallel sizes the comments promise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.compose.support import (
    COMPOSE_DIR,
    REPO_ROOT,
    SAMPLE_ENV,
    ComposeProject,
    docker_client,
)

GPU_FILE = COMPOSE_DIR / "docker-compose.yml"
CPU_FILE = COMPOSE_DIR / "docker-compose.cpu.yml"


@pytest.fixture(scope="module")
def client() -> docker.DockerClient:
    return docker_client()


def gpu_config(tmp_path: Path, **overrides: str) -> dict[str, Any]:
    """The GPU file resolved with the sample .env plus ``overrides`` (a second --env-file)."""
    extra = tmp_path / "scenario.env"
    extra.write_text("".join(f"{k}={v}\n" for k, v in overrides.items()))
    project = ComposeProject("vf-config", (GPU_FILE,), env_files=(SAMPLE_ENV, extra))
    return project.config()


def layout(config: dict[str, Any]) -> dict[str, tuple[list[str], str]]:
    """replica service -> (device_ids, --tensor-parallel-size)."""
    result = {}
    for name, service in config["services"].items():
        if name == "router":
            continue
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert [d["driver"] for d in devices] == ["nvidia"]
        assert devices[0]["capabilities"] == ["gpu"]
        command = service["command"]
        tp = command[command.index("--tensor-parallel-size") + 1]
        result[name] = (devices[0]["device_ids"], tp)
    return result


def test_sample_env_gives_two_replicas_on_gpus_0_and_1(
    client: docker.DockerClient, tmp_path: Path
) -> None:
    config = gpu_config(tmp_path)
    assert layout(config) == {"replica-0": (["0"], "1"), "replica-1": (["1"], "1")}
    router = config["services"]["router"]
    assert router["ports"][0]["host_ip"] == "127.0.0.1"
    assert router["environment"]["FLEET_DISCOVER_DNS"] == "engine:8000"
    assert router["environment"]["FLEET_POLICY"] == "cost"
    for name in ("replica-0", "replica-1"):
        replica = config["services"][name]
        assert replica["ipc"] == "host"
        assert replica["networks"]["default"]["aliases"] == ["engine"]
        assert replica["restart"] == "unless-stopped"
        assert replica["command"][:2] == ["--model", "Qwen/Qwen2.5-7B-Instruct"]
        assert replica["healthcheck"]["start_period"] == "30m0s"


def test_four_replicas_need_only_the_profile(client: docker.DockerClient, tmp_path: Path) -> None:
    config = gpu_config(tmp_path, COMPOSE_PROFILES="replicas-4")
    assert layout(config) == {f"replica-{i}": ([str(i)], "1") for i in range(4)}


def test_one_tensor_parallel_replica_over_four_gpus(
    client: docker.DockerClient, tmp_path: Path
) -> None:
    # One device id per GPU: Compose once received the group as one "0,1,2,3" string.
    config = gpu_config(tmp_path, COMPOSE_PROFILES="tp4-replicas-1")
    assert layout(config) == {"tp4-replica-0": (["0", "1", "2", "3"], "4")}


def test_two_tensor_parallel_replicas_with_remapped_gpu_slots(
    client: docker.DockerClient, tmp_path: Path
) -> None:
    config = gpu_config(tmp_path, COMPOSE_PROFILES="tp2-replicas-2", GPU_1="2", GPU_2="1")
    assert layout(config) == {
        "tp2-replica-0": (["0", "2"], "2"),
        "tp2-replica-1": (["1", "3"], "2"),
    }


def test_eight_replicas_is_the_largest_layout(client: docker.DockerClient, tmp_path: Path) -> None:
    config = gpu_config(tmp_path, COMPOSE_PROFILES="replicas-8")
    assert sorted(layout(config)) == [f"replica-{i}" for i in range(8)]


def test_gpu_file_without_model_is_rejected_naming_the_variable(
    client: docker.DockerClient, tmp_path: Path
) -> None:
    project = ComposeProject("vf-config", (GPU_FILE,), env_files=(Path("/dev/null"),))
    with pytest.raises(AssertionError, match=r"set MODEL in compose/\.env"):
        project.run("config", "--quiet")


def test_cpu_file_two_replicas_and_the_router(client: docker.DockerClient, tmp_path: Path) -> None:
    config = ComposeProject("vf-config", (CPU_FILE,), env_files=(SAMPLE_ENV,)).config()
    services = config["services"]
    assert sorted(services) == ["replica-0", "replica-1", "router"]
    for name in ("replica-0", "replica-1"):
        assert services[name]["image"] == "vllm-fleet-engine-cpu:0.1.0"
        assert services[name]["init"] is True
        assert "deploy" not in services[name]
    assert services["router"]["ports"][0]["published"] == "8000"


def test_generated_file_from_the_planner_is_valid(
    client: docker.DockerClient, tmp_path: Path
) -> None:
    out = tmp_path / "generated.yml"
    subprocess.run(
        [sys.executable, "-m", "vllm_fleet.launcher.cli", "compose", "--model",
         "meta-llama/Llama-3.1-70B",
         "--params", "70B", "--gpus", "8x80GB", "-o", str(out)],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    config = ComposeProject("vf-config", (out,)).config()
    devices = {
        name: s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name, s in config["services"].items()
        if name != "router"
    }
    assert devices == {"replica-0": ["0", "1", "2", "3"], "replica-1": ["4", "5", "6", "7"]}
    assert config["services"]["router"]["environment"]["FLEET_BACKENDS"] == (
        "http://replica-0:8001,http://replica-1:8002"
    )
