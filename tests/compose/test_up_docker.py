"""`vllm-fleet up` with the Docker runtime: two vLLM CPU engine containers and the router.

`up` has no --runtime flag yet (see docs/docker.md), so this drives `FleetRun`, the engine of
`up` (plan, supervisor, state file, backends file, router, readiness), with its runtime swapped
for the one `up --runtime docker` is to use: ``docker_fleet_runtime``. Once the flag exists the
swap becomes the flag.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from launcher.config import FleetConfig, RestartConfig, RouterConfig
from launcher.fleet import FleetRun
from launcher.plan import Inventory
from launcher.planner import plan
from launcher.rundir import FleetState, RunDir
from launcher.runtime.docker import (
    DEFAULT_CPU_IMAGE,
    LABEL_REPLICA,
    docker_fleet_runtime,
    fleet_containers,
    fleet_name_for,
    remove_fleet_containers,
)
from launcher.vllm_cpu import cpu_engine_env
from tests.compose.support import (
    ENGINE_READY_S,
    TINY_MODEL,
    docker_client,
    free_port,
    get_json,
    poll,
    require_images,
)
from tests.e2e.support import free_port_run

pytestmark = pytest.mark.e2e


@dataclass
class Observed:
    """What the check saw while the fleet was ready (asserted after it stopped)."""

    replicas: list[str] = field(default_factory=list)
    running: bool = False
    images: set[str] = field(default_factory=set)
    answer: str = ""
    stream_chunks: int = 0
    router_urls: list[str] = field(default_factory=list)


def fleet_config(run_dir: Path) -> FleetConfig:
    return FleetConfig(
        model="/models/tiny",  # baked into the engine image, not a host path
        served_model_name=TINY_MODEL,
        dtype="float32",
        max_model_len=1024,
        extra_args=("--enforce-eager", "--disable-uvicorn-access-log"),
        env=cpu_engine_env(replicas=2, cpus=2),
        replicas=2,
        base_port=free_port_run(2),
        router=RouterConfig(port=free_port()),
        run_dir=str(run_dir),
        health_timeout_s=ENGINE_READY_S,
        health_interval_s=0.5,
        stop_timeout_s=10,
        restart=RestartConfig(max_restarts=1, backoff_initial_s=1, backoff_max_s=2),
    )


def test_up_with_the_docker_runtime_runs_labelled_containers_and_leaves_none(
    tmp_path: Path,
) -> None:
    client = docker_client()
    require_images(client, DEFAULT_CPU_IMAGE)
    run_dir = RunDir(tmp_path / ".fleet")
    config = fleet_config(run_dir.path)
    # what `up` plans on a machine without GPUs
    replicas = plan(Inventory(gpus=(), source="none"), None, config.to_plan_options()).replicas
    fleet = fleet_name_for(run_dir.path)
    seen = Observed()

    async def check(state: FleetState) -> int:
        containers = fleet_containers(client, fleet)
        seen.replicas = sorted(c.labels[LABEL_REPLICA] for c in containers)
        seen.running = all(c.status == "running" for c in containers)
        seen.images = {c.image.tags[0] for c in containers}
        openai = AsyncOpenAI(base_url=state.endpoint, api_key="unused", max_retries=0, timeout=60)
        try:
            reply = await openai.chat.completions.create(
                model=TINY_MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=8,
                extra_body={"ignore_eos": True},
            )
            stream = await openai.completions.create(
                model=TINY_MODEL,
                prompt="Once",
                max_tokens=8,
                stream=True,
                # random weights: without this the first token may well be EOS
                extra_body={"ignore_eos": True},
            )
            seen.stream_chunks = len([chunk async for chunk in stream])
        finally:
            await openai.close()
        seen.answer = reply.choices[0].message.content or ""

        # both replicas were healthy when `up` reported ready; the router re-reads the
        # backends file on its own clock, so give it a moment to list the second one too.
        def router_lists_both() -> list[str] | None:
            rows = get_json(f"{state.router_url}/fleet/replicas")
            urls = sorted(str(row["url"]) for row in rows if row["healthy"])
            return urls if len(urls) == 2 else None

        seen.router_urls = await asyncio.to_thread(
            poll, router_lists_both, "the router to list both containers", 15
        )
        return 0

    out = io.StringIO()
    run = FleetRun(config, replicas, run_dir, out=out, after_ready=check, handle_signals=False)
    runtime = docker_fleet_runtime(run_dir.path, run_dir.logs_dir, client=client)
    try:
        run.supervisor.runtime = runtime
        status = asyncio.run(run.run())
    finally:
        leftover = remove_fleet_containers(fleet, client=client, timeout=1)
    assert status == 0, out.getvalue()
    assert seen.replicas == ["replica-0", "replica-1"], out.getvalue()
    assert seen.running
    assert seen.images == {DEFAULT_CPU_IMAGE}
    assert seen.answer
    assert seen.stream_chunks >= 2
    assert seen.router_urls == [spec.url for spec in replicas]
    # the fleet's own shutdown (what `down` triggers) removed every container it labelled
    assert leftover == [], f"containers left behind: {leftover}"
    assert fleet_containers(client, fleet) == []
    # the replicas' output survives in the run directory's logs
    log = (run_dir.logs_dir / "replica-0.log").read_text()
    assert "vllm.entrypoints.openai.api_server" in log.splitlines()[0]
    assert "Application startup complete" in log
