"""What the prefix-cache scenarios (8 shared prefix, 9 multi-turn, 10 Zipf-skewed groups) share:
the replicas, one run per router from an empty cache, the replicas' own hit rate, and tables
that put each hit rate next to the best the request sequence allows (bench.prefix_oracle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from bench.fmt import fmt_ms, fmt_pct, fmt_s
from bench.load import ConversationMix, PrefixMix, RequestSpec
from bench.prefix_oracle import prompt_ids
from bench.replicas import PrefixFleet, SimFleet, SimSettings
from bench.scenarios.harness import MODEL, Options, line_up, measure, open_loop, started
from bench.scenarios.tables import not_started_row
from bench.section import PeerRun, Table
from vllm_fleet.launcher.sim.capacity import saturation_rps
from vllm_fleet.launcher.sim.config import BATCH_SLOWDOWN, SimConfig

Mix = TypeVar("Mix", PrefixMix, ConversationMix)

#: 4 replicas of the simulator with vLLM V1's prefix cache: 8 ms steps of up to 16 requests,
#: the prefill and attention costs in the simulator's measured shape (docs/simulator.md).
REPLICAS = 4
#: KV capacity: 32 of scenario 8's 64 system prompts (~1,530 tokens each with the chat
#: template's), so one replica can hold about half of them and the fleet all of them twice.
KV_CACHE_TOKENS = 49_152
BLOCK_SIZE = 16
PREFIX_REPLICA = SimSettings(
    model=MODEL,
    max_num_seqs=16,
    step_ms=8.0,
    batch_slowdown=BATCH_SLOWDOWN,
    kv_cache_tokens=KV_CACHE_TOKENS,
    max_model_len=8192,
)
LABELS = tuple(f"r{i}" for i in range(REPLICAS))


def uncached_capacity(schedule: Sequence[RequestSpec]) -> float:
    """Requests per second the fleet completes with the whole sequence queued at once and
    nothing cached: the simulator's own engine run offline (vllm_fleet.launcher.sim.capacity) with
    prefix caching off, times the replicas. What "load" means in the scenarios' text."""
    settings = PREFIX_REPLICA
    config = SimConfig(
        model=settings.model,
        max_num_seqs=settings.max_num_seqs,
        step_ms=settings.step_ms,
        batch_slowdown=settings.batch_slowdown,
        kv_cache_tokens=KV_CACHE_TOKENS,
        max_model_len=8192,
        enable_prefix_caching=False,
    )
    requests = [(prompt_ids(s), s.max_tokens or 1) for s in schedule]
    return REPLICAS * saturation_rps(config, requests)


def offered_load(schedule: Sequence[RequestSpec], duration: float) -> float:
    """The sequence's request rate as a fraction of `uncached_capacity`."""
    return len(schedule) / duration / uncached_capacity(schedule)


#: The offered load of every prefix scenario, as a fraction of `uncached_capacity`.
LOAD = 0.70


def at_load(
    make: Callable[[Mix], list[RequestSpec]], mix: Mix, load: float = LOAD
) -> tuple[Mix, list[RequestSpec]]:
    """`mix` with its rate scaled so the sequence offers `load` of `uncached_capacity`, and
    that sequence. The capacity depends on the requests' shape, not their rate, so one pilot
    sequence at `mix.rate` gives the factor; the simulator's calibration can change without
    the scenarios' rates going stale."""
    pilot = offered_load(make(mix), mix.duration)
    scaled = replace(mix, rate=round(mix.rate * load / pilot, 2))
    return scaled, make(scaled)


def prefix_fleet(opts: Options, name: str) -> SimFleet:
    return SimFleet.of([PREFIX_REPLICA] * REPLICAS, opts.workdir / name, opts.python)


@dataclass(frozen=True)
class CacheUse:
    """Prefix-cache tokens the replicas counted during one run (their counters' deltas)."""

    hits: float
    queries: float

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else math.nan


