"""fleet.yaml's ``router.workers`` reaches the router's command line (`vllm-fleet up`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_fleet.launcher.commands.compose import Images, router_service
from vllm_fleet.launcher.config import load_config
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.fleet import router_spec


def _config(tmp_path: Path, workers: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(f"engine: sim\nrouter:\n  workers: {workers}\n")
    return path


@pytest.mark.parametrize("workers", ["2", "auto"])
def test_router_workers_reach_the_router_command(tmp_path: Path, workers: str) -> None:
    spec = router_spec(load_config(_config(tmp_path, workers)), tmp_path / "backends.yaml")
    at = spec.command.index("--workers")
    assert spec.command[at + 1] == workers


def test_one_worker_adds_no_flag(tmp_path: Path) -> None:
    spec = router_spec(load_config(_config(tmp_path, "1")), tmp_path / "backends.yaml")
    assert "--workers" not in spec.command


@pytest.mark.parametrize("workers", ["0", "lots"])
def test_bad_router_workers_is_one_line_naming_the_key(tmp_path: Path, workers: str) -> None:
    with pytest.raises(ConfigError, match=r"router\.workers: .*") as caught:
        load_config(_config(tmp_path, workers))
    assert "\n" not in str(caught.value)


def test_generated_compose_passes_router_workers(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, "3"))
    service = router_service([], config, Images(gpu="g:1", cpu="c:1", router="r:1"))
    assert service["environment"]["FLEET_WORKERS"] == "3"
