"""`vllm-fleet up --detach`, `status`, `down` with two real vLLM CPU replicas of the tiny model.

The launcher runs under the interpreter that has vLLM (it starts replicas with its own
``sys.executable``), so that interpreter must have vllm-fleet installed too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.support import (
    MODEL,
    STOP_TIMEOUT_S,
    VLLM_READY_DEADLINE_S,
    chat_many,
    http_get,
    wait_until,
)
from tests.support.ports import free_port, free_port_run
from vllm_fleet.launcher.commands.demo import DEMO_DTYPE, DEMO_MAX_MODEL_LEN
from vllm_fleet.launcher.runtime.process import group_members, process_alive, stop_process_group
from vllm_fleet.launcher.vllm_args import OFFLINE_ENV

pytestmark = pytest.mark.e2e

REPLICAS = 2


@dataclass
class Fleet:
    python: str
    run_dir: Path
    router_url: str
    up_output: str

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.python, "-m", "vllm_fleet.launcher.cli", *args, "--run-dir", str(self.run_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def replicas(self) -> list[dict[str, Any]]:
        return [u for u in self.status()["units"] if u["role"] == "replica"]

    def recorded_pids(self) -> list[int]:
        state = json.loads((self.run_dir / "state.json").read_text())
        return [u["pgid"] for u in state["units"] if u["pgid"] is not None]


def _fleet_config(model: Path, run_dir: Path) -> dict[str, Any]:
    return {
        "model": str(model),
        "served_model_name": MODEL,
        "engine": "vllm",
        "gpus": "none",
        "replicas": REPLICAS,
        # The demo's settings (vllm_fleet.launcher.commands.demo.tiny_cpu_options); the engine flags
        # and the CPU engine's environment come from the planner, as for any user's fleet.yaml.
        "dtype": DEMO_DTYPE,
        "max_model_len": DEMO_MAX_MODEL_LEN,
        "base_port": free_port_run(REPLICAS),
        "env": dict(OFFLINE_ENV),
        "router": {"port": free_port()},
        "run_dir": str(run_dir),
        "health_interval_s": 0.5,
        "health_timeout_s": VLLM_READY_DEADLINE_S,
        "stop_timeout_s": STOP_TIMEOUT_S,
    }


@pytest.fixture(scope="module")
def fleet(
    vllm_interpreter: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    config = _fleet_config(tiny_model, root / "run")
    config_file = root / "fleet.yaml"
    config_file.write_text(yaml.safe_dump(config))
    up = subprocess.run(
        [
            vllm_interpreter,
            "-m",
            "vllm_fleet.launcher.cli",
            "up",
            "--config",
            str(config_file),
            "--detach",
        ],
        capture_output=True,
        text=True,
        timeout=VLLM_READY_DEADLINE_S + 60,
        check=False,
    )
    fleet = Fleet(
        vllm_interpreter, root / "run", f"http://127.0.0.1:{config['router']['port']}", up.stdout
    )
    try:
        if up.returncode != 0:
            pytest.fail(
                f"vllm-fleet up exited {up.returncode}:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}",
                pytrace=False,
            )
        yield fleet
    finally:
        _tear_down(fleet)


def _tear_down(fleet: Fleet) -> None:
    """`down`, then kill whatever it left (a failed test must not leak engines)."""
    if not (fleet.run_dir / "state.json").exists():
        return
    pids = fleet.recorded_pids()
    fleet.cli("down", timeout=STOP_TIMEOUT_S * 4)
    for pid in pids:
        if group_members(pid):
            stop_process_group(pid, STOP_TIMEOUT_S)


def test_up_plans_cpu_replicas_with_the_fast_start_flags(fleet: Fleet) -> None:
    assert f"Plan: {REPLICAS} replicas x TP1 on CPU" in fleet.up_output
    assert "--enforce-eager" in fleet.up_output
    assert "Fleet ready" in fleet.up_output


def test_status_shows_every_replica_healthy(fleet: Fleet) -> None:
    status = fleet.status()
    assert status["status"] == "ready"
    assert [u["state"] for u in fleet.replicas()] == ["healthy"] * REPLICAS


async def _chat_many(router_url: str, count: int) -> list[str]:
    return [r.choices[0].finish_reason for r in await chat_many(router_url, count, 24)]


async def test_requests_through_the_fleet_reach_every_replica(fleet: Fleet) -> None:
    assert await _chat_many(fleet.router_url, 12) == ["length"] * 12
    served = [u["load"]["served"] for u in fleet.replicas()]
    assert sum(served) >= 12
    assert all(n > 0 for n in served), f"a replica got nothing: {served}"


async def test_killed_replica_is_restarted_while_the_other_serves(fleet: Fleet) -> None:
    victim = fleet.replicas()[0]
    os.killpg(victim["pgid"], signal.SIGKILL)
    # the router fails over to the survivor at once; nobody waits for the restart.
    assert await _chat_many(fleet.router_url, 4) == ["length"] * 4

    def restarted() -> bool:
        unit = next(u for u in fleet.replicas() if u["name"] == victim["name"])
        return bool(
            unit["state"] == "healthy" and unit["restarts"] == 1 and unit["pgid"] != victim["pgid"]
        )

    wait_until(restarted, VLLM_READY_DEADLINE_S, f"{victim['name']} restarted and healthy")
    assert not group_members(victim["pgid"]), "the killed replica left processes behind"
    assert await _chat_many(fleet.router_url, 4) == ["length"] * 4


def test_down_stops_every_process(fleet: Fleet) -> None:
    pids = fleet.recorded_pids()
    assert len(pids) == REPLICAS + 1  # replicas and the router
    done = fleet.cli("down", timeout=STOP_TIMEOUT_S * 4)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p for p in pids if process_alive(p) or group_members(p)] == []
    with pytest.raises(OSError):
        http_get(fleet.router_url + "/health", timeout=2.0)
