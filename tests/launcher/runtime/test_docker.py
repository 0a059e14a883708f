"""The Docker runtime: the spec-to-container translation (pure), then real containers.

The real-container tests run the vllm-fleet simulator inside the router image (it carries the
whole vllm-fleet package), so they take seconds; the vLLM engine image is exercised by
tests/compose/test_up_docker.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import docker
import docker.errors
import pytest

from tests.compose.support import ROUTER_IMAGE, docker_client, require_images
from tests.support.ports import free_port
from vllm_fleet.launcher.config import RestartConfig
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.plan_types import ReplicaSpec, RouterSpec
from vllm_fleet.launcher.runtime.base import ServerHandle, ServerStatus
from vllm_fleet.launcher.runtime.docker import (
    DEFAULT_CPU_IMAGE,
    DEFAULT_GPU_IMAGE,
    LABEL_FLEET,
    LABEL_REPLICA,
    DockerRuntime,
    DockerRuntimeError,
    DockerSettings,
    SplitRuntime,
    container_config,
    fleet_containers,
    fleet_name_for,
    remove_fleet_containers,
)
from vllm_fleet.launcher.runtime.process import ProcessRuntime
from vllm_fleet.launcher.supervisor import Supervisor, SupervisorSettings, UnitState, units_for

T = TypeVar("T")

VLLM = ("/opt/venv/bin/python3.11", "-m", "vllm.entrypoints.openai.api_server")


def vllm_spec(gpus: tuple[int, ...] = (), *extra: str, **env: str) -> ReplicaSpec:
    return ReplicaSpec(
        name="replica-0",
        host="127.0.0.1",
        port=8001,
        model="/models/m",
        gpus=gpus,
        tensor_parallel_size=max(1, len(gpus)),
        command=(*VLLM, "--model", "/models/m", "--host", "127.0.0.1", "--port", "8001", *extra),
        env=dict(env),
    )


SETTINGS = DockerSettings(fleet="test")


# --------------------------------------------------------------------------- translation


def test_gpu_replica_gets_exactly_its_gpus_and_the_gpu_image() -> None:
    config = container_config(vllm_spec((2, 3), CUDA_VISIBLE_DEVICES="2,3"), SETTINGS)
    assert config.image == DEFAULT_GPU_IMAGE
    assert config.device_ids == ("2", "3")
    # inside the container the two GPUs are 0 and 1: the host numbering must not leak in.
    assert "CUDA_VISIBLE_DEVICES" not in config.environment
    (request,) = config.create_kwargs()["device_requests"]
    assert request["Driver"] == "nvidia"
    assert request["DeviceIDs"] == ["2", "3"]
    assert request["Capabilities"] == [["gpu"]]


def test_cpu_replica_has_no_device_request_and_the_cpu_image() -> None:
    config = container_config(vllm_spec(), SETTINGS)
    assert config.image == DEFAULT_CPU_IMAGE
    assert "device_requests" not in config.create_kwargs()


def test_server_listens_on_all_container_interfaces_and_is_published_on_the_planned_host() -> None:
    config = container_config(vllm_spec(), SETTINGS)
    argv = list(config.entrypoint)
    assert argv[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "8001"
    assert config.ports == {"8001/tcp": ("127.0.0.1", 8001)}

    spec = ReplicaSpec(
        name="r",
        host="10.0.0.5",
        port=9000,
        model="m",
        command=("python", "-m", "x", "--host=10.0.0.5", "--port=9000", "--hostname", "10.0.0.5"),
    )
    config = container_config(spec, SETTINGS)
    # only the spec's own --host pair is rewritten; nothing else is parsed or touched
    assert config.entrypoint[3:] == ("--host=0.0.0.0", "--port=9000", "--hostname", "10.0.0.5")
    assert config.ports == {"9000/tcp": ("10.0.0.5", 9000)}
    # a replica publishing KV events: that port and its replay port too, for the router
    events = dataclasses.replace(spec, kv_events_port=10000)
    assert container_config(events, SETTINGS).ports == {
        "9000/tcp": ("10.0.0.5", 9000),
        "10000/tcp": ("10.0.0.5", 10000),
        "11000/tcp": ("10.0.0.5", 11000),
    }


def test_labels_and_name_identify_fleet_and_replica() -> None:
    config = container_config(vllm_spec(), SETTINGS)
    assert config.labels == {LABEL_FLEET: "test", LABEL_REPLICA: "replica-0"}
    assert config.name == "vllm-fleet-test-replica-0"
    kwargs = config.create_kwargs()
    assert kwargs["restart_policy"] == {"Name": "no"}  # the supervisor restarts, not Docker
    assert kwargs["init"] is True


def test_local_model_directory_is_mounted_read_only_at_the_same_path() -> None:
    config = container_config(vllm_spec(), SETTINGS, is_dir=lambda p: p == "/models/m")
    assert config.binds == (("/models/m", "/models/m", True),)
    assert "/models/m:/models/m:ro" in config.create_kwargs()["volumes"]
    hub = container_config(vllm_spec(), SETTINGS, is_dir=lambda p: False)
    assert hub.binds == ()


def test_the_mount_comes_from_the_specs_model_not_from_its_command_line() -> None:
    spec = ReplicaSpec(
        name="replica-0",
        host="127.0.0.1",
        port=8001,
        model="/models/m",
        command=("python3", "-m", "server", "--model=/elsewhere"),
    )
    config = container_config(spec, SETTINGS, is_dir=lambda p: True)
    assert config.binds == (("/models/m", "/models/m", True),)
    assert config.entrypoint[-1] == "--model=/elsewhere"  # never rewritten


def test_environment_is_the_specs_plus_the_hugging_face_token_only() -> None:
    host = {"HF_TOKEN": "hf_x", "PATH": "/host/bin", "HOME": "/root"}
    config = container_config(vllm_spec((), VLLM_CPU_KVCACHE_SPACE="1"), SETTINGS, host_env=host)
    assert config.environment == {
        "PYTHONUNBUFFERED": "1",
        "HF_TOKEN": "hf_x",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


@pytest.mark.parametrize("fleet", ["", "has space", "-leading", "a/b"])
def test_bad_fleet_name_is_a_config_error(fleet: str) -> None:
    with pytest.raises(ConfigError, match="fleet"):
        container_config(vllm_spec(), DockerSettings(fleet=fleet))


def test_fleet_name_is_stable_per_run_dir_and_differs_between_dirs(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / ".fleet", tmp_path / "b" / ".fleet"
    assert fleet_name_for(a) == fleet_name_for(a)
    assert fleet_name_for(a) != fleet_name_for(b)
    assert fleet_name_for(a).startswith("a-")


# --------------------------------------------------------------------------- real containers


@pytest.fixture(scope="module")
def client() -> docker.DockerClient:
    client = docker_client()
    require_images(client, ROUTER_IMAGE)
    return client


@pytest.fixture
def fleet(client: docker.DockerClient) -> Iterator[str]:
    """A fleet name of its own per test; whatever the test leaves is removed."""
    name = f"t{time.monotonic_ns() % 10**9}"
    yield name
    remove_fleet_containers(name, client=client, timeout=1)


def sim_spec(name: str, port: int) -> ReplicaSpec:
    command = (sys.executable, "-m", "vllm_fleet.launcher.cli", "sim", "--host", "127.0.0.1",
               "--port", str(port), "--model", "sim-model")  # fmt: skip
    return ReplicaSpec(name=name, host="127.0.0.1", port=port, model="sim-model", command=command)


def script_spec(name: str, code: str) -> ReplicaSpec:
    return ReplicaSpec(
        name=name, host="127.0.0.1", port=free_port(), model="m", command=("python3", "-c", code)
    )


async def apoll(
    probe: Callable[[], Awaitable[T | None]], what: str, deadline_s: float, interval_s: float = 0.2
) -> T:
    """``poll`` for the runtime's coroutines: await ``probe`` until it returns a value."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = await probe()
        if result is not None and result is not False and result != "":
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:g}s waiting for {what}")
        await asyncio.sleep(interval_s)


