"""`vllm-fleet up --runtime docker`, `status` and `down` through the real CLI.

The main test runs what a user types on a machine without GPUs: two vLLM CPU engine containers
of the engine image's built-in tiny model (``/models/tiny``, not a host path), the router as a
host process, the fleet detached and stopped by `down`. Two quick ones run the simulator in the
router image: a killed supervisor's containers are removed by `down`, and a missing image is one
error line before anything starts.

The CLI is run as ``python -m vllm_fleet.launcher.cli``: the ``vllm-fleet`` entry point's own
``main``, under the interpreter running the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from openai import OpenAI

from tests.compose.support import (
    ENGINE_READY_S,
    REPO_ROOT,
    ROUTER_IMAGE,
    TINY_MODEL,
    docker_client,
    get_json,
    poll,
    require_images,
)
from tests.support.ports import free_port, free_port_run
from vllm_fleet.launcher.rundir import FleetState, RunDir
from vllm_fleet.launcher.runtime.docker import (
    DEFAULT_CPU_IMAGE,
    LABEL_FLEET,
    LABEL_REPLICA,
    fleet_containers,
    fleet_name_for,
    remove_fleet_containers,
)
from vllm_fleet.launcher.runtime.process import process_alive

pytestmark = pytest.mark.e2e

#: what the test fleets change from the defaults: quick health checks and stops, and a replica
#: that cannot start fails after one restart instead of five.
FLEET_YAML = """\
health_interval_s: 0.5
stop_timeout_s: 10
restart: {max_restarts: 1, backoff_initial_s: 1, backoff_max_s: 2}
router: {extra_args: ['--health-interval', '0.5']}
"""


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_fleet.launcher.cli", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@dataclass
class DockerFleet:
    """One run directory for `up --runtime docker`, and what identifies its containers."""

    client: docker.DockerClient
    run_dir: RunDir
    config: Path
    router_port: int
    base_port: int

    @property
    def name(self) -> str:
        return fleet_name_for(self.run_dir.path)

    def up(self, *flags: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return cli(
            "up", "--runtime", "docker", "--detach", "--config", str(self.config),
            "--replicas", "2", "--port", str(self.router_port),
            "--base-port", str(self.base_port), *flags, *self.args,
            timeout=timeout,
        )  # fmt: skip

    @property
    def args(self) -> list[str]:
        return ["--run-dir", str(self.run_dir.path)]

    def state(self) -> FleetState:
        state = self.run_dir.read_state()
        assert state is not None, f"no {self.run_dir.state_path}"
        return state

    def replicas(self) -> dict[str, str]:
        """replica label -> container status, for this fleet's containers."""
        return {c.labels[LABEL_REPLICA]: c.status for c in fleet_containers(self.client, self.name)}


@pytest.fixture
def docker_fleet(tmp_path: Path) -> Iterator[DockerFleet]:
    client = docker_client()
    config = tmp_path / "fleet.yaml"
    config.write_text(FLEET_YAML)
    fleet = DockerFleet(client, RunDir(tmp_path / ".fleet"), config, free_port(), free_port_run(2))
    try:
        yield fleet
    finally:
        state = fleet.run_dir.read_state()
        cli("down", *fleet.args)
        if state is not None and process_alive(state.supervisor_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.supervisor_pid, signal.SIGKILL)
        remove_fleet_containers(fleet.name, client=client, timeout=1)


