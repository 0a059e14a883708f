"""Prefix-cache routing against real vLLM: two CPU replicas of the tiny model with prefix
caching (vLLM's default) and KV events on, a router subscribed to them (--kv-events auto).

- the router's block set per replica equals what the replica published (an independent
  subscriber's tally), and a reset of the replica's prefix cache empties both the block set
  and the router's approximate record;
- a shared-prefix run through the router gets a higher vllm:prefix_cache_hits rate than the
  same kind of run through a least-busy router;
- precise matching: for every request the router matched by vLLM's own block hashes (the tiny
  model's tokenizer and chat template, vllm_fleet.router.prompt_tokens), the prompt tokens it
  predicted cached on the replica it chose equal that replica's vllm:prefix_cache_hits delta.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from tests.e2e.support import (
    MODEL,
    ROUTER_READY_DEADLINE_S,
    VLLM_READY_DEADLINE_S,
    Server,
    get_json,
    http_get,
    shared_prefix_chat,
    start_router,
    start_server,
    stop_all,
    wait_ready,
    wait_until,
)
from tests.router.test_prefix_kv_events import independent_subscriber
from tests.support.ports import free_port_run
from vllm_fleet.launcher.commands.demo import tiny_cpu_plan
from vllm_fleet.launcher.commands.plan import host_cpus
from vllm_fleet.router.scrape import parse_vllm_metrics

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replicas_with_events(
    vllm_interpreter: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[tuple[Server, int]]]:
    """Two replicas from the planner's command line, which publishes KV events on a port per
    replica (vllm_fleet.launcher.vllm_args); dev mode for POST /reset_prefix_cache."""
    layout = tiny_cpu_plan(
        str(tiny_model), replicas=2, base_port=free_port_run(2), python=vllm_interpreter,
        cpus=host_cpus(), max_num_seqs=16,
    )  # fmt: skip
    logs = tmp_path_factory.mktemp("logs")
    started: list[tuple[Server, int]] = []
    try:
        for i, spec in enumerate(layout.replicas):
            assert spec.kv_events_port is not None
            env = {**spec.env, "VLLM_SERVER_DEV_MODE": "1"}
            server = start_server(f"vllm-{i}", spec.url, list(spec.command), env, logs)
            started.append((server, spec.kv_events_port))
        wait_ready([s for s, _ in started], "/health", VLLM_READY_DEADLINE_S)
        yield started
    finally:
        stop_all([s for s, _ in started])


def router_over(replicas: Sequence[Server], logs: Path, *flags: str, name: str) -> Server:
    server = start_router([s.url for s in replicas], logs, flags, name=name)
    wait_ready([server], "/ready", ROUTER_READY_DEADLINE_S)
    wait_until(
        lambda: sum(r["healthy"] for r in get_json(server.url + "/fleet/replicas")) == 2,
        ROUTER_READY_DEADLINE_S,
        "both replicas healthy in the router",
    )
    return server


async def shared_prefix_run(
    router: Server, groups: Sequence[int], questions: int, concurrency: int = 4
) -> None:
    """Every group's questions in a seeded random order, ``concurrency`` at a time."""
    jobs = [(g, q) for q in range(questions) for g in groups]
    random.Random(3).shuffle(jobs)
    async with AsyncOpenAI(
        base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        for start in range(0, len(jobs), concurrency):
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=MODEL,
                        messages=shared_prefix_chat(g, q),
                        max_tokens=2,
                    )
                    for g, q in jobs[start : start + concurrency]
                )
            )


def prefix_counters(replicas: Sequence[Server]) -> tuple[float, float]:
    """(hits, queries) summed over the replicas' vllm:prefix_cache_* counters."""
    hits = queries = 0.0
    for s in replicas:
        status, body = http_get(s.url + "/metrics")
        assert status == 200
        m = parse_vllm_metrics(body.decode())
        hits += m.prefix_cache_hits_total or 0.0
        queries += m.prefix_cache_queries_total or 0.0
    return hits, queries


