"""The CPU engine settings: thread split between replicas, env and argv (run for real in e2e)."""

from __future__ import annotations

import pytest

from launcher.vllm_cpu import (
    SERVER_MODULE,
    cpu_engine_env,
    cpu_server_args,
    cpu_server_command,
    threads_per_replica,
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
    assert env["HF_HUB_OFFLINE"] == "1"


def test_env_online_leaves_the_hub_reachable() -> None:
    assert "HF_HUB_OFFLINE" not in cpu_engine_env(cpus=4, offline=False)


def test_server_args_are_eager_and_name_the_model() -> None:
    args = cpu_server_args("/m", 8001, served_model_name="tiny", max_model_len=512, max_num_seqs=8)
    assert "--enforce-eager" in args
    assert args[args.index("--model") + 1] == "/m"
    assert args[args.index("--port") + 1] == "8001"
    assert args[args.index("--served-model-name") + 1] == "tiny"
    assert args[args.index("--max-model-len") + 1] == "512"
    assert args[args.index("--max-num-seqs") + 1] == "8"
    assert args[args.index("--dtype") + 1] == "float32"
    assert "--disable-uvicorn-access-log" in args
    assert "--disable-uvicorn-access-log" not in cpu_server_args("/m", 1, access_log=True)


def test_command_runs_the_server_module_with_the_given_python() -> None:
    command = cpu_server_command(["--port", "1"], python="/venv/bin/python")
    assert command == ["/venv/bin/python", "-m", SERVER_MODULE, "--port", "1"]
