"""`vllm-fleet router --workers N`: N real processes on one port, one view of the fleet."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from tests.support.metrics import metric_value, parse_samples
from tests.support.ports import free_port
from tests.support.procs import ChildProcess
from tests.support.router import running_router
from tests.support.sim import REPO_ROOT, SIM_MODEL, running_sim
from vllm_fleet.launcher.runtime.process import group_members
from vllm_fleet.router.config import add_arguments, config_from_args
from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.shared_board import Board, SharedReplica
from vllm_fleet.router.state import Fleet
from vllm_fleet.router.worker import WorkerLink

pytestmark = pytest.mark.timeout(90)

START_DEADLINE_S = 30.0
GRACE_S = 3.0


async def _json(url: str) -> Any:
    """GET on a fresh connection: SO_REUSEPORT hashes each new connection to some worker."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _same_worker(url: str, *paths: str) -> list[Any]:
    """Several GETs on one connection, hence answered by one worker."""
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        out = []
        for path in paths:
            async with session.get(url + path, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                out.append(await resp.json())
        return out


async def poll(what: str, check: Callable[[], Awaitable[bool]], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while not await check():
        assert time.monotonic() < deadline, f"{what} not reached within {deadline_s}s"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def router_workers(backends: list[str], workers: int, *flags: str) -> AsyncIterator[str]:
    """The router CLI with --workers on a free port; yielded once every worker answers."""
    port = free_port()
    command = [sys.executable, "-m", "vllm_fleet.launcher.cli", "router", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(workers), "--health-interval", "0.1"]
    command += ["--scrape-interval", "0.2", "--shutdown-grace", str(GRACE_S), *flags]
    command += [f"--backend={b}" for b in backends]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryDirectory() as logs:
        child = ChildProcess(command, Path(logs) / "router.log", env=env, cwd=REPO_ROOT)
        url = f"http://127.0.0.1:{port}"
        seen: set[int] = set()

        async def all_answer() -> bool:
            assert child.alive(), child.tail(20)
            try:
                ready = await _json(f"{url}/fleet/workers")
                seen.add(ready["answered_by"])
                replicas = await _json(f"{url}/fleet/replicas")
            except (aiohttp.ClientError, AssertionError):
                return False
            return len(seen) == workers and all(r["healthy"] for r in replicas)

        try:
            await poll("every worker answering", all_answer, START_DEADLINE_S)
            yield url
        finally:
            child.stop(GRACE_S + 5)


def test_workers_flag_parses_counts_and_auto() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def workers(*argv: str) -> int:
        args = parser.parse_args(["--backend", "http://127.0.0.1:9", *argv])
        return config_from_args(args, environ={}).workers

    assert workers() == 1
    assert workers("--workers", "3") == 3
    assert workers("--workers", "auto") == len(os.sched_getaffinity(0))
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="--workers"):
            workers("--workers", bad)


def test_in_flight_and_served_are_summed_over_workers_cells() -> None:
    """Each worker adds to its own cell; every reader sees the sum (ejections: the most any
    worker made); a freed slot's counts do not leak into the next replica that takes it."""
    board = Board.create(workers=2, slots=1)
    try:
        slot = board.allocate("http://a:1")
        assert slot is not None
        board.publish(slot, {})
        links = [WorkerLink(Board.attach(board.path), i, os.getpid()) for i in range(2)]
        fleets = [Fleet(new_replica=link.new_replica) for link in links]
        for link, fleet in zip(links, fleets, strict=True):
            link.read()
            fleet.set_backends(["http://a:1"])
        a0, a1 = (f.replicas["http://a:1"] for f in fleets)
        assert isinstance(a0, SharedReplica)
        a0.in_flight += 1
        a1.in_flight += 1
        a1.in_flight += 1
        assert a0.in_flight == a1.in_flight == 3
        a1.in_flight -= 1
        a0.served += 1
        assert (a0.in_flight, a1.served) == (2, 1)
        a0.ejections += 1  # both breakers eject on the same failed checks: counted once
        a1.ejections += 1
        a1.ejections += 1  # and worker 1 once more, on requests it saw fail
        assert a0.ejections == a1.ejections == 2
        board.free(slot)
        assert board.allocate("http://b:2") is None  # a request still runs there
        a0.in_flight -= 1
        a1.in_flight -= 1
        again = board.allocate("http://b:2")
        assert again == slot  # no request left on it: reusable, counts start over
        b = SharedReplica(url="http://b:2").bind(board, slot, None)
        assert (b.in_flight, b.served, b.ejections) == (0, 0, 0)
        for link in links:
            link.board.close()
    finally:
        board.close()
    assert not Path(board.path).exists()


async def test_two_workers_serve_share_one_in_flight_view_and_merge_metrics() -> None:
    async with (
        running_sim(step_ms=20.0, max_num_seqs=64) as sim,
        router_workers([sim.url], 2) as url,
    ):
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        answer = await client.completions.create(model=SIM_MODEL, prompt="hi", max_tokens=3)
        assert answer.choices[0].text

        held = 16

        async def slow_stream() -> int:
            connector = aiohttp.TCPConnector(force_close=True)
            body = {"model": SIM_MODEL, "prompt": "hi", "max_tokens": 150, "stream": True}
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.post(f"{url}/v1/completions", json=body) as resp,
            ):
                await resp.read()
                return resp.status

        streams = [asyncio.create_task(slow_stream()) for _ in range(held)]
        views: dict[int, int] = {}

        async def both_see_all() -> bool:
            workers, replicas = await _same_worker(url, "/fleet/workers", "/fleet/replicas")
            views[workers["answered_by"]] = sum(r["in_flight"] for r in replicas)
            shares = [w["in_flight"] for w in workers["workers"]]
            return len(views) == 2 and set(views.values()) == {held} and min(shares) > 0

        try:
            await poll("both workers reporting every held request", both_see_all, 20.0)
        finally:
            statuses = await asyncio.gather(*streams)
        assert statuses == [200] * held

        workers = (await _json(f"{url}/fleet/workers"))["workers"]
        assert all(w["served"] > 0 for w in workers), workers
        assert len({w["pid"] for w in workers}) == 2
        metrics = await _metrics(url)
        total = metric_value(metrics, "vllm_fleet_requests_total", replica=sim.url, status="200")
        assert total == held + 1  # every worker's requests, from whichever worker answered
        served = sum(w["served"] for w in workers)
        assert served == held + 1

        prefix: dict[int, dict[str, Any]] = {}

        async def scrapes_shared() -> bool:
            workers, replicas = await _same_worker(url, "/fleet/workers", "/fleet/replicas")
            prefix[workers["answered_by"]] = replicas[0]["prefix_cache"]
            return len(prefix) == 2 and all(
                p["measured_hit_rate"] is not None for p in prefix.values()
            )

        # the replica's prefix-cache counters, scraped once by the supervisor, reach both
        await poll("both workers knowing the replica's prefix-cache hit rate", scrapes_shared, 20.0)
        assert prefix[0]["capacity"] == prefix[1]["capacity"]