def replica_rows(router: Server) -> dict[str, Any]:
    return {row["url"]: row for row in get_json(router.url + "/fleet/replicas")}


async def until(predicate: Callable[[], bool], deadline_s: float, what: str) -> None:
    """wait_until for async tests: the test's own subscribers run on this event loop, so
    the wait must yield to it (a blocking sleep would starve them)."""
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {deadline_s:.0f}s", pytrace=False)
        await asyncio.sleep(0.25)


def tokenizer_loaded(router: Server) -> bool:
    """Every replica's models have their tokenizer loaded in the router (/fleet/replicas)."""
    states = [v.get("tokenizers") or {} for v in kv_events_view(router).values()]
    return all(states) and all(s == "loaded" for t in states for s in t.values())


def kv_events_view(router: Server) -> dict[str, dict[str, Any]]:
    return {
        url: row["prefix_cache"]["kv_events"] or {} for url, row in replica_rows(router).items()
    }


def reset_prefix_cache(url: str) -> None:
    """POST /reset_prefix_cache (dev mode), then one tiny request straight to the replica:
    vLLM publishes the AllBlocksCleared with its next engine step, not at the reset."""
    request = urllib.request.Request(url + "/reset_prefix_cache", method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1}).encode()
    poke = urllib.request.Request(
        url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(poke, timeout=60) as resp:
        assert resp.status == 200


async def test_router_block_sets_match_the_replicas_events(
    replicas_with_events: list[tuple[Server, int]], tmp_path: Path
) -> None:
    """Both the router and a subscriber of the test's own receive every replica's events; a
    reset of each replica's prefix cache lines them up (a ZMQ subscriber misses what was
    published before it joined), then shared-prefix traffic stores and reuses blocks."""
    servers = [s for s, _ in replicas_with_events]
    async with (
        independent_subscriber(f"tcp://127.0.0.1:{replicas_with_events[0][1]}") as first,
        independent_subscriber(f"tcp://127.0.0.1:{replicas_with_events[1][1]}") as second,
    ):
        theirs = {servers[0].url: first, servers[1].url: second}
        router = router_over(servers, tmp_path, "--kv-events", "auto", name="router-events")
        try:
            deadline = time.monotonic() + 120
            group = 100
            while not all(
                kv_events_view(router)[url].get("batches", 0) > 0 and tally.batches > 0
                for url, tally in theirs.items()
            ):
                assert time.monotonic() < deadline, "no KV events reached the subscribers"
                await shared_prefix_run(router, groups=[group, group + 1], questions=1)
                group += 2
            for url in theirs:
                reset_prefix_cache(url)
            await until(
                lambda: (
                    all(v.get("cleared", 0) >= 1 for v in kv_events_view(router).values())
                    and all(t.cleared >= 1 for t in theirs.values())
                ),
                30,
                "AllBlocksCleared in both subscribers",
            )
            await shared_prefix_run(router, groups=range(4), questions=3)

            def same() -> bool:
                view = kv_events_view(router)
                return all(view[url]["blocks"] == len(t.held) for url, t in theirs.items())

            await until(same, 30, "the router's block counts equal the replicas' events")
            view = kv_events_view(router)
            for url, tally in theirs.items():
                print(f"{url}: {view[url]} (test's subscriber: {len(tally.held)})", file=sys.stderr)
                assert view[url]["missed"] == 0
            assert sum(len(t.held) for t in theirs.values()) > 0
            # one more reset: AllBlocksCleared empties the block set and the approximate record
            holder = next(url for url, t in theirs.items() if t.held)
            cleared = view[holder]["cleared"]
            reset_prefix_cache(holder)
            await until(
                lambda: kv_events_view(router)[holder]["cleared"] > cleared,
                30,
                "AllBlocksCleared in the router",
            )
            await until(same, 30, "the same block counts after the reset")
            row = replica_rows(router)[holder]["prefix_cache"]
            assert row["kv_events"]["blocks"] == len(theirs[holder].held) <= 1
            assert row["entries"] == 0  # the approximate record went with the cache
        finally:
            stop_all([router])


async def test_shared_prefixes_hit_more_through_the_cost_router_than_least_busy(
    replicas_with_events: list[tuple[Server, int]], tmp_path: Path
) -> None:
    """8 new groups x 4 questions per router, one request at a time (no group shared between
    the runs, so one run's cache does not help the other); hit rate from the replicas' own
    counters. Best possible ~0.67 (each group's first request misses; a repeat finds its
    whole 128-token blocks). Measured: cost 0.63-0.65, least-busy 0.43-0.49; cost with
    precise matching (--kv-events auto, once its tokenizer loaded) 0.65 as well. The
    replicas' replayed history holds the
    first test's resets: applied to the approximate record, they once cleared what this run
    had sent before the subscriber caught up (cost-precise 0.51 in CI).

    One at a time because on this 2-core box the two replicas share the cores, their learned
    step times differ up to 5x from scrape to scrape, and with 4 in flight that difference,
    not the cache, decides the placement (cost 0.46-0.53, least-busy 0.51-0.54 there)."""
    servers = [s for s, _ in replicas_with_events]
    rates = {}
    precise = {}
    runs: tuple[tuple[str, range, tuple[str, ...]], ...] = (
        ("cost", range(10, 18), ("--policy", "cost")),
        ("least-busy", range(20, 28), ("--policy", "least-busy")),
        ("cost-precise", range(30, 38), ("--policy", "cost", "--kv-events", "auto")),
    )
    for policy, groups, flags in runs:
        router = router_over(servers, tmp_path, *flags, name=f"router-{policy}")
        try:
            if "--kv-events" in flags:  # matched by vLLM's hashes from the first request on
                await until(partial(tokenizer_loaded, router), 60, "the tokenizer loaded")
            hits, queries = prefix_counters(servers)
            await shared_prefix_run(router, groups=groups, questions=4, concurrency=1)
            after_hits, after_queries = prefix_counters(servers)
            rates[policy] = (after_hits - hits) / (after_queries - queries)
            precise[policy] = sum(
                v.get("precise_requests", 0) for v in kv_events_view(router).values()
            )
        finally:
            stop_all([router])
    print(f"vllm:prefix_cache_hits rate: {rates}; matched precisely: {precise}", file=sys.stderr)
    assert rates["cost"] > rates["least-busy"]
    assert rates["cost"] > 0.5
    assert precise["cost-precise"] == 32  # every request, by vLLM's hashes
    assert rates["cost-precise"] > rates["least-busy"]
    assert rates["cost-precise"] > 0.5


def replica_hits(server: Server) -> tuple[float, float]:
    """(vllm:prefix_cache_hits, vllm:prefix_cache_queries) of one replica, in tokens."""
    return prefix_counters([server])


async def settled(router: Server) -> dict[str, dict[str, Any]]:
    """The router's KV-event view once two reads 0.3 s apart agree (the events of the last
    request have arrived), at most 10 s."""
    last = kv_events_view(router)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = kv_events_view(router)
        if now == last:
            return now
        last = now
    return last


async def test_precise_prediction_equals_the_replicas_prefix_cache_hits(
    replicas_with_events: list[tuple[Server, int]], tmp_path: Path
) -> None:
    """Shared-prefix chats one at a time through a router with --kv-events auto: once the
    tiny model's tokenizer is loaded, every request carries vLLM's block hashes, and the
    cached tokens the router predicted on the replica it chose equal that replica's
    vllm:prefix_cache_hits delta for the request, token for token."""
    servers = {s.url: s for s, _ in replicas_with_events}
    router = router_over(list(servers.values()), tmp_path, "--kv-events", "auto", name="precise")
    try:
        async with AsyncOpenAI(
            base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as client:

            async def ask(group: int, question: int) -> None:
                await client.chat.completions.create(
                    model=MODEL,
                    messages=shared_prefix_chat(group, question),
                    max_tokens=2,
                )

            # the tokenizer loads once the subscriber has read the replicas' models, before
            # any request; until then requests are matched approximately
            await until(lambda: tokenizer_loaded(router), 60, "the tokenizer, with no request")
            deadline = time.monotonic() + 60
            warm = 0
            while not any(v.get("precise_requests", 0) for v in kv_events_view(router).values()):
                assert time.monotonic() < deadline, "no request was matched precisely"
                await ask(200 + warm, 0)
                warm += 1
            compared = predicted_hits = 0
            for question in range(3):
                for group in (60, 61, 62):
                    before = await settled(router)
                    hits = {url: replica_hits(s) for url, s in servers.items()}
                    await ask(group, question)
                    after = await settled(router)
                    (url,) = [
                        u
                        for u in servers
                        if after[u]["precise_requests"] > before[u]["precise_requests"]
                    ]
                    predicted = (
                        after[url]["precise_cached_tokens"] - before[url]["precise_cached_tokens"]
                    )

                    def counted(url: str = url, queries: float = hits[url][1]) -> bool:
                        return replica_hits(servers[url])[1] > queries

                    await until(counted, 10, "the replica's prefix-cache counters")
                    measured = replica_hits(servers[url])[0] - hits[url][0]
                    print(f"group {group} q{question} on {url}: predicted {predicted}, "
                          f"vLLM hit {measured:.0f}", file=sys.stderr)  # fmt: skip
                    assert predicted == measured
                    compared += 1
                    predicted_hits += predicted > 0
            assert compared == 9
            assert predicted_hits >= 4  # repeats of a group found its system prompt cached
            view = kv_events_view(router)
            assert all(v["hashes_match"] is not False for v in view.values())
            # the blocks the router expected each new prompt to store were stored: its token
            # ids are the replica's (the check that turns precise matching off otherwise)
            assert all(v["ids_match"] is not False for v in view.values())
            assert sum(v["ids_confirmed"] for v in view.values()) >= 3
    finally:
        stop_all([router])


async def test_a_router_started_after_the_replicas_cached_prompts_replays_their_blocks(
    replicas_with_events: list[tuple[Server, int]], tmp_path: Path
) -> None:
    """Prompts cached on a replica before any router runs (a router that restarted, the
    second router pod of a rolling update): the router asks the replica's replay socket
    (launcher/vllm_args.py starts vLLM with one) for its buffered KV events when it
    subscribes, so with no request sent after it started, its block set already holds those
    prompts' blocks. Without the replay it would hold none of them."""
    servers = [s for s, _ in replicas_with_events]
    first = servers[0]
    longest = 0
    async with AsyncOpenAI(
        base_url=f"{first.url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        for group in (300, 301, 302):
            reply = await client.chat.completions.create(
                model=MODEL, messages=shared_prefix_chat(group, 0), max_tokens=2
            )
            assert reply.usage is not None
            longest = max(longest, reply.usage.prompt_tokens)
    router = router_over(servers, tmp_path, "--kv-events", "auto", name="late-router")
    try:

        def replayed() -> bool:
            view = kv_events_view(router).get(first.url, {})
            return bool(view.get("replayed", 0) > 0 and view.get("blocks", 0) > 0)

        await until(replayed, 60, "the replica's buffered KV events replayed")
        view = kv_events_view(router)[first.url]
        print(f"{first.url}: {view}", file=sys.stderr)
        assert view["block_size"] > 0
        assert view["blocks"] >= longest // view["block_size"]  # at least one whole prompt
        assert view["missed"] == 0
    finally:
        stop_all([router])
