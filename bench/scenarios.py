"""The benchmark scenarios: each starts its replicas, runs every router through the same seeded
load, and returns a `Section` (tables, plot data, notes) for the report.

Scenarios never import matplotlib: plots travel as `Plot` data and `bench.report` draws them,
so the CI smoke test can import this module from the project's own venv.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from bench.load import (
    RequestMix,
    RequestRecord,
    RequestSpec,
    RoundRobinTarget,
    Target,
    make_schedule,
    run_closed_loop,
    run_open_loop,
)
from bench.peers import OursPeer, Peer, PeerUnavailable, make_peer
from bench.replicas import (
    TINY_MODEL,
    Fleet,
    SimFleet,
    SimSettings,
    VllmFleet,
    VllmReplica,
    find_vllm_python,
    metric_sum,
)
from bench.stats import (
    Summary,
    per_token_series,
    replica_index,
    shares,
    summarize,
    window_tokens_per_s,
)
from launcher.sim.config import DEFAULT_CHAT_MAX_TOKENS
from launcher.sim.engine import StepTiming

MODEL = "sim-model"


@dataclass(frozen=True)
class Options:
    """How the whole benchmark runs (from the command line)."""

    quick: bool
    workdir: Path
    #: interpreter with vllm-fleet installed, for the simulators and our router.
    python: str
    seed: int = 1
    #: restrict every scenario to these peer keys (None = each scenario's own line-up).
    peers: tuple[str, ...] | None = None
    #: interpreter with vLLM installed (scenario 7); "" = look for one.
    vllm_python: str = ""
    #: runs one scenario can reuse from another in the same invocation: (peer key, load).
    reuse: dict[tuple[str, float], PeerRun] = field(default_factory=dict)


@dataclass
class PeerRun:
    """One router's run in one scenario (or why it did not run)."""

    key: str
    name: str
    settings: str = ""
    version: str = ""
    unavailable: str = ""
    records: list[RequestRecord] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    cpu_s: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    #: the replicas' URLs in fleet order, to map per-request replica labels to an index.
    replica_urls: list[str] = field(default_factory=list)

    @property
    def summary(self) -> Summary:
        return summarize(self.records)

    @property
    def cpu_ms_per_request(self) -> float:
        if self.cpu_s is None or not self.records:
            return math.nan
        return 1000 * self.cpu_s / len(self.records)


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str = ""


@dataclass(frozen=True)
class Plot:
    """Data for one PNG; `kind` picks the drawing function in bench.report."""

    kind: str
    filename: str
    title: str
    #: series name -> (x, y) points.
    series: dict[str, list[tuple[float, float]]]
    xlabel: str
    ylabel: str
    #: optional second panel (same series names), e.g. p99 beside throughput.
    series2: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    ylabel2: str = ""
    #: x positions of vertical markers with labels.
    markers: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Section:
    key: str
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    runs: list[PeerRun] = field(default_factory=list)
    #: how long the scenario took, when and at which commit it ran (for the report's footer).
    seconds: float = 0.0
    date: str = ""
    commit: str = ""
    #: router name -> headline numbers (kept when the runs are not), for the summary table.
    facts: dict[str, dict[str, float]] = field(default_factory=dict)
    #: router name -> version string and settings, for the report's versions table.
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)


# -- setting of scenario 1 ------------------------------------------------------------------

FULL = SimSettings(model=MODEL)
HALF = replace(FULL, speed=0.5)
HETEROGENEOUS = [FULL, FULL, FULL, HALF]
#: Fraction of fleet capacity scenario 1 offers.
LOAD = 0.7


def replica_capacity_rps(settings: SimSettings, mean_tokens: float) -> float:
    """Requests per second one simulated replica finishes with its batch full.

    From the simulator's own step model: a full batch of `max_num_seqs` gets one token each per
    step, so tokens/s = max_num_seqs / step time, and requests/s = that / mean output tokens.
    """
    timing = StepTiming(settings.step_ms, settings.batch_slowdown, 0.0)
    step_s = timing.duration(settings.max_num_seqs, 0, settings.speed)
    return settings.max_num_seqs / step_s / mean_tokens


