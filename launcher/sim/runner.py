"""Drives the engine in real time: one ticking asyncio loop per server, tokens handed to handlers.

One loop for the whole server (not a sleep per request or per token) keeps the CPU cost per
token flat as concurrency grows and makes timing a property of the batch, as in vLLM. The loop
awaits an event while nothing runs, so an idle simulator costs nothing.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from vllm_fleet.launcher.sim.config import SimKnobs
from vllm_fleet.launcher.sim.engine import Sequence, SimEngine, TokenEvent
from vllm_fleet.launcher.sim.kvcache import CacheEvent
from vllm_fleet.launcher.sim.metrics import SimMetrics

#: Lateness (seconds) the cadence absorbs by catching up; a longer stall restarts it.
#: Several timer ticks, far below any simulated step people configure (5-50 ms).
STALL_S = 0.005


class EventSink(Protocol):
    """Where the block events of each step go
    (`vllm_fleet.launcher.sim.kv_events.KvEventPublisher`)."""

    def publish(self, events: Seq[CacheEvent]) -> None: ...


@dataclass
class Generation:
    """A handler's view of one request: its engine sequence and the tokens as they arrive."""

    seq: Sequence
    #: Streaming requests get every token; others only the last one (saves a wake-up per token).
    stream: bool
    queue: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)

    async def tokens(self) -> AsyncIterator[TokenEvent]:
        """Yield token events until the last one (finished=True)."""
        while True:
            event = await self.queue.get()
            yield event
            if event.finished:
                return

    async def finished(self) -> TokenEvent:
        """Wait for the last token."""
        async for event in self.tokens():
            if event.finished:
                return event
        raise RuntimeError("token stream ended without a finished event")


class SimRunner:
    """Owns the engine's clock and the hand-off queues; `run()` is the app's background loop."""

    def __init__(
        self,
        engine: SimEngine,
        metrics: SimMetrics,
        knobs: SimKnobs,
        publisher: EventSink | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.knobs = knobs
        self.publisher = publisher
        self._wake = asyncio.Event()
        self._unhung = asyncio.Event()
        self._unhung.set()
        self._generations: dict[str, Generation] = {}
        self._ids = itertools.count(1)
        #: Handlers currently held by `hang` (lets tests see a request arrive at a hung server).
        self.held = 0

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def knobs_changed(self) -> None:
        """Apply a new `hang` value: stall or release the loop and the held handlers."""
        if self.knobs.hang:
            self._unhung.clear()
        else:
            self._unhung.set()

    async def wait_while_hung(self) -> None:
        if self._unhung.is_set():
            return
        self.held += 1
        try:
            await self._unhung.wait()
        finally:
            self.held -= 1

    def next_request_id(self) -> str:
        return f"sim-{next(self._ids)}"

    @asynccontextmanager
    async def generate(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        *,
        stream: bool,
        prompt_token_ids: Seq[int] | None = None,
        text_offset: int = 0,
        priority: int = 0,
    ) -> AsyncIterator[Generation]:
        """Queue a request; leaving the block early (cancel, write error) aborts it at once.

        ValueError (before anything is queued) when the request can never fit the KV cache.
        """
        seq = self.engine.add(
            request_id,
            prompt_tokens,
            max_tokens,
            self.now(),
            prompt_token_ids=prompt_token_ids,
            text_offset=text_offset,
            priority=priority,
        )
        generation = Generation(seq, stream)
        self._generations[request_id] = generation
        self._wake.set()
        try:
            yield generation
        finally:
            del self._generations[request_id]
            aborted = self.engine.abort(request_id, self.now())
            if aborted is not None:
                self.metrics.record_finished(aborted)

    def publish_kv_events(self) -> None:
        """Send the block events of the last scheduling decision (vLLM sends them per step)."""
        events = self.engine.pool.take_events()
        if events and self.publisher is not None:
            self.publisher.publish(events)

    async def run(self) -> None:
        """The ticking loop: one engine step per iteration, idle while there is no work.

        Steps are scheduled on a fixed cadence (each one ends `duration` after the previous
        one's end), so timer lateness and token hand-off time do not slow the simulated GPU
        down. The event loop's timers fire in whole milliseconds, so a step shorter than that
        always ends late; those steps catch up (the next ones do not sleep) and keep their
        average rate. Only after a real stall, longer than a step and than `STALL_S`, does
        the cadence restart from now instead of bursting to catch up.
        """
        engine = self.engine
        cadence: float | None = None
        while True:
            if not engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                cadence = None
            await self._unhung.wait()
            now = self.now()
            plan = engine.begin_step(now, self.knobs.speed)
            self.publish_kv_events()
            if cadence is None or now - cadence > max(plan.duration, STALL_S):
                cadence = now
            cadence += plan.duration
            try:
                await asyncio.sleep(max(0.0, cadence - self.now()))
            finally:
                events = engine.end_step(self.now())
            self.metrics.record_step(plan, events)
            generations = self._generations
            for event in events:
                generation = generations.get(event.seq.request_id)
                if generation is not None and (generation.stream or event.finished):
                    generation.queue.put_nowait(event)
