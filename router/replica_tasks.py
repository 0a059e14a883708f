"""At most one background job per replica, so a slow replica never holds back the others.

The health and scrape loops tick every interval and start a job for each replica that has none
running. Waiting for a whole round instead would let one hanging replica stretch every round to
its timeout, delaying failure detection (and fresh gauges) for the whole fleet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("vllm_fleet.router")


class ReplicaTasks:
    """Running jobs keyed by replica URL; close() cancels and awaits them all."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def busy(self, url: str) -> bool:
        return url in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, url: str, job: Coroutine[Any, Any, None]) -> None:
        """Run ``job`` for ``url`` in the background; the caller checks busy() first."""
        if url in self._tasks:
            job.close()
            raise RuntimeError(f"{self._what} already running for {url}")
        task = asyncio.create_task(self._guard(url, job), name=f"{self._what} {url}")
        self._tasks[url] = task
        task.add_done_callback(lambda t: self._forget(url, t))

    async def _guard(self, url: str, job: Coroutine[Any, Any, None]) -> None:
        try:
            await job
        except Exception:  # a bug in one job must not go unnoticed nor stop the loop
            log.exception("%s failed url=%s", self._what, url)

    def _forget(self, url: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(url) is task:
            del self._tasks[url]

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
