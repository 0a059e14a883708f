"""The batch engine: read, send through the fleet, retry, write, resume.

One asyncio loop does everything: it reads the input lazily, keeps up to the adaptive limit
(`vllm_fleet.launcher.batch.limit`) of requests in flight over one ``aiohttp.ClientSession``,
retries 429 / 5xx / connection errors / timeouts with exponential backoff and full jitter (tenacity,
honouring ``Retry-After``), writes each final result once (`vllm_fleet.launcher.batch.output`) and
syncs the files every second. Why this gives "never loses or repeats work":

- a result line is written only when its request is final, in one write, and never changed;
- before sending, the id is checked against the ids earlier runs wrote (``ResumeState``) and
  the ids this run took; a request still in flight when the process stops has no line, so the
  next run sends it again;
- SIGINT / SIGTERM stop sending, give the requests in flight `BatchOptions.stop_grace_s` to
  finish (a second signal cuts that short), drop the rest and fsync; ``kill -9`` loses at most
  the last second of results (sent again next time) and perhaps tears the last line, which the
  next run drops.

Every request carries vLLM's ``priority`` (larger = later; vLLM honours it when the engine runs
``--scheduling-policy priority`` and ignores it otherwise) and the ``X-Fleet-Priority: batch``
header, so a router can tell batch traffic from interactive traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from vllm_fleet.launcher.batch import fleet_probe
from vllm_fleet.launcher.batch.input import (
    BatchRequest,
    InputError,
    PlainOptions,
    count_lines,
    duplicate_error,
    loads,
    read_input,
)
from vllm_fleet.launcher.batch.limit import AdaptiveLimit, LimitSettings, initial_limit
from vllm_fleet.launcher.batch.output import IdSet, ResultWriter, result_record, scan_results
from vllm_fleet.launcher.batch.progress import BatchStats, BatchSummary, Progress, summarize

#: The header that marks batch traffic for a router (its cost policy can keep interactive
#: requests ahead of it).
PRIORITY_HEADER = "X-Fleet-Priority"
PRIORITY_HEADER_VALUE = "batch"
#: vLLM's request priority for batch requests: lower values are scheduled first, 0 is the
#: default of every interactive request, so batch requests go after them.
DEFAULT_PRIORITY = 10
#: Statuses worth another attempt: rate limited, and the server-side failures a retry on the
#: same or another replica can cure.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Statuses that mean "too much load": the limit shrinks on them.
OVERLOAD_STATUSES = frozenset({429, 503})
#: How often the engines' queue is looked at for the adaptive limit.
QUEUE_POLL_S = 0.5
#: How often the loop syncs files, updates the limit and redraws progress.
TICK_S = 0.2


@dataclass(frozen=True)
class BatchOptions:
    """Everything a batch run needs (the CLI's flags; `run_batch`'s arguments)."""

    input: Path
    output: Path
    endpoint: str
    errors: Path | None = None
    #: None: adaptive (``--max-inflight auto``).
    max_inflight: int | None = None
    plain: PlainOptions | None = None
    priority: int = DEFAULT_PRIORITY
    api_key: str | None = None
    max_attempts: int = 8
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    limit_settings: LimitSettings = field(default_factory=LimitSettings)
    quiet: bool = False
    #: After a stop request, seconds the requests in flight get to finish (their work is kept).
    stop_grace_s: float = 5.0


class Retryable(Exception):
    """An attempt that may succeed if repeated; ``status`` None for transport failures."""

    def __init__(
        self, message: str, status: int | None = None, body: Any = None, retry_after: float = 0.0
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.retry_after = retry_after
        self.code = "http_error" if status is not None else "connection_error"


def base_url(endpoint: str) -> str:
    """The server root: input lines carry ``/v1/...`` routes themselves."""
    base = endpoint.rstrip("/")
    return base.removesuffix("/v1")


def _retry_after(headers: Any) -> float:
    try:
        return max(0.0, min(60.0, float(headers.get("Retry-After", "0"))))
    except ValueError:
        return 0.0


def _decode(raw: bytes) -> Any:
    try:
        return loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


class BatchRun:
    """One run of one batch; `run()` returns the summary."""

    def __init__(self, options: BatchOptions) -> None:
        self.options = options
        self.base = base_url(options.endpoint)
        self.stats = BatchStats()
        self.stop_requested = asyncio.Event()
        self._stop_now = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started_ids = IdSet()
        self._headers = {PRIORITY_HEADER: PRIORITY_HEADER_VALUE}
        if options.api_key:
            self._headers["Authorization"] = f"Bearer {options.api_key}"
        self.limiter: AdaptiveLimit | None = None
        self._kind = "other"

    def request_stop(self) -> None:
        """First call: send nothing more, let what is in flight finish within the grace.
        Second call: drop what is in flight now."""
        if self.stop_requested.is_set():
            self._stop_now.set()
        self.stop_requested.set()

    # -- one request -----------------------------------------------------------------------

    def _body(self, request: BatchRequest) -> dict[str, Any]:
        if self.options.priority == 0 or "priority" in request.body:
            return request.body
        return {**request.body, "priority": self.options.priority}

    async def _attempt(
        self, session: aiohttp.ClientSession, request: BatchRequest
    ) -> tuple[int, str | None, Any, float]:
        """One attempt: (status, request id, body, its own seconds) or Retryable."""
        started = time.monotonic()
        try:
            async with session.post(
                f"{self.base}{request.url}", json=self._body(request), headers=self._headers
            ) as response:
                raw = await response.read()
                status = response.status
                request_id = response.headers.get("X-Request-Id")
                retry_after = _retry_after(response.headers)
        except aiohttp.ClientConnectorError as exc:
            if self.limiter is not None:
                self.limiter.on_overload()
            raise Retryable(f"cannot connect: {exc}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Retryable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        body = _decode(raw)
        if status in OVERLOAD_STATUSES and self.limiter is not None:
            self.limiter.on_overload()
        if status in RETRY_STATUSES:
            raise Retryable(f"HTTP {status}", status, body, retry_after)
        if request_id is None and isinstance(body, dict) and isinstance(body.get("id"), str):
            request_id = body["id"]
        return status, request_id, body, time.monotonic() - started

    def _wait(self, state: RetryCallState) -> float:
        jitter = wait_random_exponential(
            multiplier=self.options.backoff_s, max=self.options.backoff_max_s
        )(state)
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        floor = exc.retry_after if isinstance(exc, Retryable) else 0.0
        return max(jitter, floor)

    def _count_retry(self, state: RetryCallState) -> None:
        self.stats.retries += 1

    async def _send(
        self, session: aiohttp.ClientSession, writer: ResultWriter, request: BatchRequest
    ) -> None:
        started = time.monotonic()
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Retryable),
            wait=self._wait,
            stop=stop_after_attempt(self.options.max_attempts),
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    status, request_id, body, last = await self._attempt(session, request)
        except Retryable as final:
            latency = time.monotonic() - started
            if final.status is not None:
                record = result_record(request.custom_id, status_code=final.status, body=final.body)
            else:
                record = result_record(request.custom_id, error_code=final.code, message=str(final))
            self._finish(writer, record, str(final.status or final.code), latency, False, 0, 0)
            return
        latency = time.monotonic() - started
        usage = body.get("usage") if isinstance(body, dict) else None
        prompt = completion = 0
        if isinstance(usage, dict):
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
        record = result_record(
            request.custom_id, status_code=status, request_id=request_id, body=body
        )
        ok = 200 <= status < 300
        if ok and self.limiter is not None:
            self.limiter.on_done(last, completion)  # the answering attempt: no backoff in it
        self._finish(writer, record, str(status), latency, ok, prompt, completion)

    def _finish(
        self,
        writer: ResultWriter,
        record: dict[str, Any],
        status: str,
        latency: float,
        ok: bool,
        prompt: int,
        completion: int,
    ) -> None:
        writer.write(record)
        self.stats.record(status, latency, ok)
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion

    # -- the loop --------------------------------------------------------------------------

    def _items(self, finished: IdSet, reported: set[int]) -> Iterator[BatchRequest | InputError]:
        """Input items still to do: ids an earlier run finished and bad lines it reported are
        skipped; a repeated id becomes an error."""
        for item in read_input(self.options.input, self.options.plain):
            if isinstance(item, InputError):
                if item.line in reported:
                    self.stats.skipped += 1
                else:
                    yield item
                continue
            if item.custom_id in finished:
                self.stats.skipped += 1
                continue
            if item.custom_id in self._started_ids:
                if item.line in reported:
                    self.stats.skipped += 1
                else:
                    yield duplicate_error(item)
                continue
            self._started_ids.add(item.custom_id)
            yield item

    def _limit(self, now: float) -> int:
        if self.limiter is None:
            return self.options.max_inflight or 1
        return self.limiter.update(now)

    async def _make_limiter(self, session: aiohttp.ClientSession, loop_now: float) -> None:
        view = await fleet_probe.look(session, self.base)
        self._kind = view.kind
        if self.options.max_inflight is not None:
            return
        settings = self.options.limit_settings
        start, slow = initial_limit(list(view.capacities), settings.queue_per_replica)
        self.limiter = AdaptiveLimit(start, settings, slow_start=slow, window_start=loop_now)
        self.limiter.on_queue(view.queue)

    async def _poll_queue(self, session: aiohttp.ClientSession) -> None:
        """Keep the limiter's view of the engines' queue fresh (auto mode with a signal)."""
        while self.limiter is not None and self._kind in ("router", "vllm"):
            await asyncio.sleep(QUEUE_POLL_S)
            before = self.stats.in_flight
            view = await fleet_probe.look(session, self.base, self._kind)
            queue = view.queue
            if queue is not None and queue.seen is not None and queue.sent is None:
                # a vLLM server: what it was sent is ours, at most what was out all along
                queue = replace(queue, sent=float(min(before, self.stats.in_flight)))
            self.limiter.on_queue(queue)

    def _spawn(
        self, session: aiohttp.ClientSession, writer: ResultWriter, request: BatchRequest
    ) -> None:
        self.stats.in_flight += 1
        if self.limiter is not None:
            self.limiter.on_start(self.stats.in_flight)
        task = asyncio.create_task(self._send(session, writer, request))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.stats.in_flight -= 1
        self._slot_freed.set()

    async def _ticker(self, writer: ResultWriter, progress: Progress) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            await writer.maybe_sync_async()
            self.stats.limit = self._limit(loop.time())
            progress.refresh(time.monotonic())

    async def run(self) -> BatchSummary:
        options = self.options
        if not options.input.is_file():
            raise FileNotFoundError(f"input file {options.input} does not exist")
        result_files = [options.output] + ([options.errors] if options.errors else [])
        resume = await asyncio.to_thread(scan_results, result_files)
        self.stats.total = await asyncio.to_thread(count_lines, options.input)
        loop = asyncio.get_running_loop()
        writer = ResultWriter(options.output, options.errors)
        progress = Progress(self.stats, quiet=options.quiet)
        timeout = aiohttp.ClientTimeout(
            total=options.request_timeout_s, sock_connect=options.connect_timeout_s
        )
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        interrupted = False
        background: list[asyncio.Task[None]] = []
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                await self._make_limiter(session, loop.time())
                self.stats.limit = self._limit(loop.time())
                progress.start()
                background = [
                    asyncio.create_task(self._ticker(writer, progress)),
                    asyncio.create_task(self._poll_queue(session)),
                ]
                interrupted = await self._feed(
                    session, writer, resume.finished, resume.reported_lines
                )
                if not interrupted:
                    interrupted = await self._drain()
                if interrupted:
                    await self._grace()
                await self._cancel_in_flight()
                await _stop_tasks(background)  # before the session they use closes
        finally:
            await _stop_tasks(background)
            writer.close()
            progress.close(time.monotonic())
        return summarize(
            self.stats,
            interrupted=interrupted,
            output=str(options.output),
            errors_file=str(options.errors) if options.errors else None,
        )

    async def _feed(
        self,
        session: aiohttp.ClientSession,
        writer: ResultWriter,
        finished: IdSet,
        reported: set[int],
    ) -> bool:
        """Send every pending line within the limit; True when stopped by a signal."""
        loop = asyncio.get_running_loop()
        for count, item in enumerate(self._items(finished, reported)):
            if self.stop_requested.is_set():
                return True
            if isinstance(item, InputError):
                writer.write(
                    result_record(
                        item.custom_id, error_code="invalid_request", message=item.message,
                        line=item.line,
                    )
                )  # fmt: skip
                self.stats.input_errors += 1
                continue
            while self.stats.in_flight >= self._limit(loop.time()):
                self._slot_freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), TICK_S)
                if self.stop_requested.is_set():
                    return True
            self._spawn(session, writer, item)
            if count % 512 == 0:
                await asyncio.sleep(0)  # let results in while a long run of skips streams by
        return self.stop_requested.is_set()

    async def _drain(self) -> bool:
        """Wait for the last requests; True when a signal came first."""
        while self._tasks:
            stop = asyncio.create_task(self.stop_requested.wait())
            await asyncio.wait([*self._tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            if self.stop_requested.is_set():
                return True
            stop.cancel()
        return False

    async def _grace(self) -> None:
        """Stopping: the requests in flight may finish within the grace (or a second signal)."""
        if not self._tasks or self.options.stop_grace_s <= 0:
            return
        now = asyncio.create_task(self._stop_now.wait())
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.options.stop_grace_s
            while self._tasks and not self._stop_now.is_set() and loop.time() < deadline:
                await asyncio.wait(
                    [*self._tasks, now], timeout=deadline - loop.time(),
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
        finally:
            now.cancel()

    async def _cancel_in_flight(self) -> None:
        """Requests still in flight get no line: the next run sends them again."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_batch_async(
    options: BatchOptions, handle_signals: bool = True, run: BatchRun | None = None
) -> BatchSummary:
    """Run one batch in the current loop. With ``handle_signals``, SIGINT and SIGTERM stop it
    cleanly (results so far fsynced, unfinished requests left for the next run). ``run`` lets
    a caller in another thread reach `BatchRun.request_stop`."""
    run = run or BatchRun(options)
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, run.request_stop)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (Jupyter's helper thread) or no signals here
    try:
        return await run.run()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
