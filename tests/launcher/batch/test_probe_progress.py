"""What the batch reads from the endpoint (router view, vLLM metrics), and what it prints."""

from __future__ import annotations

import io
import json

import aiohttp

from tests.support.router import running_router
from tests.support.sim import running_sims
from vllm_fleet.launcher.batch.fleet_probe import _router_view, look, waiting_from_metrics
from vllm_fleet.launcher.batch.limit import QueueSignal
from vllm_fleet.launcher.batch.progress import BatchStats, Progress, plain_line, summarize


def test_router_view_sums_healthy_replicas_and_keeps_unknown_limits() -> None:
    rows = [
        {
            "healthy": True,
            "waiting": 3,
            "running": 8,
            "in_flight": 14,
            "speed": {"batch_limit": 16.0},
        },
        {
            "healthy": True,
            "waiting": 1,
            "running": 4,
            "in_flight": 5,
            "speed": {"batch_limit": None},
        },
        {"healthy": False, "waiting": 50, "in_flight": 9, "speed": {"batch_limit": 8.0}},
    ]
    view = _router_view(rows)
    assert view is not None
    assert view.kind == "router"
    assert view.capacities == (16.0, None)
    # the engines reported 16 of the 19 requests the router has out to them: 3 unseen
    assert view.queue == QueueSignal(waiting=4.0, replicas=2, seen=16.0, sent=19.0)
    assert view.queue.unseen == 3.0
    assert _router_view({"ok": True}) is None


def test_batch_requests_the_router_holds_back_count_as_queued() -> None:
    rows = [
        {"healthy": True, "waiting": 1, "batch_held": 2.5, "speed": {"batch_limit": 16.0}},
        {"healthy": True, "waiting": 0, "batch_held": 2.5, "speed": {"batch_limit": 16.0}},
    ]
    view = _router_view(rows)
    assert view is not None and view.queue is not None
    assert (view.queue.waiting, view.queue.replicas) == (6.0, 2)


def test_waiting_from_metrics_reads_only_the_waiting_gauge() -> None:
    page = "\n".join(
        [
            "# HELP vllm:num_requests_waiting Number of requests waiting.",
            'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0',
            'vllm:num_requests_waiting_by_reason{reason="capacity"} 7.0',
            'vllm:num_requests_running{engine="0",model_name="m"} 16.0',
        ]
    )
    assert waiting_from_metrics(page) == 3.0
    assert waiting_from_metrics("other_metric 1\n") is None


async def test_look_tells_a_router_from_a_vllm_server() -> None:
    async with (
        running_sims(2) as sims,
        running_router([s.url for s in sims]) as router,
        aiohttp.ClientSession() as session,
    ):
        via_router = await look(session, router.url)
        direct = await look(session, sims[0].url)
    assert via_router.kind == "router" and len(via_router.capacities) == 2
    assert via_router.queue is not None and via_router.queue.replicas == 2
    assert direct.kind == "vllm" and direct.queue == QueueSignal(0.0, 1, seen=0.0)


def test_without_a_tty_progress_is_one_plain_line_every_few_seconds() -> None:
    stats = BatchStats(total=100, started=0.0)
    stats.record("200", 0.5, True)
    stats.completion_tokens = 40
    stream = io.StringIO()
    progress = Progress(stats, stream=stream)
    progress.start()
    progress.refresh(10.0)
    progress.refresh(11.0)  # within the interval: nothing
    progress.refresh(16.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0] == plain_line(stats, 10.0)
    assert lines[0].startswith("batch: 1/100 (1.0%) ok 1 errors 0 4 tok/s")
    assert "ETA 16m30s" in lines[0]


def test_summary_counts_and_json() -> None:
    stats = BatchStats(total=3)
    stats.record("200", 0.1, True)
    stats.record("200", 0.3, True)
    stats.record("400", 0.2, False)
    stats.input_errors = 1
    summary = summarize(stats, interrupted=False, output="out.jsonl", errors_file=None)
    data = json.loads(summary.to_json())
    assert data["by_status"] == {"200": 2, "400": 1}
    assert data["succeeded"] == 2 and data["failed"] == 1 and data["input_errors"] == 1
    assert data["latency_p50_s"] == 0.2
    assert "2 ok, 1 failed" in summary.to_text()