def fleet_capacity_rps(fleet: Sequence[SimSettings], mix: RequestMix) -> float:
    mean_tokens = mix.mean_tokens(DEFAULT_CHAT_MAX_TOKENS)
    return sum(replica_capacity_rps(s, mean_tokens) for s in fleet)


def base_mix(
    opts: Options,
    fraction: float = LOAD,
    duration: float | None = None,
    omit_max_tokens_fraction: float = 0.0,
) -> RequestMix:
    """Scenario 1's traffic at `fraction` of the heterogeneous fleet's capacity."""
    mix = RequestMix(
        rate=1.0,
        duration=duration or (8.0 if opts.quick else 20.0),
        seed=opts.seed,
        omit_max_tokens_fraction=omit_max_tokens_fraction,
    )
    return replace(mix, rate=fraction * fleet_capacity_rps(HETEROGENEOUS, mix))


# -- running one peer -----------------------------------------------------------------------

RunLoad = Callable[[Target, Peer], Awaitable[list[RequestRecord]]]


def _line_up(opts: Options, default: Sequence[str], quick: Sequence[str]) -> list[str]:
    if opts.peers is not None:
        return list(opts.peers)
    return list(quick if opts.quick else default)


async def measure(key: str, opts: Options, fleet: Fleet, run: RunLoad) -> PeerRun:
    """Start one peer in front of `fleet`, run the load through it, stop it (always)."""
    peer = make_peer(key, opts.workdir / "peers", opts.python)
    result = PeerRun(key, peer.name, peer.settings, peer.version(), replica_urls=fleet.urls)
    try:
        await peer.start(fleet.urls)
    except PeerUnavailable as exc:
        result.unavailable = str(exc)
        print(f"  {peer.name}: NOT STARTED ({exc})", flush=True)
        return result
    try:
        await fleet.wait_idle()
        before = await fleet.received()
        cpu_before = peer.cpu_seconds()
        result.records = await run(peer.target(), peer)
        cpu_after = peer.cpu_seconds()
        if cpu_before is not None and cpu_after is not None:
            result.cpu_s = cpu_after - cpu_before
        result.shares = shares(before, await fleet.received())
    finally:
        peer.stop()
    s = result.summary
    print(
        f"  {peer.name}: {s.requests} req, {s.errors} err, p50 {s.latency_p50:.2f}s "
        f"p99 {s.latency_p99:.2f}s, ttft p50 {1000 * s.ttft_p50:.0f}ms",
        flush=True,
    )
    return result


def open_loop(schedule: list[RequestSpec], model: str = MODEL) -> RunLoad:
    async def run(target: Target, peer: Peer) -> list[RequestRecord]:
        return await run_open_loop(target, schedule, model)

    return run


@contextlib.asynccontextmanager
async def started(fleet: SimFleet | VllmFleet) -> AsyncIterator[None]:
    try:
        await fleet.start()
        yield
    finally:
        fleet.stop()


# -- formatting -----------------------------------------------------------------------------


def fmt_s(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{1000 * value:.0f}"


def fmt_pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.0f}%"


def not_started_row(run: PeerRun, width: int) -> list[str]:
    return [run.name, f"not started: {run.unavailable}"[:160]] + [""] * (width - 2)


def latency_table(runs: Sequence[PeerRun], replica_labels: Sequence[str], window: float) -> Table:
    """One row per router; throughput is output tokens delivered during the first `window`
    seconds (the load window), see bench.stats.window_tokens_per_s."""
    headers = [
        "router",
        "requests",
        "errors",
        "latency mean (s)",
        "p50 (s)",
        "p99 (s)",
        "p99 ms/token",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "output tok/s in load window",
        *[f"share {label}" for label in replica_labels],
        "router CPU ms/req",
    ]
    rows = []
    for run in runs:
        if run.unavailable:
            rows.append(not_started_row(run, len(headers)))
            continue
        s = run.summary
        rows.append(
            [
                run.name,
                str(s.requests),
                str(s.errors),
                fmt_s(s.latency_mean),
                fmt_s(s.latency_p50),
                fmt_s(s.latency_p99),
                fmt_ms(s.per_token_p99),
                fmt_ms(s.ttft_p50),
                fmt_ms(s.ttft_p99),
                f"{window_tokens_per_s(run.records, 0.0, window):.0f}",
                *[fmt_pct(x) for x in run.shares],
                "-" if run.cpu_s is None else f"{run.cpu_ms_per_request:.2f}",
            ]
        )
    return Table(headers, rows)


