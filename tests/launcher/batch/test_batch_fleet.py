"""Batches against the simulator fleet: injected 500s and 429s, a replica killed mid-run, the
batch process itself stopped (SIGTERM) and killed (SIGKILL) mid-run and resumed, bad lines.
In every case each custom_id ends with exactly one result line."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from tests.launcher.batch.support import (
    answered_once,
    batch_child,
    line_count,
    read_results,
    write_batch,
)
from tests.support.router import running_recorder, running_router
from tests.support.sim import running_sim, running_sims, wait_until
from vllm_fleet.launcher.batch import BatchOptions, run_batch_async
from vllm_fleet.launcher.batch.runner import PRIORITY_HEADER

#: Bound on any single batch run of these tests.
RUN_DEADLINE_S = 120.0


class RateLimit:
    """A `prepare` hook: the simulator answers every `every`-th POST with 429 (rate limited),
    as a vLLM behind a rate-limiting gateway would."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.posts = 0
        self.sent = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and request.path.startswith("/v1/"):
            self.posts += 1
            if self.posts % self.every == 0:
                self.sent += 1
                return web.json_response(
                    {"error": {"message": "slow down", "type": "rate_limit_error", "code": 429}},
                    status=429,
                    headers={"Retry-After": "0"},
                )
        return await handler(request)

    def prepare(self, app: web.Application) -> None:
        app.middlewares.append(self.middleware)


def options(tmp_path: Path, endpoint: str, **overrides: object) -> BatchOptions:
    values: dict[str, object] = {
        "input": tmp_path / "in.jsonl",
        "output": tmp_path / "out.jsonl",
        "endpoint": endpoint,
        "quiet": True,
        "backoff_s": 0.05,
        "backoff_max_s": 0.5,
        **overrides,
    }
    return BatchOptions(**values)  # type: ignore[arg-type]


async def test_500s_and_429s_are_retried_until_every_line_succeeds(tmp_path: Path) -> None:
    limiter = RateLimit(every=5)
    ids = write_batch(tmp_path / "in.jsonl", 150, max_tokens=8)
    async with running_sim(prepare=limiter.prepare, max_num_seqs=8) as sim:
        await sim.control(fail_rate=0.2)
        # an attempt fails with p = 0.2 + 0.8 * 0.2 = 0.36; 16 attempts all fail with p < 1e-7
        run = options(tmp_path, f"{sim.url}/v1", max_attempts=16)
        summary = await asyncio.wait_for(
            run_batch_async(run, handle_signals=False),
            RUN_DEADLINE_S,
        )
        failed_500 = sim.stats().failed
    statuses = answered_once(read_results(tmp_path / "out.jsonl"), ids)
    assert statuses == {"200": 150}
    assert limiter.sent > 10 and failed_500 > 10
    assert summary.retries >= limiter.sent + failed_500
    assert summary.succeeded == 150 and not summary.interrupted


async def test_a_final_failure_is_one_error_line_in_the_errors_file(tmp_path: Path) -> None:
    ids = write_batch(tmp_path / "in.jsonl", 5)
    async with running_recorder() as recorder:
        recorder.status = 503
        recorder.body = b'{"error": {"message": "down"}}'
        summary = await run_batch_async(
            options(tmp_path, recorder.url, errors=tmp_path / "err.jsonl", max_attempts=2),
            handle_signals=False,
        )
        sent = [r for r in recorder.requests if r.method == "POST"]
    assert summary.failed == 5 and summary.retries == 5 and len(sent) == 10
    assert not (tmp_path / "out.jsonl").read_text()
    records = read_results(tmp_path / "err.jsonl")
    assert answered_once(records, ids) == {"503": 5}
    assert records[0]["response"]["body"] == {"error": {"message": "down"}}
    # batch traffic is marked: the header and vLLM's priority field (larger = later)
    assert all(r.headers.get(PRIORITY_HEADER) == "batch" for r in sent)
    assert all(json.loads(r.body)["priority"] == 10 for r in sent)


async def test_a_replica_killed_mid_batch_behind_the_router(tmp_path: Path) -> None:
    ids = write_batch(tmp_path / "in.jsonl", 400, max_tokens=16)
    async with (
        running_sims(3, max_num_seqs=8) as sims,
        running_router([s.url for s in sims]) as router,
    ):
        await sims[1].control(fail_rate=0.2)
        run = asyncio.create_task(
            run_batch_async(options(tmp_path, router.url), handle_signals=False)
        )
        await wait_until(
            lambda: line_count(tmp_path / "out.jsonl") >= 1 or run.done(), 30.0, what="results"
        )
        await wait_until(lambda: sims[2].stats().finished >= 30, 30.0, what="sim 2 serving")
        await sims[2].stop()
        summary = await asyncio.wait_for(run, RUN_DEADLINE_S)
    statuses = answered_once(read_results(tmp_path / "out.jsonl"), ids)
    assert statuses == {"200": 400}, statuses
    assert summary.succeeded == 400


