"""What the prefix index costs the router: CPU per request with 4,000-token prompts at 64 in
flight, our cost policy with the index against the same router with the index stubbed out.

The replicas answer at once (0.1 ms steps), so the router's own work is what is measured. The
router has no switch for its index; `ours-cost-noindex` runs the same CLI with
`vllm_fleet.router.parse.request_prefix` returning no keys (bench.peers.OursPeer.command), so
nothing is hashed, matched or recorded. Both routers start once and keep running (as a
router in service does: its index full); a first round warms both and is not counted; then
they alternate, rounds of one short run each, to spread the machine's other load over both,
and the target reads the median of the rounds' ratios. A fresh router per run (the first
version) put each run's start-up and cold index in the figure and gave rounds from -20% to
+41% (bench/findings.md). CPU is utime + stime of the router's process tree per completed
request.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from bench.load import RequestRecord, RequestSpec, Target, request_body, run_closed_loop
from bench.peers import Peer, PeerUnavailable, make_peer
from bench.replicas import SimFleet, SimSettings
from bench.scenarios.harness import MODEL, Options, RunLoad, started, timed_run
from bench.scenarios.prefix import TargetCheck
from bench.section import PeerRun, Table
from vllm_fleet.router.prefix_index import ReplicaPrefixes, request_prefix

PROMPT_TOKENS = 4000
CONCURRENCY = 64
GROUPS = 64
#: Replicas that answer at once, with room for 256 running 4,000-token prompts.
INSTANT_LONG = SimSettings(
    model=MODEL,
    max_num_seqs=256,
    step_ms=0.1,
    batch_slowdown=0.0,
    kv_cache_tokens=1 << 21,
    max_model_len=8192,
)
OUTPUT_TOKENS = 16
#: The target: the index may add this fraction to the router's CPU per request.
LIMIT = 0.10


def long_prompt_spec(index: int) -> RequestSpec:
    """One of 64 shared 3,900-token prefixes and a fresh ~100-token question (~16 KB of
    text): the index hashes ~125 blocks per request and finds most of them held."""
    group = index % GROUPS
    rng = random.Random(group)
    system = f"System prompt {group}: " + " ".join(
        rng.choice(("fleet", "router", "token", "cache", "prefix")) for _ in range(2600)
    )
    question = f"Question {index}: " + " ".join(["why", "is", "the", "sky", "blue"] * 16)
    messages = (("system", system[: 4 * (PROMPT_TOKENS - 100)]), ("user", question))
    return RequestSpec(index, 0.0, question, OUTPUT_TOKENS, True, messages=messages)


@dataclass(frozen=True)
class Overhead:
    table: Table
    target: TargetCheck
    text: str


def index_work_ms(requests: int = 2000, replicas: int = 2) -> float:
    """CPU ms per request of the index's own work, timed in this process: the prefix keys of
    the parsed body (vllm_fleet.router.parse does this for every request), one match per
    replica (the cost policy prices each) and the record at the chosen one. A steadier figure than
    the difference of two router runs on a shared machine."""
    records = [ReplicaPrefixes() for _ in range(replicas)]
    bodies = [request_body(long_prompt_spec(i), MODEL) for i in range(requests)]
    started = time.process_time()
    for i, body in enumerate(bodies):
        keys = request_prefix(MODEL, body)
        for record in records:
            record.cached_tokens(keys)
        records[i % replicas].record(keys, float(i))
    return 1000 * (time.process_time() - started) / requests


def cpu_per_request(runs: list[PeerRun]) -> float:
    """Router CPU ms per request over several runs of one router (total CPU / total requests)."""
    cpu = sum(r.cpu_s or 0.0 for r in runs)
    requests = sum(len(r.records) for r in runs)
    return 1000 * cpu / requests if requests else float("nan")


async def alternate(
    keys: list[str], opts: Options, fleet: SimFleet, run: RunLoad, rounds: int
) -> dict[str, list[PeerRun]]:
    """Start each router once, run a warm-up round through each (not kept), then ``rounds``
    rounds in which each runs the load once, in turn; stop them however it ends. A router
    that did not start has one unavailable run."""
    peers: dict[str, Peer] = {}
    runs: dict[str, list[PeerRun]] = {key: [] for key in keys}
    try:
        for key in keys:
            peer = make_peer(key, opts.workdir / "peers", opts.python)
            try:
                await peer.start(fleet.urls)
            except PeerUnavailable as exc:
                failed = PeerRun(key, peer.name, peer.settings, peer.version())
                failed.unavailable = str(exc)
                runs[key].append(failed)
                continue
            peers[key] = peer
        for round_ in range(rounds + 1):
            for key, peer in peers.items():
                await fleet.wait_idle()
                result = PeerRun(key, peer.name, peer.settings, peer.version())
                await timed_run(peer, run, result)
                if round_:  # round 0 warms up: the index fills, the router's caches too
                    runs[key].append(result)
    finally:
        for peer in peers.values():
            peer.stop()
    return runs


def round_ratios(on: list[PeerRun], off: list[PeerRun]) -> list[float]:
    """CPU per request with the index over without it, round by round (runs that did not
    start, or ran no request, are left out with their pair)."""
    ratios = []
    for a, b in zip(on, off, strict=False):
        if a.unavailable or b.unavailable or not a.records or not b.records:
            continue
        without = cpu_per_request([b])
        if without > 0:
            ratios.append(cpu_per_request([a]) / without)
    return ratios


async def index_overhead(opts: Options) -> Overhead:
    duration = 2.0 if opts.quick else 4.0
    # Rounds of one run each, alternating; the target reads the median of the rounds' ratios,
    # so one run slowed by the machine does not decide it (two rounds of totals gave -1 %,
    # +3 % and +16 % in three benchmark runs of the same router, bench/findings.md).
    rounds = 1 if opts.quick else 9

    async def closed(target: Target, peer: Peer) -> list[RequestRecord]:
        return await run_closed_loop(
            target, long_prompt_spec, MODEL, concurrency=CONCURRENCY, duration=duration
        )

    run: RunLoad = closed
    fleet = SimFleet.of([INSTANT_LONG, INSTANT_LONG], opts.workdir / "s8-cpu", opts.python)
    async with started(fleet):
        runs = await alternate(["ours-cost", "ours-cost-noindex"], opts, fleet, run, rounds)
    rows = []
    per_request: dict[str, float] = {}
    for key, done in runs.items():
        ran = [r for r in done if not r.unavailable]
        if not ran:
            rows.append([done[0].name, "not started", "", "", ""])
            continue
        per_request[key] = cpu_per_request(ran)
        requests = sum(len(r.records) for r in ran)
        errors = sum(r.summary.errors for r in ran)
        rate = sum(r.summary.requests_per_s for r in ran) / len(ran)
        rows.append(
            [ran[0].name, str(requests), str(errors), f"{rate:.0f}", f"{per_request[key]:.2f}"]
        )
    table = Table(
        ["router", "requests", "errors", "requests/s", "router CPU ms/req"],
        rows,
        title=f"Router CPU with {PROMPT_TOKENS:,}-token prompts at {CONCURRENCY} in flight",
    )
    work = index_work_ms()
    on, off = per_request.get("ours-cost"), per_request.get("ours-cost-noindex")
    ratios = round_ratios(runs["ours-cost"], runs["ours-cost-noindex"])
    if on is None or off is None or not ratios:
        target = TargetCheck("prefix index adds <= 10 % router CPU per request", "not run", None)
    else:
        added = statistics.median(ratios) - 1
        spread = f"{min(ratios) - 1:+.1%} to {max(ratios) - 1:+.1%}"
        target = TargetCheck(
            "prefix index adds <= 10 % router CPU per request "
            f"({PROMPT_TOKENS:,}-token prompts, {CONCURRENCY} in flight)",
            f"{on:.2f} vs {off:.2f} ms/req without it; median of {len(ratios)} rounds "
            f"{added:+.1%} ({spread}) (the index's own work timed alone: {work:.3f} ms/req = "
            f"{work / off:.1%} of the router without it)",
            added <= LIMIT,
        )
    text = (
        f"Router CPU check: 2 simulated replicas that answer at once (0.1 ms steps), closed "
        f"loop at {CONCURRENCY} in flight for {duration:g} s per run; both routers started "
        f"once, a warm-up round not counted, then {rounds} round(s) of one run each, "
        f"alternating (the target: the median of the rounds' ratios); prompts "
        f"are one of {GROUPS} shared ~{PROMPT_TOKENS - 100:,}-token system "
        f"prompts and a ~100-token question ({OUTPUT_TOKENS} tokens out, streamed). "
        '"prefix index off" is the same router with `vllm_fleet.router.parse.request_prefix` '
        "stubbed to return no keys (the router has no flag for it). CPU is utime+stime of the "
        "router's process tree per request; the load generator and replicas share the cores, "
        "so the difference of two runs is noisy: the target's row also gives the index's own "
        "work (keys of the parsed body, a match per replica, the record) timed alone in the "
        f"benchmark's process: {work:.3f} ms per request."
    )
    return Overhead(table, target, text)