HETERO_LABELS = ["r1", "r2", "r3", "r4 (½ speed)"]


def setting_text(mix: RequestMix, fleet: Sequence[SimSettings]) -> str:
    capacity = fleet_capacity_rps(fleet, mix)
    speeds = ", ".join(f"{s.speed:g}" for s in fleet)
    s0 = fleet[0]
    return (
        f"{len(fleet)} simulated replicas (speeds {speeds}; max {s0.max_num_seqs} running, "
        f"step {s0.step_ms:g} ms growing {100 * s0.batch_slowdown:g}% per running request). "
        f"Poisson arrivals at {mix.rate:.2f} req/s = {mix.rate / capacity:.0%} of the "
        f"calibrated fleet capacity ({capacity:.2f} req/s) for {mix.duration:g} s, seed "
        f"{mix.seed}; {1 - mix.long_fraction:.0%} of requests want {mix.short_tokens[0]}-"
        f"{mix.short_tokens[1]} tokens, {mix.long_fraction:.0%} {mix.long_tokens[0]}-"
        f"{mix.long_tokens[1]}; prompts {mix.prompt_words[0]}-{mix.prompt_words[1]} words; "
        f"{mix.stream_fraction:.0%} streamed"
        + (
            f"; {mix.omit_max_tokens_fraction:.0%} omit max_tokens"
            if mix.omit_max_tokens_fraction
            else ""
        )
        + "."
    )


# -- scenario 1 -----------------------------------------------------------------------------

S1_PEERS = (
    "ideal", "direct-rr", "ours-cost", "ours-lb", "ours-rr", "nginx-lc", "nginx-rr", "haproxy-lc",
    "vllm-rr", "vllm-p2", "vllm-ca", "sglang-rr", "sglang-ca",
)  # fmt: skip
S1_QUICK = ("ideal", "ours-lb", "ours-rr", "nginx-lc")


async def scenario_1(opts: Options) -> Section:
    mix = base_mix(opts)
    schedule = make_schedule(mix)
    section = Section("1", "Heterogeneous fleet (one replica at half speed)")
    section.text.append(setting_text(mix, HETEROGENEOUS))
    fleet = SimFleet.of(HETEROGENEOUS, opts.workdir / "s1", opts.python)
    async with started(fleet):
        for key in _line_up(opts, S1_PEERS, S1_QUICK):
            run = await measure(key, opts, fleet, open_loop(schedule))
            section.runs.append(run)
            opts.reuse[(key, LOAD)] = run
    section.tables.append(latency_table(section.runs, HETERO_LABELS, mix.duration))
    section.text.append(
        "Latency is send to last byte of successful requests; ms/token is that latency divided "
        "by the request's output tokens (length-independent, so it shows queueing and slow "
        "replicas); TTFT is send to first content token of streamed ones. Throughput counts "
        "tokens delivered while the load ran. Shares come from each replica's own request counter "
        "(`/sim/stats`). Router CPU is utime+stime of the router's process tree during the "
        "run, divided by the requests sent."
    )
    ok = [r for r in section.runs if not r.unavailable]
    if ok:
        section.plots.append(
            Plot(
                "bars",
                "s1_latency.png",
                "Scenario 1: latency per output token (heterogeneous fleet, 70% load)",
                {
                    "p50": [(i, 1000 * r.summary.per_token_p50) for i, r in enumerate(ok)],
                    "p99": [(i, 1000 * r.summary.per_token_p99) for i, r in enumerate(ok)],
                },
                xlabel="|".join(r.name for r in ok),
                ylabel="request latency / output tokens (ms)",
            )
        )
    return section


