"""Scenario 10: shared prefixes with Zipf-skewed groups, one much hotter than the rest: a
prefix-aware router must spread the hot group instead of queueing it on one replica."""

from __future__ import annotations

from bench.fmt import fmt_ms, fmt_pct
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
    measure_line_up,
    offered_load,
    prefix_table,
    setting_text,
    targets_table,
)
from bench.section import PeerRun, Section

KEY = "10"
PEERS = ("ideal", "chash", "sglang-ca", "ours-cost")
QUICK_PEERS = ("ideal", "ours-cost")
#: Group g is drawn with weight 1/(g+1)^1.4: of 64 groups the hottest gets ~38 % of the
#: requests, more than one of the 4 replicas can serve at this load.
ZIPF = 1.4


def mix(opts: Options) -> PrefixMix:
    """The traffic before `at_load` sets its rate (to 70 % of the uncached capacity)."""
    return PrefixMix(rate=10.0, duration=12.0 if opts.quick else 36.0, seed=opts.seed, zipf=ZIPF)


def zipf_targets(runs: list[PeerRun]) -> list[TargetCheck]:
    """Issue 17's Zipf target: no hot-spotting, TTFT p99 within 1.2 x the least-busy ideal's."""
    got = by_key(runs)
    ours, ideal = got.get("ours-cost"), got.get("ideal")
    if ours is None or ideal is None:
        return [TargetCheck("TTFT p99 <= 1.2 x the least-busy ideal's", "a run is missing", None)]
    o, i = ours.summary, ideal.summary
    return [
        TargetCheck(
            "TTFT p99 <= 1.2 x the least-busy ideal's (no hot-spotting)",
            f"{fmt_ms(o.ttft_p99)} ms vs 1.2 x {fmt_ms(i.ttft_p99)} ms",
            o.ttft_p99 <= 1.2 * i.ttft_p99,
        )
    ]


async def run_scenario(opts: Options) -> Section:
    traffic, schedule = at_load(make_prefix_schedule, mix(opts))
    best = best_hit_rate(schedule, BLOCK_SIZE, REPLICAS * KV_CACHE_TOKENS // BLOCK_SIZE)
    hottest = max(
        sum(1 for s in schedule if s.group == group) for group in {s.group for s in schedule}
    )
    load = offered_load(schedule, traffic.duration)
    section = Section(KEY, "Shared prefixes, one group much hotter than the rest (Zipf)")
    section.text.append(
        setting_text(
            f"Scenario 8's traffic with the {traffic.groups} groups drawn by Zipf's law "
            f"(weight 1/(g+1)^{traffic.zipf:g}): {len(schedule)} requests (Poisson, "
            f"{traffic.rate:g}/s for {traffic.duration:g} s, seed {traffic.seed}), the hottest "
            f"group {fmt_pct(hottest / len(schedule))} of them. Offered load {fmt_pct(load)} of "
            "what the replicas serve with nothing cached, so the hot group alone needs more "
            "than one replica.",
            best,
        )
    )
    section.runs += await measure_line_up(opts, "s10", PEERS, QUICK_PEERS, schedule)
    section.tables.append(prefix_table(section.runs, best))
    section.tables.append(targets_table(zipf_targets(section.runs)))
    return section
