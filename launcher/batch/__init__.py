"""Batch jobs through the fleet: a file of requests in, results out (``vllm-fleet batch``).

    from vllm_fleet.launcher.batch import run_batch
    summary = run_batch("prompts.jsonl", "results.jsonl", endpoint="http://127.0.0.1:8000")

Modules: `input` (streaming parse and validation), `output` (append-only results, resume),
`limit` (the adaptive in-flight limit), `fleet_probe` (what the endpoint tells about its
capacity and queue), `runner` (the async engine), `progress` (bar, plain lines, summary).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

from vllm_fleet.launcher.batch.input import PlainOptions
from vllm_fleet.launcher.batch.progress import BatchSummary
from vllm_fleet.launcher.batch.runner import (
    DEFAULT_PRIORITY,
    BatchOptions,
    BatchRun,
    run_batch_async,
)

__all__ = ["BatchOptions", "BatchSummary", "PlainOptions", "run_batch", "run_batch_async"]


def run_batch(
    input: str | Path,
    output: str | Path,
    *,
    endpoint: str,
    errors: str | Path | None = None,
    max_inflight: int | None = None,
    plain: PlainOptions | None = None,
    priority: int = DEFAULT_PRIORITY,
    api_key: str | None = None,
    quiet: bool = False,
) -> BatchSummary:
    """Run a batch to the end (or resume one) and return its summary.

    Works from a script and from Jupyter: when this thread already runs an event loop (a
    notebook), the batch runs in its own loop on a helper thread, with the same progress bar.
    ``max_inflight`` None adapts the concurrency to the fleet.
    """
    options = BatchOptions(
        input=Path(input),
        output=Path(output),
        endpoint=endpoint,
        errors=Path(errors) if errors is not None else None,
        max_inflight=max_inflight,
        plain=plain,
        priority=priority,
        api_key=api_key,
        quiet=quiet,
    )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_batch_async(options))
    return _run_in_thread(options)


def _run_in_thread(options: BatchOptions) -> BatchSummary:
    """A notebook already runs a loop in this thread: the batch gets its own loop on a helper
    thread. Interrupting the kernel (KeyboardInterrupt here) stops the batch as Ctrl-C does."""
    loops: list[asyncio.AbstractEventLoop] = []
    run: list[BatchRun] = []

    async def main() -> BatchSummary:
        loops.append(asyncio.get_running_loop())
        run.append(BatchRun(options))
        return await run_batch_async(options, handle_signals=False, run=run[0])

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(asyncio.run, main())
        while True:
            try:
                return future.result()
            except KeyboardInterrupt:
                if loops and run:
                    loops[0].call_soon_threadsafe(run[0].request_stop)