async def test_workers_tell_each_other_the_prefixes_they_sent() -> None:
    """Each worker is its siblings' peer on a loopback port (vllm_fleet.router.workers): a
    request one worker placed reaches every other worker's prefix record, so cache-aware
    placement does not weaken with the worker count."""
    async with running_sim() as sim, router_workers([sim.url], 2) as url:
        for question in range(12):  # fresh connections: the kernel spreads them over both
            connector = aiohttp.TCPConnector(force_close=True)
            body = {
                "model": SIM_MODEL,
                "messages": [{"role": "user", "content": f"{'a shared prefix ' * 30}{question}"}],
                "max_tokens": 2,
            }
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.post(f"{url}/v1/chat/completions", json=body) as resp,
            ):
                assert resp.status == 200, await resp.text()
        rows = (await _json(f"{url}/fleet/workers"))["workers"]
        served = {w["worker"]: w["served"] for w in rows}
        assert min(served.values()) > 0, served  # both workers placed some
        views: dict[int, dict[str, Any]] = {}

        async def each_heard_the_other() -> bool:
            workers, peers = await _same_worker(url, "/fleet/workers", "/fleet/peers")
            views[workers["answered_by"]] = peers
            return len(views) == 2 and all(
                views[i]["requests_received"] == served[1 - i] for i in (0, 1)
            )

        await poll("each worker holding the other's placements", each_heard_the_other, 20.0)
        for view in views.values():
            assert len(view["peers"]) == 1 and len(view["myself"]) == 1, view
            assert view["peers"] != view["myself"]


async def test_another_routers_placements_reach_every_worker() -> None:
    """A peer router's socket reaches the one worker that accepted it; that worker relays the
    entries to its siblings, so every worker knows what the other router placed."""
    port_a = free_port()
    async with (
        running_sim() as sim,
        router_workers([sim.url], 2, f"--peer=http://127.0.0.1:{port_a}") as url,
        running_router([sim.url], port=port_a, peers=(url,)) as other,
        aiohttp.ClientSession() as session,
    ):
        sent = 5
        for question in range(sent):
            body = {
                "model": SIM_MODEL,
                "messages": [{"role": "user", "content": f"{'another router ' * 30}{question}"}],
                "max_tokens": 2,
            }
            async with session.post(f"{other.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
        heard: dict[int, int] = {}

        async def every_worker_heard() -> bool:
            workers, peers = await _same_worker(url, "/fleet/workers", "/fleet/peers")
            heard[workers["answered_by"]] = peers["requests_received"]
            return len(heard) == 2 and min(heard.values()) >= sent

        await poll("both workers holding the other router's placements", every_worker_heard, 20.0)
        assert max(heard.values()) == sent  # once each: a sibling's relay is not relayed back


async def _metrics(url: str) -> Any:
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{url}/metrics") as resp,
    ):
        return parse_samples(await resp.text())


