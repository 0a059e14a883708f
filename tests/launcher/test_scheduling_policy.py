"""fleet.yaml ``scheduling_policy: priority`` reaches every engine's command line, vLLM's and
the simulator's, through the one builder (so batch requests run behind interactive ones)."""

from __future__ import annotations

import argparse

import pytest

from vllm_fleet.launcher.config import from_mapping
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.plan_replicas import sim_replica_command, vllm_replica_command
from vllm_fleet.launcher.sim.cli import config_from_args, register
from vllm_fleet.launcher.vllm_args import RUN_BATCH_MODULE, run_batch_command, scheduling_args


def test_priority_in_fleet_yaml_reaches_the_vllm_and_sim_command_lines() -> None:
    options = from_mapping({"model": "/m", "scheduling_policy": "priority"}).to_plan_options()
    vllm = vllm_replica_command(options, 8001, 1, None, on_gpu=False)
    sim = sim_replica_command(options, 8001)
    for argv in (vllm, sim):
        at = argv.index("--scheduling-policy")
        assert argv[at + 1] == "priority" and argv.count("--scheduling-policy") == 1


def test_the_simulator_accepts_the_flag_its_builder_writes() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    options = from_mapping({"model": "m", "scheduling_policy": "priority"}).to_plan_options()
    argv = sim_replica_command(options, 8001)
    args = parser.parse_args(list(argv[argv.index("sim") :]))
    assert config_from_args(args).scheduling_policy == "priority"


def test_fcfs_is_vllms_default_and_is_not_written() -> None:
    options = from_mapping({"model": "/m"}).to_plan_options()
    assert "--scheduling-policy" not in vllm_replica_command(options, 8001, 1, None, on_gpu=False)
    assert scheduling_args("fcfs") == []


def test_extra_args_that_already_set_it_win() -> None:
    given = ("--scheduling-policy=fcfs",)
    assert scheduling_args("priority", given) == []
    assert scheduling_args("priority", ("--x",)) == ["--scheduling-policy", "priority"]


def test_an_unknown_policy_is_a_one_line_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="scheduling_policy"):
        from_mapping({"model": "/m", "scheduling_policy": "lifo"})


def test_run_batch_takes_the_servers_engine_flags_without_the_servers_own() -> None:
    options = from_mapping({"model": "/m", "scheduling_policy": "priority"}).to_plan_options()
    server = vllm_replica_command(options, 8001, 1, None, on_gpu=False)
    argv = run_batch_command(server, "in.jsonl", "out.jsonl")
    assert argv[:7] == (server[0], "-m", RUN_BATCH_MODULE, "-i", "in.jsonl", "-o", "out.jsonl")
    assert "--host" not in argv and "--port" not in argv and "8001" not in argv
    assert argv[argv.index("--model") + 1] == "/m"
    assert argv[argv.index("--scheduling-policy") + 1] == "priority"