# -- scenario 2 -----------------------------------------------------------------------------

#: Every load-aware peer (round robin cannot react to a speed change; scenario 1 shows it).
S2_PEERS = ("ours-cost", "ours-lb", "nginx-lc", "haproxy-lc", "vllm-ca", "sglang-ca")
S2_QUICK = ("ours-lb", "ours-rr")


async def scenario_2(opts: Options) -> Section:
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
                async with aiohttp.ClientSession() as session:
                    await fleet.replicas[0].control(session, speed=0.5)
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
        for key in _line_up(opts, S2_PEERS, S2_QUICK):
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


# -- scenario 3 -----------------------------------------------------------------------------

#: The target is "no worse than the least-busy ideal": the ideal runs the same traffic.
S3_PEERS = ("ideal", "ours-cost", "ours-lb")
S3_QUICK = ("ours-lb", "ours-rr")


async def scenario_3(opts: Options) -> Section:
    mix = base_mix(opts, duration=None if opts.quick else 18.0, omit_max_tokens_fraction=0.5)
    schedule = make_schedule(mix)
    section = Section("3", "No max_tokens: half the requests omit it")
    section.text.append(
        setting_text(mix, HETEROGENEOUS)
        + f" A request without max_tokens gets the simulator's default ({DEFAULT_CHAT_MAX_TOKENS}"
        " tokens; real vLLM would use the rest of the context), so a router cannot read the "
        "request's cost from its body."
    )
    fleet = SimFleet.of(HETEROGENEOUS, opts.workdir / "s3", opts.python)
    async with started(fleet):
        for key in _line_up(opts, S3_PEERS, S3_QUICK):
            section.runs.append(await measure(key, opts, fleet, open_loop(schedule)))
    section.tables.append(latency_table(section.runs, HETERO_LABELS, mix.duration))
    return section


# -- scenario 4 -----------------------------------------------------------------------------

#: The ideal, our default policy and a blind one (scenario 1 shows every router at 70%).
S4_PEERS = ("ideal", "ours-cost", "ours-rr")
S4_QUICK = ("ours-lb", "ours-rr")
S4_LOADS = (0.4, LOAD, 0.95)
S4_LOADS_QUICK = (0.5, 0.9)


async def scenario_4(opts: Options) -> Section:
    loads = S4_LOADS_QUICK if opts.quick else S4_LOADS
    section = Section("4", "Load sweep: throughput and p99 against offered load")
    mix0 = base_mix(opts)
    section.text.append(
        setting_text(mix0, HETEROGENEOUS).split(" Poisson")[0]
        + f" Offered load {', '.join(f'{x:.0%}' for x in loads)} of the calibrated capacity, "
        f"{mix0.duration:g} s each, otherwise scenario 1's traffic (same seed at every load). "
        "A router's point at scenario 1's load is its scenario 1 run when both ran together."
    )
    fleet = SimFleet.of(HETEROGENEOUS, opts.workdir / "s4", opts.python)
    throughput: dict[str, list[tuple[float, float]]] = {}
    p99: dict[str, list[tuple[float, float]]] = {}
    headers = ["router", *[f"{x:.0%}: tok/s / p99 (s) / p99 ms/token / errors" for x in loads]]
    rows: list[list[str]] = []
    async with started(fleet):
        for key in _line_up(opts, S4_PEERS, S4_QUICK):
            row: list[str] = []
            name = key
            for load in loads:
                run = opts.reuse.get((key, load)) or await measure(
                    key, opts, fleet, open_loop(make_schedule(base_mix(opts, load)))
                )
                name = run.name
                section.runs.append(run)
                if run.unavailable:
                    row = [f"not started: {run.unavailable}"[:160]] + [""] * (len(loads) - 1)
                    break
                s = run.summary
                delivered = window_tokens_per_s(run.records, 0.0, mix0.duration)
                throughput.setdefault(name, []).append((100 * load, delivered))
                p99.setdefault(name, []).append((100 * load, 1000 * s.per_token_p99))
                row.append(
                    f"{delivered:.0f} / {fmt_s(s.latency_p99)} / {fmt_ms(s.per_token_p99)} / "
                    f"{s.errors}"
                )
            rows.append([name, *row])
    section.tables.append(Table(headers, rows))
    section.plots.append(
        Plot(
            "sweep",
            "s4_load_sweep.png",
            "Scenario 4: load sweep (heterogeneous fleet)",
            throughput,
            xlabel="offered load (% of calibrated capacity)",
            ylabel="output tokens/s delivered in the load window",
            series2=p99,
            ylabel2="p99 latency / output tokens (ms)",
        )
    )
    return section


