"""Scenario 12: shared prefixes on real vLLM. Two CPU replicas of the tiny model, chats that
open with one of a few system prompts, requests overlapping: the replicas' own prefix-cache
counters say which router put repeats where their prefix was cached.

The simulated prefix scenarios (8-10) measure placement against a model of vLLM's cache; this
one checks the same claim against vLLM itself, including our router as `vllm-fleet up` starts
it (`--kv-events auto`: precise matching by vLLM's KV events and block hashes), which needs
the model's tokenizer and so cannot run against the simulator.
"""

from __future__ import annotations

from dataclasses import replace

from bench.fmt import fmt_ms, fmt_pct, fmt_s
from bench.load import PrefixMix, make_prefix_schedule
from bench.replicas import TINY_MODEL, VllmFleet, VllmReplica
from bench.scenarios.harness import Options, line_up, started, tiny_vllm
from bench.scenarios.prefix import TargetCheck, by_key, cache_use, measure_cached, targets_table
from bench.scenarios.tables import not_started_row
from bench.section import PeerRun, Section, Table

KEY = "12"
PEERS = ("direct", "chash", "ideal", "sglang-ca", "vllm-ca", "ours-cost", "ours-cost-precise")
QUICK_PEERS = ("direct", "ours-cost", "ours-cost-precise")
#: The run whose hit rate is the best possible: every request to one replica, whose cache
#: holds every prompt, so only what no earlier request sent misses.
BEST = "direct"
#: 12 system prompts of ~200 estimated tokens (~500 of the tiny model's byte-level tokens:
#: 3-4 of its 128-token CPU blocks), a 16-32-token question, 8-24 tokens out; the tiny
#: model's context is 1,024 tokens.
MIX = PrefixMix(
    rate=2.0, duration=40.0, groups=12, prefix_tokens=200, question_tokens=(16, 32),
    output_tokens=(8, 24),
)  # fmt: skip


async def run_scenario(opts: Options) -> Section:
    section = Section(KEY, "Shared prefixes on real vLLM: two CPU replicas of the tiny model")
    found = await tiny_vllm(opts)
    if isinstance(found, str):
        section.text.append(found)
        return section
    python, model_dir = found
    workdir = opts.workdir / "s12"
    replicas = [VllmReplica(model_dir, python, 2, workdir, dev_mode=True) for _ in range(2)]
    fleet = VllmFleet(replicas)
    mix = replace(MIX, seed=opts.seed, duration=15.0 if opts.quick else MIX.duration)
    schedule = make_prefix_schedule(mix)
    # Our routers run on the vLLM interpreter, which has the tokenizer library precise
    # matching loads (`vllm-fleet up` runs the router from the same environment as vLLM).
    ours = replace(opts, python=python)
    async with started(fleet):
        for key in line_up(opts, PEERS, QUICK_PEERS):
            run_opts = ours if key.startswith("ours") else opts
            section.runs.append(await measure_cached(key, run_opts, fleet, schedule, TINY_MODEL))
    section.text.append(
        f"2 real vLLM CPU replicas ({python}) of launcher.tiny_model's random-weight Llama, "
        "started with the command line the planner gives `up` (KV events and their replay "
        "socket published) in dev mode, so that `POST /reset_prefix_cache` empties both "
        f"caches before each router's run. {len(schedule)} requests (Poisson, {mix.rate:g}/s "
        f"for {mix.duration:g} s, seed {mix.seed}), each a chat of one of {mix.groups} system "
        f"prompts (~{4 * mix.prefix_tokens} bytes: ~500 tokens of the tiny model's byte-level "
        f"tokenizer, 3-4 of its 128-token blocks) and a fresh question, "
        f"{mix.output_tokens[0]}-{mix.output_tokens[1]} tokens out, streamed. **Hit rate** is "
        "the replicas' own `vllm:prefix_cache_hits_total / queries_total` over the run. "
        "**Best possible** is measured the same way: every request sent to one replica "
        "(`direct`), whose cache holds every prompt, so only what no earlier request sent "
        "misses. Client-side picks, no proxy: consistent hashing by system prompt with "
        "bounded load (`chash`) and the least-busy ideal (exact in-flight counts: what "
        "ignoring the cache gives). Two replicas on two cores are not faster than one, so "
        "`direct`'s latency is no floor here: latencies compare the routers with each other. "
        "`ours cost, precise` runs once `/fleet/replicas` shows its subscribers caught up and "
        "the model's tokenizer loaded (importing transformers: seconds of CPU, once, at the "
        "router's start; every peer is started before its run)."
    )
    section.tables.append(real_prefix_table(section.runs))
    section.tables.append(targets_table(real_prefix_targets(section.runs)))
    return section


def real_prefix_table(runs: list[PeerRun]) -> Table:
    """One row per router: the replicas' hit rate, its share of the best, latency, CPU."""
    best = by_key(runs).get(BEST)
    best_rate = cache_use(best).hit_rate if best is not None else None
    headers = [
        "router", "requests", "errors", "hit rate", "of best possible", "latency mean (s)",
        "p99 (s)", "TTFT p50 (ms)", "TTFT p99 (ms)", "share r1", "share r2", "router CPU ms/req",
    ]  # fmt: skip
    rows = []
    for run in runs:
        if run.unavailable:
            rows.append(not_started_row(run, len(headers)))
            continue
        s, rate = run.summary, cache_use(run).hit_rate
        rows.append(
            [
                run.name, str(s.requests), str(s.errors), fmt_pct(rate),
                fmt_pct(rate / best_rate) if best_rate else "-",
                fmt_s(s.latency_mean), fmt_s(s.latency_p99), fmt_ms(s.ttft_p50),
                fmt_ms(s.ttft_p99), *[fmt_pct(x) for x in run.shares],
                "-" if run.cpu_s is None else f"{run.cpu_ms_per_request:.2f}",
            ]
        )  # fmt: skip
    return Table(headers, rows)


def real_prefix_targets(runs: list[PeerRun]) -> list[TargetCheck]:
    """Our two routers' hit rates against the best possible and the cache-aware peers."""
    got = by_key(runs)
    best = got.get(BEST)
    out = []
    for key in ("ours-cost", "ours-cost-precise"):
        run = got.get(key)
        if run is None:
            out.append(TargetCheck(f"{key} ran", "it did not", False))
            continue
        rate = cache_use(run).hit_rate
        if best is not None:
            top = cache_use(best).hit_rate
            out.append(
                TargetCheck(
                    f"{run.name}: hit rate >= 95 % of the best possible",
                    f"{fmt_pct(rate)} of {fmt_pct(top)}",
                    rate >= 0.95 * top,
                )
            )
        for peer in ("sglang-ca", "vllm-ca"):
            other = got.get(peer)
            out.append(
                TargetCheck(
                    f"{run.name}: hit rate >= {peer}'s",
                    "it did not run"
                    if other is None
                    else f"{fmt_pct(rate)} vs {fmt_pct(cache_use(other).hit_rate)}",
                    None if other is None else rate >= cache_use(other).hit_rate,
                )
            )
    return out
