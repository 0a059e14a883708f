"""Scenario 1: a heterogeneous fleet (one replica at half speed) at 70% load."""

from __future__ import annotations

from bench.load import make_schedule
from bench.replicas import SimFleet
from bench.scenarios.harness import Options, line_up, measure, open_loop, started
from bench.scenarios.heterogeneous import HETERO_LABELS, HETEROGENEOUS, LOAD, base_mix, setting_text
from bench.scenarios.tables import latency_table
from bench.section import Plot, Section

KEY = "1"
PEERS = (
    "ideal", "direct-rr", "ours-cost", "ours-cost-w2", "ours-lb", "ours-rr", "nginx-lc",
    "nginx-rr", "haproxy-lc", "vllm-rr", "vllm-p2", "vllm-ca", "sglang-rr", "sglang-ca",
)  # fmt: skip
QUICK_PEERS = ("ideal", "ours-lb", "ours-rr", "nginx-lc")


async def run_scenario(opts: Options) -> Section:
    mix = base_mix(opts)
    schedule = make_schedule(mix)
    section = Section("1", "Heterogeneous fleet (one replica at half speed)")
    section.text.append(setting_text(mix, HETEROGENEOUS))
    fleet = SimFleet.of(HETEROGENEOUS, opts.workdir / "s1", opts.python)
    async with started(fleet):
        for key in line_up(opts, PEERS, QUICK_PEERS):
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