async def _run_until(child: subprocess.Popen[bytes], output: Path, lines: int, what: str) -> None:
    await wait_until(
        lambda: line_count(output) >= lines or child.poll() is not None, RUN_DEADLINE_S, what=what
    )
    assert child.poll() is None, f"the batch ended before {what}"


async def _wait_exit(child: subprocess.Popen[bytes]) -> int:
    await wait_until(lambda: child.poll() is not None, 30.0, what="the batch process to exit")
    code = child.returncode
    assert code is not None
    return code


async def test_sigterm_and_kill_9_mid_run_then_resume_answers_each_id_once(
    tmp_path: Path,
) -> None:
    ids = write_batch(tmp_path / "in.jsonl", 600, max_tokens=24)
    out, log = tmp_path / "out.jsonl", tmp_path / "batch.log"
    async with (
        running_sims(2, max_num_seqs=8) as sims,
        running_router([s.url for s in sims]) as router,
    ):
        args = [str(tmp_path / "in.jsonl"), "-o", str(out), "--endpoint", router.url, "--json"]
        first = batch_child(args, log)
        await _run_until(first, out, 60, "60 results")
        first.send_signal(signal.SIGTERM)
        assert await _wait_exit(first) == 130
        after_term = read_results(out)  # whole lines only: a clean stop tears nothing
        assert 60 <= len(after_term) < 600

        second = batch_child(args, log)
        await _run_until(second, out, len(after_term) + 100, "100 more results")
        second.kill()  # SIGKILL: no handler runs
        assert await _wait_exit(second) == -signal.SIGKILL
        with out.open("ab") as handle:  # what a write cut by the kill leaves
            handle.write(b'{"id": "batch_req_torn", "custom_id": "req-0000001", "respo')

        third = batch_child(args, log)
        assert await _wait_exit(third) == 0, log.read_text()[-2000:]
    summary = json.loads(log.read_text().strip().splitlines()[-1])
    assert summary["skipped"] >= len(after_term) + 100 - 1
    assert answered_once(read_results(out), ids) == {"200": 600}


async def test_bad_lines_become_error_lines_and_a_rerun_adds_nothing(tmp_path: Path) -> None:
    good = write_batch(tmp_path / "good.jsonl", 3)
    lines = (tmp_path / "good.jsonl").read_text().splitlines()
    bad = [
        "{oops",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
        lines[0],  # duplicate custom_id
        json.dumps({"custom_id": "s", "url": "/v1/chat/completions", "body": {"stream": True}}),
        json.dumps({"custom_id": "u", "url": "/v1/chat/completion", "body": {}}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([lines[0], bad[0], lines[1], *bad[1:], lines[2]]) + "\n")
    out, log = tmp_path / "out.jsonl", tmp_path / "batch.log"
    async with running_sim() as sim:
        args = [str(source), "-o", str(out), "--endpoint", sim.url]
        assert await _wait_exit(batch_child(args, log)) == 1  # input errors: status 1
        first = read_results(out)
        assert await _wait_exit(batch_child(args, log)) == 0  # nothing left to do
    assert read_results(out) == first  # the rerun wrote nothing
    assert answered_once(first, good) == {"200": 3}
    errors = sorted(r["error"]["line"] for r in first if r["custom_id"] is None)
    assert errors == [2, 4, 5, 6, 7]
    messages = " ".join(r["error"]["message"] for r in first if r["custom_id"] is None)
    for expected in ("line 2: not JSON", "custom_id is missing", "repeats an earlier line",
                     "body.stream is true", "not a known route"):  # fmt: skip
        assert expected in messages


def test_cli_refuses_bad_flags_with_one_line(tmp_path: Path) -> None:
    from vllm_fleet.launcher.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text("hello\n")
    cases: dict[str, Callable[[], int]] = {
        "--max-inflight": lambda: main(
            ["batch", str(source), "-o", "o", "--endpoint", "http://x", "--max-inflight", "0"]
        ),
        "plain mode needs --model": lambda: main(
            ["batch", str(source), "-o", "o", "--endpoint", "http://x", "--field", "t"]
        ),
        "INPUT": lambda: main(["batch", "missing.jsonl", "-o", "o", "--endpoint", "http://x"]),
    }
    for _, call in cases.items():
        assert call() == 2
