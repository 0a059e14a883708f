"""Scenario 6: a replica crashes mid-run and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Sequence

import aiohttp

from bench.fmt import fmt_s
from bench.load import RequestRecord, Target, make_schedule, run_open_loop
from bench.peers import OursPeer, Peer
from bench.replicas import SimFleet
from bench.scenarios.harness import MODEL, Options, line_up, measure, started
from bench.scenarios.heterogeneous import HETEROGENEOUS, base_mix, setting_text
from bench.scenarios.tables import not_started_row
from bench.section import Section, Table
from bench.stats import replica_index
from tests.support.metrics import metric_value, scrape_metrics

KEY = "6"
PEERS = ("ours-cost", "nginx-lc", "haproxy-lc")
QUICK_PEERS = ("ours-cost", "nginx-lc")
#: Replica that dies (index into HETEROGENEOUS: a full-speed one).
VICTIM = 1
#: The pollers stop with the run (cancelled); this only bounds them should that ever fail.
WATCH_LIMIT_S = 600.0


async def run_scenario(opts: Options) -> Section:
    mix = base_mix(opts, duration=12.0 if opts.quick else 24.0)
    schedule = make_schedule(mix)
    kill_at, back_at = mix.duration / 3, 2 * mix.duration / 3
    section = Section("6", "Failover: a replica crashes mid-run and comes back")
    section.text.append(
        setting_text(mix, HETEROGENEOUS)
        + f" At t = {kill_at:.0f} s replica r{VICTIM + 1} is SIGKILLed (port closed, its "
        f"streams cut); at t = {back_at:.0f} s it is started again on the same port."
    )
    fleet = SimFleet.of(HETEROGENEOUS, opts.workdir / "s6", opts.python)

    def crash_midway(target: Target, peer: Peer) -> Awaitable[list[RequestRecord]]:
        async def run() -> list[RequestRecord]:
            t0 = time.perf_counter()
            victim = fleet.replicas[VICTIM]
            marks: dict[str, float] = {}

            async def crash_and_return() -> None:
                await asyncio.sleep(kill_at)
                victim.kill()
                marks["killed"] = time.perf_counter() - t0
                await asyncio.sleep(max(0.0, back_at - (time.perf_counter() - t0)))
                await victim.start()
                marks["back"] = time.perf_counter() - t0
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                    while time.perf_counter() - t0 < WATCH_LIMIT_S:
                        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                            if (await victim.stats(session))["received"] > 0:
                                marks["used_again"] = time.perf_counter() - t0
                                return
                        await asyncio.sleep(0.05)

            task = asyncio.create_task(crash_and_return())
            sends: list[float] = []
            watch = (
                asyncio.create_task(_watch_failed_sends(peer.url, victim.url, t0, sends))
                if isinstance(peer, OursPeer)
                else None
            )
            try:
                records = await run_open_loop(target, schedule, MODEL, t0=t0)
            finally:
                for pending in (task, watch):
                    if pending is not None and not pending.done():
                        # The run ended before the replica was used again (or before it was
                        # back); the watcher runs until the end.
                        pending.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await pending
            if sends:
                marks["last_dead_send"] = max(sends)
                if victim.child is None or not victim.child.alive():
                    await victim.start()
            marks["end"] = time.perf_counter() - t0
            failover_runs[peer.name] = marks
            return records

        return run()

    failover_runs: dict[str, dict[str, float]] = {}
    async with started(fleet):
        for key in line_up(opts, PEERS, QUICK_PEERS):
            section.runs.append(await measure(key, opts, fleet, crash_midway))
    headers = [
        "router",
        "errors (all)",
        "errors: in flight at crash",
        "errors: sent after crash",
        "last failed send after crash (s)",
        "last send to dead replica (s)",
        "back in use after restart (s)",
        "p99 (s)",
    ]
    rows = []
    for run in section.runs:
        if run.unavailable:
            rows.append(not_started_row(run, len(headers)))
            continue
        marks = failover_runs.get(run.name, {})
        killed = marks.get("killed", kill_at)
        errors = [r for r in run.records if not r.ok]
        in_flight = [r for r in errors if r.start < killed]
        after = [r for r in errors if r.start >= killed]
        last_failed = max((r.start for r in after), default=math.nan) - killed
        back = marks.get("back", back_at)
        if run.key.startswith("ours"):
            # Our router's own count of failed attempts on the dead replica (every send
            # there fails while it is down), polled every 50 ms: no per-request header.
            attributed = True
            sent = marks.get("last_dead_send", math.nan)
            tried_dead = [sent] if killed <= sent < back else []
        else:
            attributed = any(r.replica for r in run.records)
            tried_dead = [
                r.start
                for r in run.records
                if killed <= r.start < back and _tried(r.replica, run.replica_urls, VICTIM)
            ]
        last_dead = (max(tried_dead) - killed) if tried_dead else math.nan
        used_again = marks.get("used_again", math.nan) - marks.get("back", math.nan)
        rows.append(
            [
                run.name,
                str(len(errors)),
                str(len(in_flight)),
                str(len(after)),
                fmt_s(last_failed) if after else "none",
                fmt_s(last_dead)
                if attributed and tried_dead
                else ("none seen" if attributed else "n/a (no attribution)"),
                fmt_s(used_again)
                if not math.isnan(used_again)
                else f"> {marks.get('end', math.nan) - marks.get('back', math.nan):.1f} "
                "(not before the run ended)",
                fmt_s(run.summary.latency_p99),
            ]
        )
    section.tables.append(Table(headers, rows))
    section.text.append(
        '"in flight at crash" are streams cut by the crash (no router can save those without '
        'replaying them). "sent after crash" are requests the client saw fail although they '
        'were sent after the crash: those a router could have routed elsewhere. "last send to '
        "dead replica\" needs attribution: nginx's `$upstream_addr` lists every upstream it "
        "tried, HAProxy names the one that answered, ours is read from the router's own "
        "`vllm_fleet_upstream_failures_total{replica=...}` (its last increase: a send there "
        "or a stream cut by the crash; polled every 50 ms); the Rust routers give none. "
        '"back in use" is from the restarted replica\'s own counter, polled every 50 ms.'
    )
    return section


async def _watch_failed_sends(router: str, replica: str, t0: float, sends: list[float]) -> None:
    """Append the time of every poll that saw the router's failed attempts on `replica` grow."""
    last = 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.perf_counter() - t0 < WATCH_LIMIT_S:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                samples = await scrape_metrics(router, session)
                total = metric_value(samples, "vllm_fleet_upstream_failures_total", replica=replica)
                if total > last:
                    sends.append(time.perf_counter() - t0)
                    last = total
            await asyncio.sleep(0.05)


def _tried(label: str, urls: Sequence[str], index: int) -> bool:
    """True if the per-request label shows an attempt on replica `index`."""
    return any(replica_index(part, urls) == index for part in label.split(","))