# -- scenario 5 -----------------------------------------------------------------------------

S5_PEERS = (
    "direct-rr", "ours-cost", "ours-lb", "ours-rr", "nginx-lc", "haproxy-lc", "vllm-rr", "vllm-p2",
    "sglang-rr", "sglang-ca",
)  # fmt: skip
S5_QUICK = ("direct-rr", "ours-lb", "nginx-lc")
S5_CONCURRENCY = (1, 64)
#: Replicas that answer at once: a step of 0.1 ms that does not grow with the batch.
INSTANT = SimSettings(model=MODEL, max_num_seqs=256, step_ms=0.1, batch_slowdown=0.0)
S5_TOKENS = 16


def overhead_spec(index: int) -> RequestSpec:
    """Small fixed requests (16 tokens, 9 in 10 streamed): the proxy path, not the model."""
    prompt = f"request {index}: " + " ".join(["fleet", "router", "token", "batch"] * 12)
    return RequestSpec(index, 0.0, prompt, S5_TOKENS, stream=index % 10 != 9)


async def scenario_5(opts: Options) -> Section:
    duration = 3.0 if opts.quick else 6.0
    section = Section("5", "Router overhead (replicas that answer at once)")
    section.text.append(
        "2 simulated replicas with a 0.1 ms step that does not grow with the batch (256 "
        f"running allowed), so the replicas add almost nothing. Closed loop at "
        f"{' and '.join(str(c) for c in S5_CONCURRENCY)} requests in flight, {duration:g} s "
        f'each: {S5_TOKENS}-token answers, ~50-word prompts, 9 in 10 streamed. "direct" is '
        "the load generator spreading round robin over the same 2 replicas without a proxy; "
        "added latency is the router's p50/p99 minus direct's. Router CPU is utime+stime of "
        "its process tree per request. The load generator, the replicas and the router share "
        "the machine's cores, so a router that burns CPU also slows everything else: that is "
        "part of its cost."
    )
    fleet = SimFleet.of([INSTANT, INSTANT], opts.workdir / "s5", opts.python)
    by_conc: dict[int, list[PeerRun]] = {c: [] for c in S5_CONCURRENCY}

    def closed(concurrency: int) -> RunLoad:
        async def run(target: Target, peer: Peer) -> list[RequestRecord]:
            return await run_closed_loop(
                target, overhead_spec, MODEL, concurrency=concurrency, duration=duration
            )

        return run

    async with started(fleet):
        for key in _line_up(opts, S5_PEERS, S5_QUICK):
            for concurrency in S5_CONCURRENCY:
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
                    _added(s.latency_p50, b50),
                    _added(s.latency_p99, b99),
                    str(s.errors),
                    "-" if run.cpu_s is None else f"{run.cpu_ms_per_request:.2f}",
                ]
            )
    section.tables.append(Table(headers, rows))
    return section


def _added(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base):
        return "-"
    return f"{1000 * (value - base):+.1f}"


# -- scenario 6 -----------------------------------------------------------------------------

S6_PEERS = ("ours-cost", "nginx-lc", "haproxy-lc")
S6_QUICK = ("ours-cost", "nginx-lc")
#: Replica that dies (index into HETEROGENEOUS: a full-speed one).
VICTIM = 1


async def scenario_6(opts: Options) -> Section:
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
                    while True:
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
        for key in _line_up(opts, S6_PEERS, S6_QUICK):
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
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{router}/metrics") as response:
                    text = await response.text()
                total = metric_sum(text, ("vllm_fleet_upstream_failures",), {"replica": replica})
                if total > last:
                    sends.append(time.perf_counter() - t0)
                    last = total
            await asyncio.sleep(0.05)