def status_json(fleet: DockerFleet) -> dict[str, Any]:
    result = cli("status", "--json", *fleet.args)
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_up_runtime_docker_serves_from_two_labelled_containers_and_down_removes_them(
    docker_fleet: DockerFleet,
) -> None:
    fleet = docker_fleet
    require_images(fleet.client, DEFAULT_CPU_IMAGE)

    up = fleet.up(
        "--engine", "vllm", "--model", "/models/tiny", "--served-model-name", TINY_MODEL,
        "--dtype", "float32", "--max-model-len", "1024",
        "--health-timeout", f"{ENGINE_READY_S:g}",
        timeout=ENGINE_READY_S + 120,
    )  # fmt: skip

    assert up.returncode == 0, up.stdout + up.stderr
    endpoint = f"http://127.0.0.1:{fleet.router_port}"
    assert f"Fleet ready: {endpoint}/v1 (2/2 replicas healthy)" in up.stdout
    state = fleet.state()
    assert (state.status, state.runtime) == ("ready", "docker")
    containers = fleet_containers(fleet.client, fleet.name)
    assert sorted(c.labels[LABEL_REPLICA] for c in containers) == ["replica-0", "replica-1"]
    assert {c.labels[LABEL_FLEET] for c in containers} == {fleet.name}
    assert {c.status for c in containers} == {"running"}
    # no --image: the CPU engine image, the default without GPUs
    assert {c.image.tags[0] for c in containers} == {DEFAULT_CPU_IMAGE}

    data = status_json(fleet)
    assert data["supervisor_alive"] is True
    assert data["runtime"] == "docker"
    units = {u["name"]: u for u in data["units"]}
    assert set(units) == {"replica-0", "replica-1", "router"}
    assert {u["health"] for u in units.values()} == {"ok"}
    assert {u["state"] for u in units.values()} == {"healthy"}
    text = cli("status", *fleet.args).stdout
    assert "ready (2/2 replicas healthy)" in text and "runtime docker" in text

    client = OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=60)
    with client:
        reply = client.chat.completions.create(
            model=TINY_MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            # random weights: without this the first token may well be EOS
            extra_body={"ignore_eos": True},
        )
        stream = client.completions.create(
            model=TINY_MODEL, prompt="Once", max_tokens=8, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = list(stream)
    assert reply.choices[0].message.content
    assert len(chunks) >= 2

    # both replicas were healthy when `up` reported ready; the router re-reads the backends
    # file on its own clock, so give it a moment to list the second one too.
    def router_lists_both() -> list[str] | None:
        rows = get_json(f"{endpoint}/fleet/replicas")
        urls = sorted(str(row["url"]) for row in rows if row["healthy"])
        return urls if len(urls) == 2 else None

    replica_urls = sorted(u.url for u in state.replicas())
    assert poll(router_lists_both, "the router to list both containers", 15) == replica_urls

    down = cli("down", *fleet.args, timeout=120)

    assert down.returncode == 0, down.stdout + down.stderr
    assert f"Stopped fleet {endpoint}/v1" in down.stdout
    # the supervisor's own orderly stop removed them: nothing was left for `down` to clean up
    assert "leftover" not in down.stdout
    assert fleet_containers(fleet.client, fleet.name) == []
    assert fleet.run_dir.read_state() is None
    assert not process_alive(state.supervisor_pid)
    # the replicas' output survives in the run directory's logs
    log = (fleet.run_dir.logs_dir / "replica-0.log").read_text()
    assert "vllm.entrypoints.openai.api_server" in log.splitlines()[0]
    assert "Application startup complete" in log


def test_down_removes_the_containers_a_killed_supervisor_left(docker_fleet: DockerFleet) -> None:
    fleet = docker_fleet
    require_images(fleet.client, ROUTER_IMAGE)
    up = fleet.up("--engine", "sim", "--engine-arg=--step-ms", "--engine-arg=1")
    assert up.returncode == 0, up.stdout + up.stderr
    state = fleet.state()
    assert fleet.replicas() == {"replica-0": "running", "replica-1": "running"}
    assert {c.image.tags[0] for c in fleet_containers(fleet.client, fleet.name)} == {ROUTER_IMAGE}

    os.kill(state.supervisor_pid, signal.SIGKILL)
    poll(lambda: not process_alive(state.supervisor_pid), "the supervisor to die", 10, 0.05)
    again = fleet.up("--engine", "sim")
    assert again.returncode == 2
    assert "processes of a fleet whose supervisor died are still running" in again.stderr
    assert fleet.replicas() == {"replica-0": "running", "replica-1": "running"}

    down = cli("down", *fleet.args)

    assert down.returncode == 0, down.stdout + down.stderr
    assert "Removed leftover containers: " in down.stdout
    assert f"vllm-fleet-{fleet.name}-replica-0" in down.stdout
    assert "Killed leftover processes: router" in down.stdout
    assert fleet.replicas() == {}
    assert fleet.run_dir.read_state() is None


def test_missing_image_is_one_line_before_anything_starts(docker_fleet: DockerFleet) -> None:
    fleet = docker_fleet
    image = f"vllm-fleet-missing-{os.getpid()}:0"

    up = fleet.up("--engine", "sim", "--image", image)

    assert up.returncode == 2
    assert up.stderr.strip().splitlines() == [
        f"vllm-fleet up: error: --runtime docker: image {image} not found locally; "
        f"build it with `bash compose/build-images.sh` ({image})"
    ]
    assert not fleet.run_dir.state_path.exists()
    assert fleet.replicas() == {}
