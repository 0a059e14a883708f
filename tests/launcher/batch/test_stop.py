"""Stopping a batch from Python: a stop request lets the requests in flight finish (their
work is kept), a second one drops them; `run_batch` inside a running loop (Jupyter)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.launcher.batch.support import answered_once, line_count, read_results, write_batch
from tests.support.sim import running_sim, start_sim_process, wait_until
from vllm_fleet.launcher.batch import BatchOptions, run_batch
from vllm_fleet.launcher.batch.runner import BatchRun, run_batch_async


async def test_a_stop_request_keeps_the_work_in_flight(tmp_path: Path) -> None:
    write_batch(tmp_path / "in.jsonl", 300, max_tokens=32)
    async with running_sim(max_num_seqs=8) as sim:
        options = BatchOptions(
            tmp_path / "in.jsonl", tmp_path / "out.jsonl", sim.url, max_inflight=8, quiet=True
        )
        run = BatchRun(options)
        task = asyncio.create_task(run_batch_async(options, handle_signals=False, run=run))
        await wait_until(lambda: line_count(options.output) >= 20, 30.0, what="20 results")
        await wait_until(lambda: run.stats.in_flight == 8, 10.0, what="a full window")
        run.request_stop()
        summary = await asyncio.wait_for(task, 30.0)
        aborted = sim.stats().aborted
    assert summary.interrupted
    assert aborted == 0  # nothing in flight was cut: the grace let all 8 finish
    records = read_results(options.output)
    assert len(records) == summary.completed < 300
    assert run.stats.in_flight == 0


async def test_a_second_stop_request_drops_what_is_in_flight(tmp_path: Path) -> None:
    write_batch(tmp_path / "in.jsonl", 50, max_tokens=2000)
    async with running_sim(max_num_seqs=8, step_ms=20.0, max_model_len=4096) as sim:
        options = BatchOptions(
            tmp_path / "in.jsonl", tmp_path / "out.jsonl", sim.url, max_inflight=8, quiet=True
        )
        run = BatchRun(options)
        task = asyncio.create_task(run_batch_async(options, handle_signals=False, run=run))
        await wait_until(lambda: sim.running == 8, 10.0, what="8 requests running")
        run.request_stop()
        run.request_stop()
        summary = await asyncio.wait_for(task, 10.0)  # well before a 2000-token answer
        await wait_until(lambda: sim.stats().aborted == 8, 5.0, what="8 aborted on the sim")
    assert summary.interrupted and summary.completed == 0
    assert read_results(options.output) == []


async def test_run_batch_works_inside_a_running_loop(tmp_path: Path) -> None:
    ids = write_batch(tmp_path / "in.jsonl", 20, max_tokens=4)
    async with start_sim_process() as sim:  # its own process: this loop blocks below
        summary = run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", endpoint=sim.url)
    assert summary.succeeded == 20
    assert answered_once(read_results(tmp_path / "out.jsonl"), ids) == {"200": 20}
