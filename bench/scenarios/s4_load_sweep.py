"""Scenario 4: throughput and p99 against offered load on the heterogeneous fleet."""

from __future__ import annotations

from bench.fmt import fmt_ms, fmt_s
from bench.load import make_schedule
from bench.replicas import SimFleet
from bench.scenarios.harness import Options, line_up, measure, open_loop, started
from bench.scenarios.heterogeneous import HETEROGENEOUS, LOAD, base_mix, setting_text
from bench.section import Plot, Section, Table
from bench.stats import window_tokens_per_s

KEY = "4"

#: The ideal, our default policy and a blind one (scenario 1 shows every router at 70%).
PEERS = ("ideal", "ours-cost", "ours-rr")
QUICK_PEERS = ("ours-lb", "ours-rr")
LOADS = (0.4, LOAD, 0.95)
LOADS_QUICK = (0.5, 0.9)


async def run_scenario(opts: Options) -> Section:
    loads = LOADS_QUICK if opts.quick else LOADS
    section = Section("4", "Load sweep: throughput and p99 against offered load")
    mix0 = base_mix(opts)
    section.text.append(
        setting_text(mix0, HETEROGENEOUS).split(" Poisson")[0]
        + f" Offered load {', '.join(f'{x:.0%}' for x in loads)} of the measured capacity, "
        f"{mix0.duration:g} s each, otherwise scenario 1's traffic (same seed at every load). "
        "A router's point at scenario 1's load is its scenario 1 run when both ran together."
    )
    fleet = SimFleet.of(HETEROGENEOUS, opts.workdir / "s4", opts.python)
    throughput: dict[str, list[tuple[float, float]]] = {}
    p99: dict[str, list[tuple[float, float]]] = {}
    headers = ["router", *[f"{x:.0%}: tok/s / p99 (s) / p99 ms/token / errors" for x in loads]]
    rows: list[list[str]] = []
    async with started(fleet):
        for key in line_up(opts, PEERS, QUICK_PEERS):
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
            xlabel="offered load (% of measured capacity)",
            ylabel="output tokens/s delivered in the load window",
            series2=p99,
            ylabel2="p99 latency / output tokens (ms)",
        )
    )
    return section
