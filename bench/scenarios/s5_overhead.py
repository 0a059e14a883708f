"""Scenario 5: router overhead in front of replicas that answer at once."""

from __future__ import annotations

import math

from bench.fmt import fmt_added
from bench.load import RequestRecord, RequestSpec, Target, run_closed_loop
from bench.peers import Peer
from bench.replicas import SimFleet, SimSettings
from bench.scenarios.harness import MODEL, Options, RunLoad, line_up, measure, started
from bench.scenarios.tables import not_started_row
from bench.section import PeerRun, Section, Table

KEY = "5"
PEERS = (
    "direct-rr", "ours-cost", "ours-cost-w2", "ours-lb", "ours-rr", "nginx-lc", "haproxy-lc",
    "vllm-rr", "vllm-p2",
    "sglang-rr", "sglang-ca",
)  # fmt: skip
QUICK_PEERS = ("direct-rr", "ours-lb", "nginx-lc")
CONCURRENCY = (1, 64)
#: Replicas that answer at once: a step of 0.1 ms that does not grow with the batch.
INSTANT = SimSettings(model=MODEL, max_num_seqs=256, step_ms=0.1, batch_slowdown=0.0)
TOKENS = 16


def overhead_spec(index: int) -> RequestSpec:
    """Small fixed requests (16 tokens, 9 in 10 streamed): the proxy path, not the model."""
    prompt = f"request {index}: " + " ".join(["fleet", "router", "token", "batch"] * 12)
    return RequestSpec(index, 0.0, prompt, TOKENS, stream=index % 10 != 9)


async def run_scenario(opts: Options) -> Section:
    duration = 3.0 if opts.quick else 6.0
    section = Section("5", "Router overhead (replicas that answer at once)")
    section.text.append(
        "2 simulated replicas with a 0.1 ms step that does not grow with the batch (256 "
        f"running allowed), so the replicas add almost nothing. Closed loop at "
        f"{' and '.join(str(c) for c in CONCURRENCY)} requests in flight, {duration:g} s "
        f'each: {TOKENS}-token answers, ~50-word prompts, 9 in 10 streamed. "direct" is '
        "the load generator spreading round robin over the same 2 replicas without a proxy; "
        "added latency is the router's p50/p99 minus direct's. Router CPU is utime+stime of "
        "its process tree per request. The load generator, the replicas and the router share "
        "the machine's cores, so a router that burns CPU also slows everything else: that is "
        "part of its cost."
    )
    fleet = SimFleet.of([INSTANT, INSTANT], opts.workdir / "s5", opts.python)
    by_conc: dict[int, list[PeerRun]] = {c: [] for c in CONCURRENCY}

    def closed(concurrency: int) -> RunLoad:
        async def run(target: Target, peer: Peer) -> list[RequestRecord]:
            return await run_closed_loop(
                target, overhead_spec, MODEL, concurrency=concurrency, duration=duration
            )

        return run

    async with started(fleet):
        for key in line_up(opts, PEERS, QUICK_PEERS):
            for concurrency in CONCURRENCY:
                run = await measure(key, opts, fleet, closed(concurrency))
                run.extra["concurrency"] = concurrency
                by_conc[concurrency].append(run)
                section.runs.append(run)
                if run.unavailable:
                    break
    headers = [
        "router",
        "concurrency",
        "requests/s",
        "p50 (ms)",
        "p99 (ms)",
        "added p50 (ms)",
        "added p99 (ms)",
        "errors",
        "router CPU ms/req",
    ]
    rows: list[list[str]] = []
    for concurrency, runs in by_conc.items():
        base = next((r for r in runs if r.key == "direct-rr" and not r.unavailable), None)
        b50 = base.summary.latency_p50 if base else math.nan
        b99 = base.summary.latency_p99 if base else math.nan
        for run in runs:
            if run.unavailable:
                rows.append(not_started_row(run, len(headers)))
                continue
            s = run.summary
            rows.append(
                [
                    run.name,
                    str(concurrency),
                    f"{s.requests_per_s:.0f}",
                    f"{1000 * s.latency_p50:.1f}",
                    f"{1000 * s.latency_p99:.1f}",
                    fmt_added(s.latency_p50, b50),
                    fmt_added(s.latency_p99, b99),
                    str(s.errors),
                    "-" if run.cpu_s is None else f"{run.cpu_ms_per_request:.2f}",
                ]
            )
    section.tables.append(Table(headers, rows))
    return section
