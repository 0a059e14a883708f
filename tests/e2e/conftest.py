"""Fixtures for the end-to-end tests: the tiny model (built once per session) and real vLLM CPU
replicas plus a router subprocess over them.

Replicas are module-scoped, not session-scoped: each test module starts what it needs and
stops it when done, so two modules never keep ~3 GB of engines alive at once on a small CI box.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import (
    ROUTER_READY_DEADLINE_S,
    VLLM_READY_DEADLINE_S,
    Server,
    get_json,
    start_router,
    start_vllm_replicas,
    stop_all,
    vllm_python,
    wait_ready,
    wait_until,
)
from vllm_fleet.launcher.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def vllm_interpreter() -> str:
    return vllm_python()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def vllm_pair(
    vllm_interpreter: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    """Two tiny-model vLLM CPU replicas, started together and healthy."""
    servers = start_vllm_replicas(2, tiny_model, vllm_interpreter, tmp_path_factory.mktemp("logs"))
    try:
        wait_ready(servers, "/health", VLLM_READY_DEADLINE_S)
        for s in servers:
            print(f"{s.name} healthy after {s.ready_after_s:.1f}s", file=sys.stderr)
        yield servers
    finally:
        stop_all(servers)


@pytest.fixture(scope="module")
def router(vllm_pair: list[Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`vllm-fleet router` over the pair, once it sees both replicas healthy."""
    server = start_router([s.url for s in vllm_pair], tmp_path_factory.mktemp("router-logs"))
    try:
        wait_ready([server], "/ready", ROUTER_READY_DEADLINE_S)
        wait_until(
            lambda: sum(r["healthy"] for r in get_json(server.url + "/fleet/replicas")) == 2,
            ROUTER_READY_DEADLINE_S,
            "both replicas healthy in the router",
        )
        yield server
    finally:
        stop_all([server])