async def test_health_checks_and_scrapes_run_once_per_fleet() -> None:
    hits: Counter[str] = Counter()

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        hits[request.path] += 1
        response: web.StreamResponse = await handler(request)
        return response

    def prepare(app: web.Application) -> None:
        app.middlewares.append(count)

    async with running_sim(prepare=prepare) as sim, router_workers([sim.url], 3):
        before = hits.copy()
        window_s = 3.0
        await asyncio.sleep(window_s)  # a measuring window, not a wait for readiness
        health = hits["/health"] - before["/health"]
        scrapes = hits["/metrics"] - before["/metrics"]
    # every 0.1 s once: ~30 checks and ~15 scrapes; three workers checking would be ~90 / 45
    assert 10 <= health <= 45, health
    assert 4 <= scrapes <= 23, scrapes


async def test_sigterm_drains_every_worker_and_leaves_no_process() -> None:
    port = free_port()
    async with running_sim(step_ms=20.0) as sim:
        command = [sys.executable, "-m", "vllm_fleet.launcher.cli", "router"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
        command += ["--backend", sim.url, "--shutdown-grace", str(GRACE_S)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with tempfile.TemporaryDirectory() as logs:
            child = ChildProcess(command, Path(logs) / "router.log", env=env, cwd=REPO_ROOT)
            url = f"http://127.0.0.1:{port}"
            try:

                async def up() -> bool:
                    try:
                        return len(await _json(f"{url}/fleet/replicas")) == 1
                    except aiohttp.ClientError:
                        return False

                await poll("router up", up, START_DEADLINE_S)
                workers = (await _json(f"{url}/fleet/workers"))["workers"]
                pids = [w["pid"] for w in workers]
                connector = aiohttp.TCPConnector(force_close=True)
                async with aiohttp.ClientSession(connector=connector) as session:
                    body = {"model": SIM_MODEL, "prompt": "x", "max_tokens": 40, "stream": True}
                    async with session.post(f"{url}/v1/completions", json=body) as resp:
                        assert resp.status == 200
                        await resp.content.readline()  # the stream is running
                        started = time.monotonic()
                        os.kill(child.pid, signal.SIGTERM)
                        rest = await resp.read()  # ~0.8 s of tokens: within the grace
                assert rest.rstrip().endswith(b"data: [DONE]")
                deadline = time.monotonic() + GRACE_S + 10
                while child.alive() or group_members(child.pid):
                    assert time.monotonic() < deadline, group_members(child.pid)
                    await asyncio.sleep(0.05)
                assert time.monotonic() - started < GRACE_S + 5
                assert child.proc.returncode == 0, child.tail(20)
                for pid in pids:
                    assert not Path(f"/proc/{pid}").exists() or _zombie(pid), pid
            finally:
                child.kill()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


async def test_a_killed_worker_is_replaced() -> None:
    async with running_sim() as sim, router_workers([sim.url], 2) as url:
        workers = (await _json(f"{url}/fleet/workers"))["workers"]
        os.kill(workers[1]["pid"], signal.SIGKILL)

        async def replaced() -> bool:
            now = (await _json(f"{url}/fleet/workers"))["workers"]
            return bool(now[1]["restarts"] == 1 and now[1]["pid"] != workers[1]["pid"])

        await poll("worker 1 restarted", replaced, 20.0)
        seen: set[int] = set()

        async def both_answer() -> bool:
            seen.add((await _json(f"{url}/fleet/workers"))["answered_by"])
            return seen == {0, 1}

        await poll("both workers answering again", both_answer, 20.0)


def test_what_does_not_fit_a_slot_is_never_cut() -> None:
    """A URL too long for a slot is not shared at all, and a model list too long for one keeps
    whole ids only: a cut one would route to a model nobody serves."""
    board = Board.create(workers=1, slots=2)
    try:
        assert board.allocate("http://" + "a" * 300 + ":1") is None
        slot = board.allocate("http://a:1")
        assert slot is not None
        models = frozenset(f"model-{i:04d}" for i in range(400))
        board.publish(slot, {}, models=models)
        view = board.read(slot)
        assert view is not None and view.url == "http://a:1"
        assert 0 < len(view.models) < len(models) and view.models <= models
    finally:
        board.close()


def test_a_port_in_use_is_one_line_before_any_worker_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "vllm_fleet.launcher.cli", "router", "--workers", "2"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--backend", "http://127.0.0.1:9"]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "worker started" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "--port" in line]
    assert f"127.0.0.1:{port}" in error
