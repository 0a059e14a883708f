"""A file written by `vllm-fleet compose` runs: the sim engine (in the router image) keeps it
fast, and the same file layout serves GPU plans (validated in test_compose_config.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from tests.compose.support import (
    REPO_ROOT,
    ROUTER_IMAGE,
    ComposeProject,
    compose_up,
    docker_client,
    get_json,
    leftovers,
    poll,
    require_images,
    unique_name,
)
from tests.support.ports import free_port
from vllm_fleet.launcher.cli import main


def test_generated_sim_fleet_serves_through_its_router(tmp_path: Path) -> None:
    client = docker_client()
    require_images(client, ROUTER_IMAGE)
    port = free_port()
    out = tmp_path / "generated.yml"
    subprocess.run(
        [sys.executable, "-m", "vllm_fleet.launcher.cli", "compose", "--engine", "sim",
         "--replicas", "2",
         "--port", str(port), "-o", str(out)],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    project = ComposeProject(unique_name("vftest-gen"), (out,))
    with compose_up(project, client):
        router = f"http://127.0.0.1:{port}"
        poll(
            lambda: all(r["healthy"] for r in get_json(f"{router}/fleet/replicas")),
            "both simulated replicas healthy in the router",
            deadline_s=30,
        )
        with OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0) as openai:
            for i in range(10):
                reply = openai.chat.completions.create(
                    model="sim-model", messages=[{"role": "user", "content": f"{i}"}], max_tokens=4
                )
                assert reply.choices[0].message.content
        served = {r["url"]: r["served"] for r in get_json(f"{router}/fleet/replicas")}
        assert sorted(served) == ["http://replica-0:8001", "http://replica-1:8002"]
        assert sum(served.values()) == 10
    assert leftovers(client, project.name) == []


@pytest.mark.parametrize("bad", [["--replicas", "0"], ["--engine", "nope"], ["--cpus", "0"]])
def test_bad_flags_are_one_line_errors(bad: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vllm_fleet.launcher.cli", "compose", "--model", "m", *bad],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("vllm-fleet compose: error:")
    assert "Traceback" not in result.stderr


def _cpu_replica_env(capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, str]:
    status = main(["compose", "--model", "/models/tiny", "--gpus", "none", "--replicas", "2",
                   "--cpu-image", "engine:1", *flags])  # fmt: skip
    assert status == 0
    document = yaml.safe_load(capsys.readouterr().out)
    env: dict[str, str] = document["services"]["replica-1"]["environment"]
    return env


def test_the_cpu_count_is_the_target_hosts_never_this_machines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compose file runs on another host: this machine's CPUs must not size its threads."""

    def this_machine(*args: object) -> set[int]:
        raise AssertionError("vllm-fleet compose read this machine's CPUs")

    monkeypatch.setattr(os, "sched_getaffinity", this_machine)

    unknown = _cpu_replica_env(capsys)
    given = _cpu_replica_env(capsys, "--cpus", "16")

    assert "OMP_NUM_THREADS" not in unknown
    assert unknown["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert given["OMP_NUM_THREADS"] == "7"  # (16 CPUs - 2 replicas) // 2
