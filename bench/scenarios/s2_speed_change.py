"""Scenario 2: a fast replica drops to half speed mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable

from bench.fmt import fmt_pct, fmt_s
from bench.load import RequestRecord, Target, make_schedule, run_open_loop
from bench.peers import Peer
from bench.replicas import SimFleet
from bench.scenarios.harness import MODEL, Options, line_up, measure, started
from bench.scenarios.heterogeneous import HETEROGENEOUS, base_mix, setting_text
from bench.scenarios.tables import not_started_row
from bench.section import Plot, Section, Table
from bench.stats import per_token_series, shares, summarize

KEY = "2"

#: Every load-aware peer (round robin cannot react to a speed change; scenario 1 shows it).
PEERS = ("ours-cost", "ours-lb", "nginx-lc", "haproxy-lc", "vllm-ca", "sglang-ca")
QUICK_PEERS = ("ours-lb", "ours-rr")


async def run_scenario(opts: Options) -> Section:
    mix = base_mix(opts, duration=None if opts.quick else 18.0)
    schedule = make_schedule(mix)
    change_at = mix.duration / 3
    section = Section("2", "Speed change: a fast replica drops to half speed")
    section.text.append(
        setting_text(mix, HETEROGENEOUS)
        + f" At t = {change_at:.0f} s replica r1 drops from full to half speed "
        '(`POST /sim/control {"speed": 0.5}`); load is then 82% of the remaining capacity.'
    )
    fleet = SimFleet.of(HETEROGENEOUS, opts.workdir / "s2", opts.python)

    def slow_down_midway(target: Target, peer: Peer) -> Awaitable[list[RequestRecord]]:
        async def run() -> list[RequestRecord]:
            counts = [await fleet.received()]
            t0 = time.perf_counter()

            async def change() -> None:
                await asyncio.sleep(change_at)
                await fleet.replicas[0].control(speed=0.5)
                counts.append(await fleet.received())

            task = asyncio.create_task(change())
            try:
                return await run_open_loop(target, schedule, MODEL, t0=t0)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                counts.append(await fleet.received())
                if len(counts) == 3:
                    # Shares from the replicas' own counters: works for every router.
                    r1_share[peer.name] = (
                        shares(counts[0], counts[1])[0],
                        shares(counts[1], counts[2])[0],
                    )
                await fleet.wait_idle()
                await fleet.reset_speeds()

        return run()

    r1_share: dict[str, tuple[float, float]] = {}

    async with started(fleet):
        for key in line_up(opts, PEERS, QUICK_PEERS):
            section.runs.append(await measure(key, opts, fleet, slow_down_midway))

    headers = [
        "router",
        "errors",
        "p50 before (s)",
        "p99 before (s)",
        "p50 after (s)",
        "p99 after (s)",
        "share r1 before",
        "share r1 after",
    ]
    rows = []
    series: dict[str, list[tuple[float, float]]] = {}
    for run in section.runs:
        if run.unavailable:
            rows.append(not_started_row(run, len(headers)))
            continue
        before = [r for r in run.records if r.start < change_at]
        after = [r for r in run.records if r.start >= change_at + 2]
        sb, sa = summarize(before), summarize(after)
        rows.append(
            [
                run.name,
                str(sb.errors + sa.errors),
                fmt_s(sb.latency_p50),
                fmt_s(sb.latency_p99),
                fmt_s(sa.latency_p50),
                fmt_s(sa.latency_p99),
                fmt_pct(r1_share.get(run.name, (math.nan, math.nan))[0]),
                fmt_pct(r1_share.get(run.name, (math.nan, math.nan))[1]),
            ]
        )
        series[run.name] = per_token_series(run.records, bin_s=2.0, q=90)
    section.tables.append(Table(headers, rows))
    section.text.append(
        'Latency "after" counts requests sent from 2 s after the change on. The shares of r1 '
        "are the fractions of requests r1's own counter received before and after the change "
        "(the ideal share after the change is about 1/6: r1 and r4 at half speed, two at full)."
    )
    section.plots.append(
        Plot(
            "lines",
            "s2_latency_over_time.png",
            "Scenario 2: p90 latency per output token of requests sent in each 2 s window",
            series,
            xlabel="time since start (s)",
            ylabel="p90 latency / output tokens (ms)",
            markers=[(change_at, "r1 → half speed")],
        )
    )
    return section
