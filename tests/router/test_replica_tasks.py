"""One background job per replica: bookkeeping, error logging, cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from vllm_fleet.router.replica_tasks import ReplicaTasks


async def test_one_job_per_url_forgotten_when_done() -> None:
    tasks = ReplicaTasks("job")
    release = asyncio.Event()

    async def held() -> None:
        await release.wait()

    tasks.start("http://a:1", held())
    assert tasks.busy("http://a:1") and not tasks.busy("http://b:1")
    job = asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        tasks.start("http://a:1", job)
    release.set()
    for _ in range(100):
        if not tasks.busy("http://a:1"):
            break
        await asyncio.sleep(0)
    assert len(tasks) == 0


async def test_failing_job_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def boom() -> None:
        raise RuntimeError("bug")

    tasks = ReplicaTasks("job")
    tasks.start("http://a:1", boom())
    for _ in range(100):
        if not tasks.busy("http://a:1"):
            break
        await asyncio.sleep(0)
    assert not tasks.busy("http://a:1")
    assert any("job failed url=http://a:1" in r.getMessage() for r in caplog.records)
    assert caplog.records[0].levelno == logging.ERROR


async def test_close_cancels_running_jobs() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    tasks = ReplicaTasks("job")
    tasks.start("http://a:1", forever())
    await asyncio.sleep(0)
    await tasks.close()
    assert cancelled.is_set() and len(tasks) == 0
