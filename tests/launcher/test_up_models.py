"""A fleet of several models started by `vllm-fleet up --config` (simulated replicas, real
processes): one router answers every model and adapter, `status` groups the replicas by model,
`down` stops them all; `compose` writes the same replicas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from tests.launcher.test_up_command import Fleet, cli, kill_everything
from tests.support.ports import free_port, free_port_run
from vllm_fleet.launcher.rundir import RunDir
from vllm_fleet.launcher.runtime.process import group_members, process_alive

SIM_FLAGS = "extra_args: ['--step-ms', '1']"


def models_yaml(tmp_path: Path, router_port: int, base_port: int) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        f"""\
engine: sim
{SIM_FLAGS}
base_port: {base_port}
router: {{port: {router_port}, extra_args: ['--health-interval', '0.2']}}
health_interval_s: 0.1
health_timeout_s: 20
stop_timeout_s: 3
models:
  - model: chat
    replicas: 2
  - model: base-7b
    served_model_name: small
    lora_modules: {{sql: /adapters/sql}}
"""
    )
    return path


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    router_port = free_port()
    config = models_yaml(tmp_path, router_port, free_port_run(3))
    handle = Fleet(RunDir(tmp_path / "run"), router_port, config, set())
    try:
        yield handle
    finally:
        cli("down", *handle.args)
        kill_everything(handle.seen)


def test_two_models_and_an_adapter_answer_through_one_router(fleet: Fleet) -> None:
    result = cli("up", "--config", str(fleet.config), "--detach", *fleet.args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Plan: 3 replicas of 2 models" in result.stdout
    assert "(3/3 replicas healthy)" in result.stdout
    state = fleet.state()
    assert {u.name: u.model for u in state.replicas()} == {
        "chat-0": "chat", "chat-1": "chat", "small-0": "small",
    }  # fmt: skip

    client = OpenAI(base_url=f"http://127.0.0.1:{fleet.router_port}/v1", api_key="x")
    assert {m.id for m in client.models.list()} == {"chat", "small", "sql"}
    for model in ("chat", "small", "sql", "chat"):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.model == model and reply.choices[0].message.content

    status = cli("status", "--json", *fleet.args)
    assert status.returncode == 0, status.stderr
    assert yaml.safe_load(status.stdout)["models"] == {
        "chat": ["chat-0", "chat-1"], "small": ["small-0"],
    }  # fmt: skip
    text = cli("status", *fleet.args).stdout
    assert "chat: 2/2 replicas healthy" in text and "small: 1/1 replicas healthy" in text
    row = next(line.split() for line in text.splitlines() if line.strip().startswith("small-0"))
    assert row[1:3] == ["small", "healthy"]

    final = fleet.state()
    down = cli("down", *fleet.args)
    assert down.returncode == 0, down.stderr
    assert all(not process_alive(p) for p in [final.supervisor_pid, *final.pgids()])
    assert all(group_members(p) == [] for p in final.pgids())


def test_compose_writes_every_models_replicas(tmp_path: Path) -> None:
    config = models_yaml(tmp_path, 8000, 9001)
    result = cli("compose", "--config", str(config))
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"chat-0", "chat-1", "small-0", "router"}
    backends = services["router"]["environment"]["FLEET_BACKENDS"]
    assert backends == "http://chat-0:9001,http://chat-1:9002,http://small-0:9003"
    command = services["small-0"]["entrypoint"]
    assert command[command.index("--lora-modules") + 1] == "sql=/adapters/sql"


def test_docker_mounts_local_adapters_and_slurm_refuses_several_models(tmp_path: Path) -> None:
    from vllm_fleet.launcher.commands.plan_fleet import plan_fleet_config
    from vllm_fleet.launcher.config import load_config
    from vllm_fleet.launcher.runtime.docker import DockerSettings, container_config

    adapter = tmp_path / "sql-lora"
    adapter.mkdir()
    config = models_yaml(tmp_path, 8000, 9001)
    config.write_text(config.read_text().replace("/adapters/sql", str(adapter)))
    fleet = plan_fleet_config(load_config(config), source=str(config))
    small = next(r for r in fleet.replicas if r.served_model == "small")
    binds = container_config(small, DockerSettings(fleet="f")).binds
    assert (str(adapter), str(adapter), True) in binds
    result = cli("slurm", "--config", str(config), "--nodes", "1", "-o", str(tmp_path / "j.sh"))
    assert result.returncode == 2
    assert "models: a SLURM job serves one model" in result.stderr


def test_a_sim_model_among_vllm_models(tmp_path: Path) -> None:
    """compose runs it in the router image (which has the simulator); the docker runtime
    refuses it in one line rather than start it in an engine image without one."""
    config = tmp_path / "fleet.yaml"
    config.write_text(
        "gpus: none\nmodels:\n  - {model: org/chat}\n  - {model: echo, engine: sim}\n"
    )
    result = cli("compose", "--config", str(config), "--cpu-image", "cpu:1")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["chat-0"]["image"] == "cpu:1"
    assert services["echo-0"]["image"] == "vllm-fleet-router:0.1.0"
    up = cli("up", "--config", str(config), "--runtime", "docker", "--run-dir", str(tmp_path))
    assert up.returncode == 2 and len(up.stderr.strip().splitlines()) == 1
    assert "engine: sim next to vLLM models runs only with runtime: process" in up.stderr
