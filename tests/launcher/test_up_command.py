"""`vllm-fleet up / status / down` end to end with simulated replicas (real processes)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.support.ports import free_port, free_port_run
from tests.support.sim import REPO_ROOT
from vllm_fleet.launcher.cli import build_parser
from vllm_fleet.launcher.commands.up import config_from_args
from vllm_fleet.launcher.config import FleetConfig, from_mapping
from vllm_fleet.launcher.fleet import SIM_ENGINE_IMAGE, docker_image_environ, make_runtime
from vllm_fleet.launcher.rundir import FleetState, RunDir, UnitRecord
from vllm_fleet.launcher.runtime.process import ProcessRuntime, group_members, process_alive

DEADLINE_S = 30.0


def wait_for(predicate: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cli(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_fleet.launcher.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def fleet_yaml(tmp_path: Path, router_port: int, base_port: int, **extra: str) -> Path:
    path = tmp_path / "fleet.yaml"
    lines = [
        "engine: sim",
        "model: sim-model",
        "replicas: 2",
        f"base_port: {base_port}",
        "extra_args: ['--step-ms', '1']",
        f"router: {{port: {router_port}, extra_args: ['--health-interval', '0.2']}}",
        "health_interval_s: 0.1",
        "health_timeout_s: 20",
        "stop_timeout_s: 3",
        "restart: {max_restarts: 3, backoff_initial_s: 0.1, backoff_max_s: 0.5}",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def kill_everything(pids: set[int]) -> None:
    for pid in pids:
        if group_members(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Fleet:
    run_dir: RunDir
    router_port: int
    config: Path
    #: every pid ever seen in state.json, for the cleanup.
    seen: set[int]

    @property
    def args(self) -> list[str]:
        return ["--run-dir", str(self.run_dir.path)]

    def state(self) -> FleetState:
        state = self.run_dir.read_state()
        assert state is not None
        self.seen.update([state.supervisor_pid, *state.pgids()])
        return state

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"http://127.0.0.1:{self.router_port}/v1", api_key="x")


@pytest.fixture
def fleet_files(tmp_path: Path) -> Iterator[Fleet]:
    router_port = free_port()
    config = fleet_yaml(tmp_path, router_port, free_port_run(2))
    fleet = Fleet(RunDir(tmp_path / "run"), router_port, config, set())
    try:
        yield fleet
    finally:
        with contextlib.suppress(AssertionError):
            fleet.state()
        cli("down", *fleet.args)
        kill_everything(fleet.seen)


@pytest.fixture
def detached(fleet_files: Fleet) -> Fleet:
    result = cli("up", "--config", str(fleet_files.config), "--detach", *fleet_files.args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Fleet ready: http://127.0.0.1:{fleet_files.router_port}/v1 (2/2" in result.stdout
    fleet_files.state()
    return fleet_files


def chat(client: OpenAI) -> str:
    reply = client.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    return reply.choices[0].message.content or ""


def status_json(fleet: Fleet) -> dict[str, Any]:
    result = cli("status", "--json", *fleet.args)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_detached_fleet_serves_restarts_reports_and_stops(detached: Fleet) -> None:
    state = detached.state()
    assert state.status == "ready"
    pids = [state.supervisor_pid, *state.pgids()]
    assert len(pids) == 4 and all(process_alive(p) for p in pids)

    refused = cli("up", "--config", str(detached.config), "--detach", *detached.args)
    assert refused.returncode == 2
    assert "a fleet is already running there" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    client = detached.client()
    assert all(chat(client) for _ in range(4))
    data = status_json(detached)
    assert data["supervisor_alive"] is True
    units = {u["name"]: u for u in data["units"]}
    assert set(units) == {"replica-0", "replica-1", "router"}
    assert {u["health"] for u in units.values()} == {"ok"}
    assert {u["state"] for u in units.values()} == {"healthy"}
    assert sum(units[n]["load"]["served"] for n in ("replica-0", "replica-1")) == 4

    victim = next(u for u in state.units if u.name == "replica-1")
    assert victim.pgid is not None
    os.killpg(victim.pgid, signal.SIGKILL)

    def restarted() -> bool:
        unit = next(u for u in detached.state().units if u.name == "replica-1")
        return unit.restarts == 1 and unit.state == "healthy" and unit.pgid != victim.pgid

    wait_for(restarted, "replica-1 to be restarted")
    assert all(chat(client) for _ in range(2))
    text = cli("status", *detached.args).stdout
    assert "ready (2/2 replicas healthy)" in text
    assert "IN-FLIGHT" in text
    row = next(line.split() for line in text.splitlines() if line.strip().startswith("replica-1"))
    assert row[1:3] == ["healthy", "ok"] and row[6] == "1"  # state, health, restarts
    final = detached.state()

    result = cli("down", *detached.args)

    assert result.returncode == 0, result.stderr
    assert "Stopped fleet" in result.stdout and "replica-0 (pgid" in result.stdout
    assert "leftover" not in result.stdout
    gone = [state.supervisor_pid, *final.pgids(), victim.pgid]
    assert all(not process_alive(p) for p in gone)
    assert all(group_members(p) == [] for p in gone[1:])
    assert detached.run_dir.read_state() is None
    after = cli("status", *detached.args)
    assert after.returncode == 1 and "No fleet running" in after.stdout


def test_down_kills_leftovers_when_the_supervisor_died(fleet_files: Fleet) -> None:
    result = cli(
        "up", "--config", str(fleet_files.config), "--replicas", "1", "--detach",
        *fleet_files.args,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(1/1 replicas healthy)" in result.stdout  # the flag beat the file's replicas: 2
    state = fleet_files.state()
    assert [u.name for u in state.replicas()] == ["replica-0"]
    os.kill(state.supervisor_pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(state.supervisor_pid), "the supervisor to die")
    assert all(process_alive(p) for p in state.pgids())
    again = cli("up", "--config", str(fleet_files.config), *fleet_files.args)
    assert again.returncode == 2
    assert "processes of a fleet whose supervisor died are still running" in again.stderr

    result = cli("down", *fleet_files.args)

    assert result.returncode == 0, result.stderr
    assert "Killed leftover processes" in result.stdout
    assert all(not process_alive(p) for p in state.pgids())


def test_foreground_up_stops_everything_on_sigterm(fleet_files: Fleet, tmp_path: Path) -> None:
    out = tmp_path / "up.out"
    with open(out, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_fleet.launcher.cli", "up", "--config",
             str(fleet_files.config),
             *fleet_files.args],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    fleet_files.seen.add(proc.pid)
    try:
        wait_for(lambda: "Fleet ready" in out.read_text(), "the fleet to be ready")
        state = fleet_files.state()
        assert state.supervisor_pid == proc.pid
        assert chat(fleet_files.client())

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.read_text()
    assert text.index("router: stopped") < text.index("replica-0: stopped")
    assert "fleet stopped" in text
    assert all(not process_alive(p) for p in state.pgids())
    assert fleet_files.run_dir.read_state() is None


def test_config_mistake_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("engine: sim\nrouter:\n  prot: 8000\n")
    result = cli("up", "--config", str(bad), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"vllm-fleet up: error: {bad}: router.prot: unknown key (did you mean 'port'?)"
    )


def test_port_in_use_is_refused_before_starting(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = cli(
            "up", "--engine", "sim", "--port", str(port), "--run-dir", str(tmp_path / "run")
        )
    assert result.returncode == 2
    assert f"--port: port {port} (router) is already in use" in result.stderr
    assert not (tmp_path / "run" / "state.json").exists()


def test_down_without_a_fleet_says_so(tmp_path: Path) -> None:
    result = cli("down", "--run-dir", str(tmp_path / "nothing"))
    assert result.returncode == 0
    assert "No fleet running" in result.stdout


# --------------------------------------------------------------------------- --runtime docker

#: a Docker daemon address that cannot answer: any attempt to talk to Docker fails loudly.
NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def up_config(*argv: str) -> FleetConfig:
    return config_from_args(build_parser().parse_args(["up", *argv]))


def test_runtime_and_image_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("engine: sim\nruntime: process\nimage: from-file:1\n")
    config = up_config("--config", str(path), "--runtime", "docker", "--image", "from-flag:2")
    assert (config.runtime, config.image) == ("docker", "from-flag:2")
    assert up_config("--config", str(path)).image == "from-file:1"
    assert up_config("--engine", "sim").runtime == "process"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--runtime", "podman"],
            "vllm-fleet up: error: --runtime: expected one of 'process', 'docker', got 'podman'",
        ),
        (
            ["--image", "vllm-fleet-engine-cpu:0.1.0"],
            "vllm-fleet up: error: --image vllm-fleet-engine-cpu:0.1.0: only used with --runtime "
            "docker; add --runtime docker (runtime: docker in --config) or drop --image "
            "(image: in --config)",
        ),
    ],
)
def test_runtime_mistakes_are_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    run = tmp_path / "run"
    result = cli("up", "--engine", "sim", "--run-dir", str(run), *argv)
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert not run.exists()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("./typo", "--model ./typo: no such directory"),
        ("/no/such/model", "--model /no/such/model: no such directory"),
        ("~/no-such-model", "--model ~/no-such-model: no such directory"),
        (__file__, f"--model {__file__}: not a directory"),
    ],
)
def test_a_local_model_path_must_exist_for_processes(
    tmp_path: Path, model: str, message: str
) -> None:
    """Caught before anything starts, instead of vLLM failing to load it in a restart loop."""
    run = tmp_path / "run"
    result = cli("up", "--model", model, "--gpus", "none", "--run-dir", str(run))
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"vllm-fleet up: error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not run.exists()


@pytest.mark.parametrize(
    ("data", "environ", "cpu", "gpu"),
    [
        ({}, {}, None, None),  # unset: the Docker runtime's own defaults apply
        ({"engine": "sim"}, {}, SIM_ENGINE_IMAGE, None),
        ({"engine": "sim"}, {"VLLM_FLEET_CPU_IMAGE": "env:1"}, "env:1", None),
        ({"image": "key:2"}, {"VLLM_FLEET_CPU_IMAGE": "env:1"}, "key:2", "key:2"),
        ({"engine": "sim", "image": "key:2"}, {}, "key:2", "key:2"),
    ],
)
def test_engine_image_precedence(
    data: dict[str, str], environ: dict[str, str], cpu: str | None, gpu: str | None
) -> None:
    config = from_mapping({"runtime": "docker", **data})
    env = docker_image_environ(config, {"HOME": "/root", **environ})
    assert env.get("VLLM_FLEET_CPU_IMAGE") == cpu
    assert env.get("VLLM_FLEET_GPU_IMAGE") == gpu
    assert env["HOME"] == "/root"


def test_process_runtime_is_made_without_docker(tmp_path: Path) -> None:
    config = from_mapping({"engine": "sim"})
    runtime = make_runtime(config, RunDir(tmp_path / "run"), (), environ=NO_DOCKER)
    assert isinstance(runtime, ProcessRuntime)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_dead_fleet(run_dir: RunDir, runtime: str | None) -> None:
    """state.json of a fleet whose supervisor is gone and left nothing running."""
    state = FleetState(
        supervisor_pid=dead_pid(),
        status="ready",
        router_url="http://127.0.0.1:1",
        units=(UnitRecord(name="replica-0", role="replica", port=2, url="http://127.0.0.1:2"),),
    )
    data = json.loads(state.to_json())
    if runtime is None:
        del data["runtime"]  # written before the key existed
    else:
        data["runtime"] = runtime
    run_dir.create()
    run_dir.state_path.write_text(json.dumps(data))


@pytest.mark.parametrize("runtime", ["process", None])
def test_down_of_a_process_fleet_never_talks_to_docker(tmp_path: Path, runtime: str | None) -> None:
    run_dir = RunDir(tmp_path / "run")
    write_dead_fleet(run_dir, runtime)

    result = cli("down", "--run-dir", str(run_dir.path), env=NO_DOCKER)

    assert result.returncode == 0, result.stderr
    assert "Stopped fleet http://127.0.0.1:1/v1" in result.stdout
    assert run_dir.read_state() is None


def test_down_of_a_docker_fleet_needs_the_daemon_and_keeps_the_state(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    write_dead_fleet(run_dir, "docker")

    result = cli("down", "--run-dir", str(run_dir.path), env=NO_DOCKER)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "its fleet runs in Docker containers, but the daemon is unreachable" in lines[0]
    assert "start dockerd" in lines[0]
    state = run_dir.read_state()
    assert state is not None and state.runtime == "docker"  # kept for a retry
