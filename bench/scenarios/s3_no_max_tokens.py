"""Scenario 3: half the requests omit max_tokens, so a router cannot read their cost."""

from __future__ import annotations

from bench.load import make_schedule
from bench.replicas import SimFleet
from bench.scenarios.harness import Options, line_up, measure, open_loop, started
from bench.scenarios.heterogeneous import HETERO_LABELS, HETEROGENEOUS, base_mix, setting_text
from bench.scenarios.tables import latency_table
from bench.section import Section
from vllm_fleet.launcher.sim.config import DEFAULT_CHAT_MAX_TOKENS

KEY = "3"

#: The target is "no worse than the least-busy ideal": the ideal runs the same traffic.
PEERS = ("ideal", "ours-cost", "ours-lb")
QUICK_PEERS = ("ours-lb", "ours-rr")


async def run_scenario(opts: Options) -> Section:
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
        for key in line_up(opts, PEERS, QUICK_PEERS):
            section.runs.append(await measure(key, opts, fleet, open_loop(schedule)))
    section.tables.append(latency_table(section.runs, HETERO_LABELS, mix.duration))
    return section