def _tried(label: str, urls: Sequence[str], index: int) -> bool:
    """True if the per-request label shows an attempt on replica `index`."""
    return any(replica_index(part, urls) == index for part in label.split(","))


# -- scenario 7 -----------------------------------------------------------------------------

S7_PEERS = ("direct-rr", "ours-lb", "ours-cost", "nginx-lc", "vllm-ca")
S7_QUICK = ("direct-rr", "ours-lb", "nginx-lc", "vllm-ca")
#: Small requests: the tiny model's context is 1024 tokens and a CPU decodes slowly.
S7_MIX = RequestMix(
    rate=1.0, duration=20.0, short_tokens=(8, 32), long_tokens=(64, 128), prompt_words=(8, 64)
)


async def scenario_7(opts: Options) -> Section:
    section = Section("7", "Real vLLM on the CPU: two replicas of the tiny model")
    python = opts.vllm_python or find_vllm_python(Path.cwd())
    if not python:
        section.text.append(
            "Not run: no interpreter with vLLM found (set BENCH_VLLM_PYTHON, or install the "
            "project's .venv with `bash .ci/install`)."
        )
        return section
    model_dir = opts.workdir / "tiny-model"
    # Built by the vLLM interpreter: it has the model builder's dependencies (tokenizers,
    # safetensors), which the bench venv does not need.
    build = await asyncio.create_subprocess_exec(
        python, "-m", "launcher.tiny_model", str(model_dir), stdout=asyncio.subprocess.DEVNULL
    )
    if await build.wait() != 0:
        section.text.append(f"Not run: `{python} -m launcher.tiny_model` failed.")
        return section
    workdir = opts.workdir / "s7"
    fleet = VllmFleet([VllmReplica(model_dir, python, 2, workdir) for _ in range(2)])
    duration = 10.0 if opts.quick else S7_MIX.duration
    async with started(fleet):
        capacity = await _probe_capacity(fleet, duration=5.0)
        mix = replace(
            S7_MIX, seed=opts.seed, duration=duration,
            rate=max(0.2, 0.6 * capacity / S7_MIX.mean_tokens(S7_MIX.short_tokens[1])),
        )  # fmt: skip
        schedule = make_schedule(mix)
        section.text.append(
            f"2 real vLLM CPU replicas ({python}) of launcher.tiny_model's random-weight Llama, "
            "started with launcher.vllm_cpu's settings. A 5 s probe at 8 in flight measured "
            f"{capacity:.0f} output tok/s "
            f"for the pair; Poisson arrivals at {mix.rate:.2f} req/s (about 60% of that) for "
            f"{mix.duration:g} s, seed {mix.seed}; {1 - mix.long_fraction:.0%} of requests want "
            f"{mix.short_tokens[0]}-{mix.short_tokens[1]} tokens, {mix.long_fraction:.0%} "
            f"{mix.long_tokens[0]}-{mix.long_tokens[1]}; prompts {mix.prompt_words[0]}-"
            f"{mix.prompt_words[1]} words; 90% streamed. The random model may stop early (EOS), "
            "so tokens/s counts what it produced."
        )
        for key in _line_up(opts, S7_PEERS, S7_QUICK):
            section.runs.append(await measure(key, opts, fleet, open_loop(schedule, TINY_MODEL)))
    section.tables.append(latency_table(section.runs, ["r1", "r2"], duration))
    return section


async def _probe_capacity(fleet: VllmFleet, duration: float) -> float:
    """Output tokens/s the replicas reach together at 8 requests in flight (round robin)."""

    def spec(index: int) -> RequestSpec:
        return RequestSpec(index, 0.0, f"probe {index}: tell a story", 64, stream=True)

    records = await run_closed_loop(
        RoundRobinTarget(fleet.urls), spec, TINY_MODEL, concurrency=8, duration=duration
    )
    return summarize(records).tokens_per_s


