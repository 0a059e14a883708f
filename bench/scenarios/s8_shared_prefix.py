"""Scenario 8: shared prefixes. 64 system prompts of ~1,500 tokens, each request one of them and
a fresh question, over 4 replicas that can each cache about half of the prompts (issue 17)."""

from __future__ import annotations

from bench.fmt import fmt_ms, fmt_pct, fmt_s
from bench.load import PrefixMix, make_prefix_schedule
from bench.prefix_oracle import best_hit_rate
from bench.scenarios.harness import Options
from bench.scenarios.prefix import (
    BLOCK_SIZE,
    KV_CACHE_TOKENS,
    REPLICAS,
    TargetCheck,
    at_load,
    by_key,
    cache_use,
    measure_line_up,
    offered_load,
    prefix_table,
    setting_text,
    targets_table,
)
from bench.scenarios.prefix_overhead import index_overhead
from bench.section import PeerRun, Section

KEY = "8"
PEERS = (
    "ideal", "chash", "sglang-ca", "vllm-ca", "ours-cost", "ours-cost-x2", "ours-cost-x2-peered",
    "ours-cost-w2",
)  # fmt: skip
QUICK_PEERS = ("ideal", "ours-cost")


def mix(opts: Options) -> PrefixMix:
    """The traffic before `at_load` sets its rate (to 70 % of the uncached capacity)."""
    return PrefixMix(rate=10.0, duration=12.0 if opts.quick else 40.0, seed=opts.seed)


def shared_prefix_targets(runs: list[PeerRun], best: float) -> list[TargetCheck]:
    """Issue 17's shared-prefix targets for `ours-cost` against the others of the same run."""
    got = by_key(runs)
    ours, ideal, chash, sglang = (got.get(k) for k in ("ours-cost", "ideal", "chash", "sglang-ca"))
    if ours is None:
        return [TargetCheck("our router ran", "it did not", False)]
    o = ours.summary
    rate = cache_use(ours).hit_rate
    out = [
        TargetCheck(
            "hit rate >= 90 % of the best possible",
            f"{fmt_pct(rate)} of {fmt_pct(best)} = {fmt_pct(rate / best)}",
            rate >= 0.9 * best,
        )
    ]
    if ideal is not None:
        i = ideal.summary
        out.append(
            TargetCheck(
                "mean latency <= 0.80 x the least-busy ideal's",
                f"{fmt_s(o.latency_mean)} s vs 0.80 x {fmt_s(i.latency_mean)} s",
                o.latency_mean <= 0.8 * i.latency_mean,
            )
        )
        out.append(
            TargetCheck(
                "TTFT p99 <= the least-busy ideal's",
                f"{fmt_ms(o.ttft_p99)} ms vs {fmt_ms(i.ttft_p99)} ms",
                o.ttft_p99 <= i.ttft_p99,
            )
        )
    if chash is not None:
        c = chash.summary
        out.append(
            TargetCheck(
                "mean latency <= the consistent-hashing pick's",
                f"{fmt_s(o.latency_mean)} s vs {fmt_s(c.latency_mean)} s",
                o.latency_mean <= c.latency_mean,
            )
        )
    if sglang is not None:
        g = sglang.summary
        out.append(
            TargetCheck(
                "better than sglang-router cache_aware on mean, p99 and TTFT p99",
                f"mean {fmt_s(o.latency_mean)} vs {fmt_s(g.latency_mean)} s, p99 "
                f"{fmt_s(o.latency_p99)} vs {fmt_s(g.latency_p99)} s, TTFT p99 "
                f"{fmt_ms(o.ttft_p99)} vs {fmt_ms(g.ttft_p99)} ms",
                o.latency_mean < g.latency_mean
                and o.latency_p99 < g.latency_p99
                and o.ttft_p99 < g.ttft_p99,
            )
        )
    else:
        out.append(TargetCheck("better than sglang-router cache_aware", "it did not run", None))
    return out


async def run_scenario(opts: Options) -> Section:
    traffic, schedule = at_load(make_prefix_schedule, mix(opts))
    best = best_hit_rate(schedule, BLOCK_SIZE, REPLICAS * KV_CACHE_TOKENS // BLOCK_SIZE)
    section = Section(KEY, "Shared prefixes: 64 system prompts, fresh questions")
    section.text.append(
        setting_text(
            f"{len(schedule)} requests (Poisson, {traffic.rate:g}/s for {traffic.duration:g} s, "
            f"seed {traffic.seed}), each a chat of one of {traffic.groups} system prompts of "
            f"~{traffic.prefix_tokens} tokens (every group equally likely) and a fresh question "
            f"of {traffic.question_tokens[0]}-{traffic.question_tokens[1]} tokens, "
            f"{traffic.output_tokens[0]}-{traffic.output_tokens[1]} tokens out, streamed. "
            f"Offered load {fmt_pct(offered_load(schedule, traffic.duration))} of what the "
            "replicas serve with nothing cached (the simulator's engine run offline, "
            "launcher.sim.capacity).",
            best,
        )
    )
    section.runs += await measure_line_up(opts, "s8", PEERS, QUICK_PEERS, schedule)
    section.tables.append(prefix_table(section.runs, best))
    targets = shared_prefix_targets(section.runs, best)
    overhead = await index_overhead(opts)
    section.tables.append(overhead.table)
    targets.append(overhead.target)
    section.tables.append(targets_table(targets))
    section.text.append(overhead.text)
    return section