def make_runtime(client: docker.DockerClient, fleet: str, tmp_path: Path) -> DockerRuntime:
    settings = DockerSettings(fleet=fleet, cpu_image=ROUTER_IMAGE, shm_size="64m")
    return DockerRuntime(settings, tmp_path / "logs", client=client)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def test_replica_serves_on_its_planned_port_and_stop_removes_it(
    client: docker.DockerClient, fleet: str, tmp_path: Path
) -> None:
    runtime = make_runtime(client, fleet, tmp_path)
    spec = sim_spec("replica-0", free_port())
    handle = await runtime.start(spec)
    (container,) = fleet_containers(client, fleet)
    assert (handle.pgid, handle.container) == (None, container.name)
    assert container.labels[LABEL_REPLICA] == "replica-0"
    assert (await runtime.status(handle)).running
    await apoll(lambda: asyncio.to_thread(healthy, spec.url), f"the simulator at {spec.url}", 30)
    await apoll(lambda: runtime.last_log_line(handle), "a log line", 10)

    status = await runtime.stop(handle, timeout=5)
    assert not status.running
    assert fleet_containers(client, fleet) == []
    assert not healthy(spec.url)
    log = handle.log_path.read_text()
    assert "docker container vllm-fleet-" in log.splitlines()[0]
    assert len(log.splitlines()) > 2, "the container's output was not kept in the log file"


