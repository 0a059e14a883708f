"""Helpers of the launcher tests: how long the event loop was held (the test of "nothing blocks
it"), and a started process's group id."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from vllm_fleet.launcher.runtime.base import ServerHandle

#: the ticker's period; a lag is how much later than this it woke up.
TICK_S = 0.01


class LoopLag:
    """``async with LoopLag() as lag: ...`` then ``lag.max_s``: the longest the loop went
    without running a 10 ms ticker. A blocking call of N seconds in the block shows as >= N;
    awaited work (threads, asyncio sleeps, sockets) leaves it near the tick."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(TICK_S)
            self.max_s = max(self.max_s, loop.time() - before - TICK_S)
            self.ticks += 1

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def pgid(handle: ServerHandle) -> int:
    """The process group of a server the process runtime started (containers have none)."""
    assert handle.pgid is not None, f"{handle.spec.name} is {handle.describe()}"
    return handle.pgid