async def measure_cached(
    key: str, opts: Options, fleet: PrefixFleet, schedule: list[RequestSpec], model: str = MODEL
) -> PeerRun:
    """One router through `schedule`, starting from empty prefix caches (so no router finds
    what the one before it left); the replicas' hit and query counters are kept in
    `run.extra` as `cache_hits` and `cache_queries`."""
    await fleet.wait_idle()
    await fleet.reset_prefix_caches()
    before = await fleet.prefix_counters()
    run = await measure(key, opts, fleet, open_loop(schedule, model))
    if run.unavailable:
        return run
    await fleet.wait_idle()
    after = await fleet.prefix_counters()
    run.extra["cache_hits"] = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    run.extra["cache_queries"] = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    use = cache_use(run)
    print(f"  {run.name}: prefix-cache hit rate {use.hit_rate:.1%}", flush=True)
    return run


async def measure_line_up(
    opts: Options,
    name: str,
    peers: Sequence[str],
    quick_peers: Sequence[str],
    schedule: list[RequestSpec],
) -> list[PeerRun]:
    """Every router of the scenario's line-up through `schedule` on one prefix-caching fleet
    (started once, caches reset before each router: measure_cached)."""
    fleet = prefix_fleet(opts, name)
    async with started(fleet):
        return [
            await measure_cached(key, opts, fleet, schedule)
            for key in line_up(opts, peers, quick_peers)
        ]


def cache_use(run: PeerRun) -> CacheUse:
    return CacheUse(run.extra.get("cache_hits", 0.0), run.extra.get("cache_queries", 0.0))


def prefix_table(runs: Sequence[PeerRun], best: float) -> Table:
    """One row per router: the replicas' hit rate, its share of the best possible, latency."""
    headers = [
        "router",
        "requests",
        "errors",
        "hit rate",
        "of best possible",
        "latency mean (s)",
        "p50 (s)",
        "p99 (s)",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        *[f"share {label}" for label in LABELS],
        "router CPU ms/req",
    ]
    rows = []
    for run in runs:
        if run.unavailable:
            rows.append(not_started_row(run, len(headers)))
            continue
        s = run.summary
        rate = cache_use(run).hit_rate
        rows.append(
            [
                run.name,
                str(s.requests),
                str(s.errors),
                fmt_pct(rate),
                fmt_pct(rate / best) if best > 0 else "-",
                fmt_s(s.latency_mean),
                fmt_s(s.latency_p50),
                fmt_s(s.latency_p99),
                fmt_ms(s.ttft_p50),
                fmt_ms(s.ttft_p99),
                *[fmt_pct(x) for x in run.shares],
                "-" if run.cpu_s is None else f"{run.cpu_ms_per_request:.2f}",
            ]
        )
    return Table(headers, rows)


@dataclass(frozen=True)
class TargetCheck:
    """One target of issue 17: what it asks, what was measured, whether it was met."""

    text: str
    measured: str
    met: bool | None  # None: a router it compares with did not run


def targets_table(targets: Sequence[TargetCheck]) -> Table:
    rows = [
        [t.text, t.measured, "n/a" if t.met is None else ("met" if t.met else "NOT met")]
        for t in targets
    ]
    return Table(["target (issue 17)", "measured", "result"], rows, title="Targets")


def by_key(runs: Sequence[PeerRun]) -> dict[str, PeerRun]:
    """The runs that ran, by peer key."""
    return {run.key: run for run in runs if not run.unavailable and run.records}


def setting_text(traffic: str, best: float) -> str:
    """The paragraph that opens each prefix scenario: traffic, replicas, how hits are counted."""
    return (
        f"{traffic} {REPLICAS} simulated replicas (`vllm-fleet sim`: vLLM V1's prefix cache "
        f"with LRU eviction of {BLOCK_SIZE}-token blocks, chunked prefill under a 2,048-token "
        f"step budget, up to {PREFIX_REPLICA.max_num_seqs} running, "
        f"{PREFIX_REPLICA.step_ms:g} ms steps growing with the batch, the tokens computed and "
        f"the context read), each with a KV cache of {KV_CACHE_TOKENS:,} tokens. Every router "
        "gets the same seeded requests at the same offsets and starts from empty caches "
        "(`POST /reset_prefix_cache` on every replica before each run). **Hit rate** is the "
        "replicas' own `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` over "
        f"the run (tokens). **Best possible** ({fmt_pct(best)} for this sequence) is an oracle "
        "fleet whose caches are pooled into one LRU of the same total size, caching every "
        "prompt the moment it is sent: only each prefix's first request and what that LRU "
        "evicts miss (bench/prefix_oracle.py). Client-side picks (least-busy ideal, "
        "consistent hashing) have no proxy hop and no router CPU."
    )
