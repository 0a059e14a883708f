"""Graceful shutdown of a real `vllm-fleet router` process on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO

import aiohttp
import openai
import pytest

from tests.support.ports import free_port
from tests.support.sim import REPO_ROOT, SIM_MODEL, running_sim

pytestmark = pytest.mark.timeout(60)

START_DEADLINE_S = 15.0


@dataclass
class RouterProcess:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    async def wait_exit(self, deadline_s: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        while self.process.poll() is None:
            assert loop.time() < deadline, f"router still running after {deadline_s}s"
            await asyncio.sleep(0.02)
        return self.process.returncode


@asynccontextmanager
async def router_process(*flags: str) -> AsyncIterator[RouterProcess]:
    """`python -m vllm_fleet.launcher.cli router ...` on a free port, ready (a healthy replica)
    on entry."""
    port = free_port()
    command = [sys.executable, "-m", "vllm_fleet.launcher.cli", "router", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--health-interval", "0.1", *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
        handle = RouterProcess(f"http://127.0.0.1:{port}", port, process, log)
        try:
            await _wait_ready(handle)
            yield handle
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


async def _wait_ready(handle: RouterProcess) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_DEADLINE_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while True:
            if handle.process.poll() is not None:
                raise AssertionError(f"router exited early: {handle.output()[-2000:]}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(f"{handle.url}/ready") as resp:
                    if resp.status == 200:
                        return
            assert loop.time() < deadline, f"router not ready: {handle.output()[-2000:]}"
            await asyncio.sleep(0.05)


async def refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        # A connect that races the listener's close is reset rather than refused.
        return True
    writer.close()
    return False


async def test_sigterm_lets_a_running_stream_finish_and_refuses_new_connections() -> None:
    async with (
        running_sim(step_ms=40.0) as sim,
        router_process("--backend", sim.url, "--shutdown-grace", "10") as router,
    ):
        client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0)
        async with client:
            stream = await client.completions.create(
                model=SIM_MODEL, prompt="x", max_tokens=30, stream=True
            )
            chunks = stream.__aiter__()
            first = await chunks.__anext__()
            router.process.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 2.0
            while not await refuses_connections(router.port):
                assert loop.time() < deadline, "router still accepts connections"
                await asyncio.sleep(0.02)
            assert sim.running == 1  # the stream is still being generated
            rest = [c async for c in chunks]
        assert len([first, *rest]) == 30
        assert rest[-1].choices[0].finish_reason == "length"
        assert await router.wait_exit(5.0) == 0
        assert sim.stats().finished == 1
        output = router.output()
        assert "draining" in output and "router stopped" in output


async def test_the_grace_period_bounds_the_wait() -> None:
    async with (
        running_sim(step_ms=40.0) as sim,
        router_process(
            "--backend", sim.url, "--shutdown-grace", "0.5", "--log-format", "json"
        ) as router,
    ):
        client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0)
        async with client:
            stream = await client.completions.create(
                model=SIM_MODEL, prompt="x", max_tokens=2000, stream=True
            )
            chunks = stream.__aiter__()
            await chunks.__anext__()
            router.process.send_signal(signal.SIGTERM)
            assert await router.wait_exit(5.0) == 0
            with contextlib.suppress(openai.APIError, Exception):
                async with asyncio.timeout(5):
                    async for _ in chunks:
                        pass
        async with asyncio.timeout(5):
            while sim.stats().aborted != 1:
                await asyncio.sleep(0.02)
        assert sim.stats().finished == 0
        lines = [json.loads(line) for line in router.output().splitlines() if line.strip()]
        (access,) = [entry for entry in lines if entry["logger"] == "vllm_fleet.access"]
        assert access["status"] == 499  # cut by the end of the grace period
        assert access["replica"] == sim.url


def test_a_port_in_use_is_one_line_naming_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "vllm_fleet.launcher.cli", "router", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--backend", "http://127.0.0.1:9"]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "--port" in line]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], result.stderr