async def test_exit_is_reported_with_its_status_and_output(
    client: docker.DockerClient, fleet: str, tmp_path: Path
) -> None:
    runtime = make_runtime(client, fleet, tmp_path)
    handle = await runtime.start(script_spec("crasher", "import sys; print('bye'); sys.exit(3)"))

    async def exited() -> ServerStatus | None:
        status = await runtime.status(handle)
        return None if status.running else status

    status = await apoll(exited, "the container to exit", 30)
    assert status.returncode == 3
    assert await runtime.last_log_line(handle) == "bye"
    await runtime.stop(handle, timeout=1)
    assert "bye" in handle.log_path.read_text()


async def test_stale_container_of_the_same_fleet_is_replaced(
    client: docker.DockerClient, fleet: str, tmp_path: Path
) -> None:
    sleeper = "import time; time.sleep(600)"
    first = make_runtime(client, fleet, tmp_path)
    await first.start(script_spec("replica-0", sleeper))
    (stale,) = fleet_containers(client, fleet)
    # a new supervisor (after a crash of the old one) starts the same replica again
    second = make_runtime(client, fleet, tmp_path)
    handle = await second.start(script_spec("replica-0", sleeper))
    (container,) = fleet_containers(client, fleet)
    assert container.name == handle.container
    assert container.id != stale.id
    await second.stop(handle, timeout=1)


async def test_container_of_another_owner_is_never_touched(
    client: docker.DockerClient, fleet: str, tmp_path: Path
) -> None:
    foreign = client.containers.create(
        ROUTER_IMAGE, name=f"vllm-fleet-{fleet}-replica-0", entrypoint=["true"]
    )
    try:
        runtime = make_runtime(client, fleet, tmp_path)
        with pytest.raises(DockerRuntimeError, match="does not belong to fleet"):
            await runtime.start(script_spec("replica-0", "pass"))
        foreign.reload()  # still there
    finally:
        foreign.remove(force=True)


async def test_remove_fleet_containers_removes_exactly_that_fleet(
    client: docker.DockerClient, fleet: str, tmp_path: Path
) -> None:
    other = f"{fleet}-other"
    sleeper = "import time; time.sleep(600)"
    mine = make_runtime(client, fleet, tmp_path)
    theirs = make_runtime(client, other, tmp_path / "other")
    await mine.start(script_spec("replica-0", sleeper))
    await mine.start(script_spec("replica-1", sleeper))
    kept = await theirs.start(script_spec("replica-0", sleeper))
    try:
        removed = remove_fleet_containers(fleet, client=client, timeout=1)
        assert sorted(removed) == [f"vllm-fleet-{fleet}-replica-0", f"vllm-fleet-{fleet}-replica-1"]
        assert fleet_containers(client, fleet) == []
        assert len(fleet_containers(client, other)) == 1
    finally:
        await theirs.stop(kept, timeout=1)


