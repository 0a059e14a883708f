"""Scenario 9: multi-turn chats that resend their history, over the replicas of scenario 8."""

from __future__ import annotations

from bench.fmt import fmt_ms, fmt_pct
from bench.load import ConversationMix, RequestSpec, make_conversation_schedule
from bench.prefix_oracle import best_hit_rate, reply_text
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
from bench.section import PeerRun, Section

KEY = "9"
PEERS = (
    "ideal", "chash", "sglang-ca", "vllm-ca", "ours-cost", "ours-cost-x2", "ours-cost-x2-peered",
)  # fmt: skip
QUICK_PEERS = ("ideal", "ours-cost")


def mix(opts: Options) -> ConversationMix:
    """The traffic before `at_load` sets its rate (to 70 % of the uncached capacity)."""
    return ConversationMix(
        rate=2.5, duration=12.0 if opts.quick else 40.0, seed=opts.seed, think_s=(2.0, 5.0)
    )


def conversations(traffic: ConversationMix) -> list[RequestSpec]:
    return make_conversation_schedule(traffic, reply_text)


def multi_turn_targets(runs: list[PeerRun], best: float) -> list[TargetCheck]:
    """Issue 17's multi-turn targets for `ours-cost` against the others of the same run."""
    got = by_key(runs)
    ours, sglang = got.get("ours-cost"), got.get("sglang-ca")
    if ours is None:
        return [TargetCheck("our router ran", "it did not", False)]
    rate = cache_use(ours).hit_rate
    out = [
        TargetCheck(
            "hit rate >= 90 % of the best possible",
            f"{fmt_pct(rate)} of {fmt_pct(best)} = {fmt_pct(rate / best)}",
            rate >= 0.9 * best,
        )
    ]
    if sglang is None:
        out.append(TargetCheck("TTFT p99 <= sglang-router cache_aware's", "it did not run", None))
    else:
        o, g = ours.summary, sglang.summary
        out.append(
            TargetCheck(
                "TTFT p99 <= sglang-router cache_aware's",
                f"{fmt_ms(o.ttft_p99)} ms vs {fmt_ms(g.ttft_p99)} ms",
                o.ttft_p99 <= g.ttft_p99,
            )
        )
    return out


async def run_scenario(opts: Options) -> Section:
    traffic, schedule = at_load(conversations, mix(opts))
    best = best_hit_rate(schedule, BLOCK_SIZE, REPLICAS * KV_CACHE_TOKENS // BLOCK_SIZE)
    chats = len({s.group for s in schedule})
    load = offered_load(schedule, traffic.duration)
    section = Section(KEY, "Multi-turn chats that resend their history")
    section.text.append(
        setting_text(
            f"{chats} conversations (Poisson starts, {traffic.rate:g}/s for "
            f"{traffic.duration:g} s, seed {traffic.seed}), {len(schedule)} requests: each "
            f"conversation opens with one of {traffic.system_prompts} system prompts of "
            f"~{traffic.system_tokens} tokens and a first message of "
            f"{traffic.first_tokens[0]}-{traffic.first_tokens[1]} tokens, then "
            f"{traffic.turns[0]}-{traffic.turns[1]} turns in all (cut at the end of the run), "
            f"each sending the whole chat so far (with the replies of {traffic.output_tokens[0]}-"
            f"{traffic.output_tokens[1]} tokens exactly as the replicas gave them: the "
            "simulator's answer is fixed by the chat) and a new message of "
            f"{traffic.turn_tokens[0]}-{traffic.turn_tokens[1]} tokens, "
            f"{traffic.think_s[0]:g}-{traffic.think_s[1]:g} s after the previous turn was sent "
            f"and never before it was answered; streamed. Offered load {fmt_pct(load)} of what "
            "the replicas serve with nothing cached (the simulator's engine run offline, "
            "launcher.sim.capacity).",
            best,
        )
    )
    section.runs += await measure_line_up(opts, "s9", PEERS, QUICK_PEERS, schedule)
    section.tables.append(prefix_table(section.runs, best))
    section.tables.append(targets_table(multi_turn_targets(section.runs, best)))
    return section
