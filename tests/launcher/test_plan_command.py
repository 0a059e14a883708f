"""`vllm-fleet plan` end to end through vllm_fleet.launcher.cli.main (text, --json, one-line
errors)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from vllm_fleet.launcher.cli import main
from vllm_fleet.launcher.commands.plan import add_plan_arguments, options_from_args

MODELS = Path(__file__).parent / "models"
LLAMA_70B = str(MODELS / "Llama-3.1-70B")


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Sizing must never reach for the network or the user's real HF cache in tests."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def test_text_output_explains_the_layout(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["plan", "--model", LLAMA_70B, "--gpus", "8x80GB"])

    out = capsys.readouterr().out
    assert status == 0
    assert "GPUs: 8x 80GB, declared" in out
    assert "Llama-3.1-70B: 70.6B parameters, bfloat16, 131.4 GiB of weights" in out
    assert "KV cache: 320 KiB per token" in out
    assert "TP2: 65.7 + 2.0 + 20.0 = 87.7 GiB of 72.0 GiB  does not fit" in out
    assert "TP4: 32.9 + 2.0 + 10.0 = 44.9 GiB of 72.0 GiB  fits  <- chosen" in out
    assert "Plan: 2 replicas x TP4, max_model_len 131072" in out
    assert "replica-0  GPUs 0,1,2,3  port 8001" in out
    assert "replica-1  GPUs 4,5,6,7  port 8002" in out
    assert "Leftover GPUs: none" in out
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3 " in out


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", LLAMA_70B, "--gpus", "8x80GB", "--json", "--base-port", "9000"]

    status = main(argv)

    data = json.loads(capsys.readouterr().out)
    assert status == 0
    assert data["tensor_parallel_size"] == 4
    assert data["model_bytes"] == 141_107_412_992
    assert data["kv_bytes_per_token"] == 327680
    assert [r["name"] for r in data["replicas"]] == ["replica-0", "replica-1"]
    assert [r["gpus"] for r in data["replicas"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [r["port"] for r in data["replicas"]] == [9000, 9001]
    assert data["replicas"][1]["command"][1:] == [
        "-m", "vllm.entrypoints.openai.api_server", "--model", LLAMA_70B,
        "--host", "127.0.0.1", "--port", "9001", "--tensor-parallel-size", "4",
        "--max-model-len", "131072", "--gpu-memory-utilization", "0.9",
        "--kv-events-config",
        '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:10001",'
        '"replay_endpoint":"tcp://*:11001"}',
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    assert data["replicas"][1]["env"] == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert data["leftover_gpus"] == []
    assert data["inventory"]["source"] == "declared"
    assert [c["fits"] for c in data["fit_checks"]] == [False, False, True, True]


def test_params_without_any_files(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["plan", "--model", "org/some-70b", "--params", "70B", "--dtype", "bf16",
                   "--gpus", "8x80GB", "--json"])  # fmt: skip

    data = json.loads(capsys.readouterr().out)
    assert status == 0
    assert data["model_bytes"] == 140_000_000_000
    assert data["tensor_parallel_size"] == 4
    assert "--dtype" in data["replicas"][0]["command"]
    assert "bfloat16" in data["replicas"][0]["command"]


def test_cpu_plan(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["plan", "--model", str(MODELS / "Llama-3.1-8B"), "--gpus", "none",
                   "--replicas", "2"])  # fmt: skip

    out = capsys.readouterr().out
    assert status == 0
    assert "GPUs: none" in out
    assert "Plan: 2 replicas x TP1 on CPU, max_model_len 8192" in out
    assert "no GPU found: using vLLM's CPU engine" in out
    assert "VLLM_CPU_KVCACHE_SPACE=1" in out


def test_mixed_tp_sizes_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    model = str(MODELS / "Mixtral-8x7B-v0.1")

    status = main(["plan", "--model", model, "--gpus", "4xA100-80GB+4xA100-40GB"])

    out = capsys.readouterr().out
    assert status == 0
    assert "Plan: 3 replicas (2x TP2 + 1x TP4), max_model_len 32768" in out
    assert "replica-2  GPUs 4,5,6,7  port 8003  TP4" in out
    assert "A100-40GB TP2: 43.5 + 2.0 + 2.0 = 47.5 GiB of 36.0 GiB  does not fit" in out


def test_cpu_plan_of_an_unsizable_model_still_plans(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["plan", "--model", "org/not-cached", "--gpus", "none", "--json"])

    data = json.loads(capsys.readouterr().out)
    assert status == 0
    assert data["model"] is None
    assert len(data["replicas"]) == 1


def test_sim_engine(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["plan", "--model", "fake", "--engine", "sim", "--gpus", "2xL4", "--json"])

    data = json.loads(capsys.readouterr().out)
    assert status == 0
    assert data["engine"] == "sim"
    assert [r["command"][2:5] for r in data["replicas"]] == [
        ["vllm_fleet.launcher.cli", "sim", "--host"]
    ] * 2


def test_reduced_context_note(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["plan", "--model", str(MODELS / "Llama-3.1-8B"), "--gpus", "1x24GB"])

    out = capsys.readouterr().out
    assert status == 0
    assert "max_model_len reduced from 131072 to 37888" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--gpus", "8x80GB"], "--model is required"),
        (["--model", LLAMA_70B, "--gpus", "8xBogus"], "unknown GPU 'Bogus'"),
        (["--model", LLAMA_70B, "--gpus", "8x80GB", "--max-model-len", "lots"],
         "--max-model-len 'lots' is not a whole number"),
        (["--model", LLAMA_70B, "--gpus", "8x80GB", "--gpu-memory-utilization", "x"],
         "--gpu-memory-utilization 'x' is not a number"),
        (["--model", LLAMA_70B, "--gpus", "8x80GB", "--gpu-memory-utilization", "2"],
         "must be in (0, 1]"),
        (["--model", LLAMA_70B, "--gpus", "8x80GB", "--engine", "tgi"], "--engine 'tgi'"),
        (["--model", LLAMA_70B, "--gpus", "8x80GB", "--dtype", "int3"], "--dtype 'int3'"),
        (["--model", LLAMA_70B, "--gpus", "8x80GB", "--tensor-parallel-size", "3"],
         "--tensor-parallel-size 3 must divide the model's 64 attention heads"),
        (["--model", LLAMA_70B, "--gpus", "8x80GB", "--params", "big"], "--params 'big'"),
        (["--model", "org/not-cached", "--gpus", "8x80GB"], "--params 70B --dtype bf16"),
        (["--model", str(MODELS / "Llama-3.1-405B"), "--gpus", "8x80GB"],
         "does not fit on 8x 80GB"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    status = main(["plan", *argv])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("vllm-fleet plan: error: ")
    assert needle in lines[0]


def test_405b_error_names_the_numbers_and_multi_node(capsys: pytest.CaptureFixture[str]) -> None:
    main(["plan", "--model", str(MODELS / "Llama-3.1-405B"), "--gpus", "8x80GB"])

    err = capsys.readouterr().err
    assert "94.5 GiB weights" in err
    assert "72.0 GiB usable" in err
    # The whole command, rendered through Helm by tests/helm/test_plan_hint.py.
    assert (
        "--set engine.multiNode.enabled=true --set engine.multiNode.pipelineParallelSize=2" in err
    )


def test_shared_arguments_for_other_commands() -> None:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args(["--model", LLAMA_70B, "--gpus", "4xH200", "--engine-arg=--foo"])

    options, inventory, model = options_from_args(args, python="/py")

    assert options.python == "/py"
    assert options.extra_args == ("--foo",)
    assert options.gpu_memory_utilization == 0.9
    assert options.base_port == 8001
    assert len(inventory.gpus) == 4
    assert model is not None and model.weight_bytes == 141_107_412_992