# -- registry -------------------------------------------------------------------------------

Scenario = Callable[[Options], Coroutine[Any, Any, Section]]

#: Every scenario by its key on the command line; --quick runs QUICK_DEFAULT unless told.
SCENARIOS: dict[str, Scenario] = {
    "1": scenario_1,
    "2": scenario_2,
    "3": scenario_3,
    "4": scenario_4,
    "5": scenario_5,
    "6": scenario_6,
    "7": scenario_7,
}


def finish(section: Section) -> Section:
    """Keep the numbers later summaries need (`facts`) and each router's version."""
    for run in section.runs:
        section.versions.setdefault(run.name, run.version)
        section.settings.setdefault(run.name, run.settings)
        if run.unavailable:
            continue
        s = run.summary
        name = run.name
        if "concurrency" in run.extra:
            name = f"{run.name} @{int(run.extra['concurrency'])}"
        section.facts[name] = {
            "latency_mean": s.latency_mean,
            "latency_p50": s.latency_p50,
            "latency_p99": s.latency_p99,
            "ttft_p50": s.ttft_p50,
            "ttft_p99": s.ttft_p99,
            "errors": float(s.errors),
            "requests": float(s.requests),
            "tokens_per_s": s.tokens_per_s,
            "requests_per_s": s.requests_per_s,
            "cpu_ms_per_request": run.cpu_ms_per_request,
            "last_replica_share": run.shares[-1] if run.shares else math.nan,
        }
    return section


HEADLINE_ROUTERS = (
    ("ideal (client JSQ)", "ideal: client-side least-busy, no proxy"),
    ("direct round-robin", "client-side round robin, no proxy"),
    ("ours cost", "ours, cost (the default)"),
    ("ours least-busy", "ours, least-busy"),
    ("ours round-robin", "ours, round-robin"),
)


def headline(s1: Section | None, s5: Section | None) -> Table:
    """Routed vs direct, least-busy vs round robin, one replica at half speed (S1 + S5)."""
    headers = [
        "",
        "p50 latency (s)",
        "p99 latency (s)",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "errors",
        "share of the ½-speed replica",
        "added p50/p99 (ms), 1 in flight",
        "added p50/p99 (ms), 64 in flight",
        "router CPU ms/req",
    ]
    rows = []
    for name, label in HEADLINE_ROUTERS:
        f1 = s1.facts.get(name) if s1 else None
        c1 = s5.facts.get(f"{name} @1") if s5 else None
        c64 = s5.facts.get(f"{name} @64") if s5 else None
        if f1 is None and c1 is None:
            continue
        row = [label]
        if f1 is not None:
            row += [
                fmt_s(f1["latency_p50"]),
                fmt_s(f1["latency_p99"]),
                fmt_ms(f1["ttft_p50"]),
                fmt_ms(f1["ttft_p99"]),
                f"{f1['errors']:.0f}",
                fmt_pct(f1["last_replica_share"]),
            ]
        else:
            row += ["-"] * 6
        if name.startswith("ours") and s5 is not None:
            base1 = s5.facts.get("direct round-robin @1")
            base64 = s5.facts.get("direct round-robin @64")
            row.append(_added_pair(c1, base1))
            row.append(_added_pair(c64, base64))
            cpu = (c64 or {}).get("cpu_ms_per_request", math.nan)
            row.append("-" if math.isnan(cpu) else f"{cpu:.2f}")
        elif name == "direct round-robin" and s5 is not None:
            row += ["0 / 0 (baseline)", "0 / 0 (baseline)", "-"]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    return Table(headers, rows)


def _added_pair(run: dict[str, float] | None, base: dict[str, float] | None) -> str:
    if run is None or base is None:
        return "-"
    return (
        f"{_added(run['latency_p50'], base['latency_p50'])} / "
        f"{_added(run['latency_p99'], base['latency_p99'])}"
    )


QUICK_DEFAULT = ("1", "5")
#: Scenario 7 needs real vLLM and a few minutes more: run it by name (`--scenarios 7`).
FULL_DEFAULT = ("1", "2", "3", "4", "5", "6")
