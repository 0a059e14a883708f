"""The memory bound: a 1,000,000-line batch stays under 300 MB RSS.

Sending a million requests takes minutes even to a server that answers at once (the client
and the server share two cores at ~2-3k requests/s), too long for CI. The test therefore runs
the case that holds the most in memory without sending them all: a 1,000,000-line input that
an earlier run left 990,000 results for. The batch process reads all 990,000 results back
into its id set, streams and validates all 1,000,000 input lines (every id is hashed and
checked), and sends the last 10,000 to a fake endpoint that answers instantly. The process's
peak RSS (VmHWM from /proc, polled while it runs) must stay under the bound. ~30-60 s.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from tests.launcher.batch.support import batch_child, line_count

LINES = 1_000_000
ALREADY_DONE = 990_000
RSS_BOUND_MB = 300
DEADLINE_S = 240.0

_ANSWER = json.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [{"index": 0, "text": " ok", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()


@asynccontextmanager
async def instant_endpoint() -> AsyncIterator[str]:
    """An OpenAI-compatible endpoint that answers every POST at once (no engine)."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=_ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/completions", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def write_files(source: Path, output: Path) -> None:
    body = '"method":"POST","url":"/v1/completions","body":{"model":"m","prompt":"p"}}\n'
    done = '","response":{"status_code":200,"request_id":null,"body":{}},"error":null}\n'
    with source.open("w") as inp, output.open("w") as out:
        for n in range(LINES):
            inp.write(f'{{"custom_id":"request-{n:07d}",{body}')
            if n < ALREADY_DONE:
                out.write(f'{{"id":"batch_req_{n}","custom_id":"request-{n:07d}{done}')


def peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for row in status.splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) / 1024
    return None


async def test_a_million_line_batch_stays_under_300_mb(tmp_path: Path) -> None:
    source, output, log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "batch.log"
    await asyncio.to_thread(write_files, source, output)
    async with instant_endpoint() as url:
        child = batch_child([str(source), "-o", str(output), "--endpoint", url, "--json"], log)
        peak = 0.0
        deadline = time.monotonic() + DEADLINE_S
        while child.poll() is None:
            assert time.monotonic() < deadline, "the batch did not finish in time"
            peak = max(peak, peak_rss_mb(child.pid) or 0.0)
            await asyncio.sleep(0.1)
    assert child.returncode == 0, log.read_text()[-2000:]
    summary = json.loads(log.read_text().strip().splitlines()[-1])
    assert summary["skipped"] == ALREADY_DONE and summary["succeeded"] == LINES - ALREADY_DONE
    assert line_count(output) == LINES
    print(f"peak RSS {peak:.0f} MB for {LINES} lines ({summary['duration_s']} s in the batch)")
    assert 0 < peak < RSS_BOUND_MB
