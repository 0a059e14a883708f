"""A fleet of two models started by `vllm-fleet up --config`: one real vLLM CPU replica of the
tiny model serving a tiny LoRA adapter (vllm_fleet.launcher.tiny_lora) from the start, and one
simulated model, both answering through one router. With runtime LoRA updating on, the router's
`POST /fleet/lora` loads and unloads a second adapter on the real engine.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import NotFoundError, OpenAI

from tests.e2e.support import MODEL, STOP_TIMEOUT_S, VLLM_READY_DEADLINE_S
from tests.support.ports import free_port, free_port_run
from vllm_fleet.launcher.commands.demo import DEMO_DTYPE, DEMO_MAX_MODEL_LEN
from vllm_fleet.launcher.runtime.process import group_members, process_alive, stop_process_group
from vllm_fleet.launcher.tiny_lora import build_tiny_lora
from vllm_fleet.launcher.vllm_args import OFFLINE_ENV

pytestmark = pytest.mark.e2e

ADAPTER = "tiny-sql"
SIM_MODEL = "sim-chat"


@dataclass
class ModelsFleet:
    python: str
    run_dir: Path
    router_url: str
    adapter: Path
    up_output: str

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.python, "-m", "vllm_fleet.launcher.cli", *args, "--run-dir", str(self.run_dir)],
            capture_output=True, text=True, timeout=STOP_TIMEOUT_S * 4, check=False,
        )  # fmt: skip

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.router_url}/v1", api_key="x", max_retries=0, timeout=120)

    def pgids(self) -> list[int]:
        state = json.loads((self.run_dir / "state.json").read_text())
        return [u["pgid"] for u in state["units"] if u["pgid"] is not None]


@pytest.fixture(scope="module")
def fleet(
    vllm_interpreter: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelsFleet]:
    root = tmp_path_factory.mktemp("models-fleet")
    adapter = build_tiny_lora(root / "tiny-lora", tiny_model)
    router_port = free_port()
    config = {
        "gpus": "none",
        "dtype": DEMO_DTYPE,
        "max_model_len": DEMO_MAX_MODEL_LEN,
        "base_port": free_port_run(2),
        "env": dict(OFFLINE_ENV),
        "router": {"port": router_port},
        "run_dir": str(root / "run"),
        "health_interval_s": 0.5,
        "health_timeout_s": VLLM_READY_DEADLINE_S,
        "stop_timeout_s": STOP_TIMEOUT_S,
        "models": [
            {
                "model": str(tiny_model),
                "served_model_name": MODEL,
                "lora_modules": {ADAPTER: str(adapter)},
                "env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
            },
            {"model": SIM_MODEL, "engine": "sim", "extra_args": ["--step-ms", "1"]},
        ],
    }
    config_file = root / "fleet.yaml"
    config_file.write_text(yaml.safe_dump(config))
    up = subprocess.run(
        [vllm_interpreter, "-m", "vllm_fleet.launcher.cli", "up", "--config", str(config_file),
         "--detach"],
        capture_output=True, text=True, timeout=VLLM_READY_DEADLINE_S + 60, check=False,
    )  # fmt: skip
    handle = ModelsFleet(
        vllm_interpreter, root / "run", f"http://127.0.0.1:{router_port}", adapter, up.stdout
    )
    try:
        if up.returncode != 0:
            pytest.fail(
                f"vllm-fleet up exited {up.returncode}:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}",
                pytrace=False,
            )
        yield handle
    finally:
        if (handle.run_dir / "state.json").exists():
            pgids = handle.pgids()
            handle.cli("down")
            for pgid in pgids:
                if group_members(pgid):
                    stop_process_group(pgid, STOP_TIMEOUT_S)


def chat(client: OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4
    )
    assert reply.model == model
    return reply.choices[0].finish_reason


def fleet_lora(fleet: ModelsFleet, body: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{fleet.router_url}/fleet/lora", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_both_models_and_the_adapter_answer_through_one_router(fleet: ModelsFleet) -> None:
    assert "Plan: 2 replicas of 2 models" in fleet.up_output
    assert f"--enable-lora --lora-modules {ADAPTER}={fleet.adapter}" in fleet.up_output
    client = fleet.client()
    assert {m.id for m in client.models.list()} == {MODEL, ADAPTER, SIM_MODEL}
    for model in (MODEL, ADAPTER, SIM_MODEL):
        assert chat(client, model) in ("length", "stop")
    status = fleet.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    models = json.loads(status.stdout)["models"]
    assert models == {MODEL: ["tiny-llama-0"], SIM_MODEL: ["sim-chat-0"]}


def test_fleet_lora_loads_and_unloads_on_real_vllm(fleet: ModelsFleet) -> None:
    load = {"action": "load", "lora_name": "tiny-math", "lora_path": str(fleet.adapter),
            "model": MODEL}  # fmt: skip
    status, answer = fleet_lora(fleet, load)
    assert status == 200 and answer["ok"] is True, answer
    assert [r["status"] for r in answer["replicas"]] == [200]
    client = fleet.client()
    assert chat(client, "tiny-math") in ("length", "stop")
    status, answer = fleet_lora(fleet, {"action": "unload", "lora_name": "tiny-math",
                                        "model": MODEL})  # fmt: skip
    assert status == 200 and answer["ok"] is True, answer
    with pytest.raises(NotFoundError):
        chat(client, "tiny-math")


def test_down_stops_every_models_replicas(fleet: ModelsFleet) -> None:
    pgids = fleet.pgids()
    assert len(pgids) == 3  # two replicas and the router
    done = fleet.cli("down")
    assert done.returncode == 0, done.stderr
    assert all(not process_alive(p) and group_members(p) == [] for p in pgids)