async def test_missing_image_is_named_with_the_fix(
    client: docker.DockerClient, fleet: str, tmp_path: Path
) -> None:
    settings = DockerSettings(fleet=fleet, cpu_image="vllm-fleet-missing:0")
    runtime = DockerRuntime(settings, tmp_path, client=client)
    spec = script_spec("replica-0", "pass")
    with pytest.raises(ConfigError, match=r"vllm-fleet-missing:0 not found.*build-images\.sh"):
        runtime.check_images([spec])
    with pytest.raises(DockerRuntimeError, match="not found"):
        await runtime.start(spec)
    assert fleet_containers(client, fleet) == []


async def test_split_runtime_keeps_the_router_on_the_host(
    client: docker.DockerClient, fleet: str, tmp_path: Path
) -> None:
    split = SplitRuntime(make_runtime(client, fleet, tmp_path), ProcessRuntime(tmp_path / "host"))
    router = RouterSpec(
        name="router",
        host="127.0.0.1",
        port=free_port(),
        command=(sys.executable, "-c", "pass"),
        backends_file="unused",
    )
    host_handle = await split.start(router)
    container_handle = await split.start(script_spec("replica-0", "import time; time.sleep(600)"))
    try:
        assert [c.labels[LABEL_REPLICA] for c in fleet_containers(client, fleet)] == ["replica-0"]
        assert host_handle.log_path.parent == tmp_path / "host"
    finally:
        await split.stop(host_handle, timeout=1)
        await split.stop(container_handle, timeout=1)
    assert fleet_containers(client, fleet) == []


async def test_supervisor_restarts_a_crashed_container(
    client: docker.DockerClient, fleet: str, tmp_path: Path
) -> None:
    runtime = make_runtime(client, fleet, tmp_path)
    spec = sim_spec("replica-0", free_port())
    settings = SupervisorSettings(
        health_timeout_s=60,
        health_interval_s=0.2,
        stop_timeout_s=2,
        restart=RestartConfig(max_restarts=3, backoff_initial_s=0.1, backoff_max_s=0.5),
    )
    published: list[list[str]] = []
    supervisor = Supervisor(
        runtime, units_for([spec], None), settings, on_backends=published.append
    )
    async with supervisor:
        await asyncio.wait_for(supervisor.wait_settled(), 60)
        assert supervisor.states() == {"replica-0": UnitState.HEALTHY}
        (container,) = fleet_containers(client, fleet)
        first_pid = int(container.attrs["State"]["Pid"])

        # crash: the container's init dies (as after an OOM kill); Docker must not restart it
        # (restart policy "no"), the supervisor does, with the same port.
        os.kill(first_pid, signal.SIGKILL)

        def restarted() -> bool:
            records = {r.name: r for r in supervisor.records()}
            r = records["replica-0"]
            return r.restarts == 1 and r.state == "healthy" and r.container == container.name

        deadline = time.monotonic() + 60
        while not restarted():
            assert time.monotonic() < deadline, f"not restarted: {supervisor.records()}"
            await asyncio.sleep(0.1)
        assert [spec.url] in published
        assert len(fleet_containers(client, fleet)) == 1
        assert await asyncio.to_thread(healthy, spec.url)
    assert fleet_containers(client, fleet) == []


async def test_handle_of_an_unknown_container_is_not_running(
    client: docker.DockerClient, fleet: str, tmp_path: Path
) -> None:
    runtime = make_runtime(client, fleet, tmp_path)
    handle = ServerHandle(
        sim_spec("ghost", 1), container="ghost", log_path=tmp_path / "ghost.log", started_at=0
    )
    assert not (await runtime.status(handle)).running
    assert not (await runtime.stop(handle, timeout=1)).running
