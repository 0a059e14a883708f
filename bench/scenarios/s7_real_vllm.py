"""Scenario 7: two real vLLM replicas of the tiny model on the CPU."""

from __future__ import annotations

from dataclasses import replace

from bench.load import RequestMix, RequestSpec, RoundRobinTarget, make_schedule, run_closed_loop
from bench.replicas import TINY_MODEL, VllmFleet, VllmReplica
from bench.scenarios.harness import Options, line_up, measure, open_loop, started, tiny_vllm
from bench.scenarios.tables import latency_table
from bench.section import Section
from bench.stats import summarize

KEY = "7"
PEERS = ("direct-rr", "ours-lb", "ours-cost", "nginx-lc", "vllm-ca")
QUICK_PEERS = ("direct-rr", "ours-lb", "nginx-lc", "vllm-ca")
#: Small requests: the tiny model's context is 1024 tokens and a CPU decodes slowly.
MIX = RequestMix(
    rate=1.0, duration=20.0, short_tokens=(8, 32), long_tokens=(64, 128), prompt_words=(8, 64)
)


async def run_scenario(opts: Options) -> Section:
    section = Section("7", "Real vLLM on the CPU: two replicas of the tiny model")
    found = await tiny_vllm(opts)
    if isinstance(found, str):
        section.text.append(found)
        return section
    python, model_dir = found
    workdir = opts.workdir / "s7"
    fleet = VllmFleet([VllmReplica(model_dir, python, 2, workdir) for _ in range(2)])
    duration = 10.0 if opts.quick else MIX.duration
    async with started(fleet):
        capacity = await _probe_capacity(fleet, duration=5.0)
        mix = replace(
            MIX, seed=opts.seed, duration=duration,
            rate=max(0.2, 0.6 * capacity / MIX.mean_tokens(MIX.short_tokens[1])),
        )  # fmt: skip
        schedule = make_schedule(mix)
        section.text.append(
            f"2 real vLLM CPU replicas ({python}) of launcher.tiny_model's random-weight Llama, "
            "started with the command line the planner gives `up`. A 5 s probe at 8 in flight "
            f"measured {capacity:.0f} output tok/s for the pair; Poisson arrivals at "
            f"{mix.rate:.2f} req/s (about 60% of that) for "
            f"{mix.duration:g} s, seed {mix.seed}; {1 - mix.long_fraction:.0%} of requests want "
            f"{mix.short_tokens[0]}-{mix.short_tokens[1]} tokens, {mix.long_fraction:.0%} "
            f"{mix.long_tokens[0]}-{mix.long_tokens[1]}; prompts {mix.prompt_words[0]}-"
            f"{mix.prompt_words[1]} words; 90% streamed. The random model may stop early (EOS), "
            "so tokens/s counts what it produced."
        )
        for key in line_up(opts, PEERS, QUICK_PEERS):
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
