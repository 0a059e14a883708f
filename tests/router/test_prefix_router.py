"""The prefix index in a running router over simulated vLLM replicas with prefix caching:
affinity, the predicted and measured hit rates in /fleet/replicas and /metrics, and what
happens with two routers that each learn only from what they send."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from contextlib import AsyncExitStack

import aiohttp

from tests.support.ports import free_port
from tests.support.router import RouterHandle, eventually, running_router
from tests.support.sim import SIM_MODEL, SimHandle, running_sims
from vllm_fleet.router.prefix_index import request_prefix
from vllm_fleet.router.scrape import parse_vllm_metrics


#: ~1,500 tokens at the simulator's 4 bytes per token, like the issue's shared-prefix scenario.
def system_prompt(group: int) -> str:
    return f"[group {group}] You answer questions about the fleet, briefly and politely. " * 80


def chat(group: int, question: str) -> dict[str, object]:
    return {
        "model": SIM_MODEL,
        "messages": [
            {"role": "system", "content": system_prompt(group)},
            {"role": "user", "content": question},
        ],
        "max_tokens": 4,
    }


async def post(
    session: aiohttp.ClientSession, router: RouterHandle, body: dict[str, object]
) -> str:
    """Send one chat through ``router``; the replica it went to (the router's served counts)."""
    before = {u: r.served for u, r in router.fleet.replicas.items()}
    async with session.post(f"{router.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    after = {u: r.served for u, r in router.fleet.replicas.items()}
    changed = [u for u in after if after[u] != before.get(u)]
    return changed[0] if len(changed) == 1 else ""


async def scraped(router: RouterHandle) -> None:
    """Wait for a first scrape of every replica: the router measures hit rates as increases
    of the replicas' counters from one scrape to the next."""
    replicas = list(router.fleet.replicas.values())
    await eventually(lambda: all(r.scraped_at > 0 for r in replicas), what="a first scrape")


async def hit_rate(sims: Sequence[SimHandle]) -> float:
    """Prefix-cache hits / queries summed over the simulators' own counters."""
    hits = queries = 0.0
    async with aiohttp.ClientSession() as session:
        for sim in sims:
            async with session.get(f"{sim.url}/metrics") as resp:
                m = parse_vllm_metrics(await resp.text())
            hits += m.prefix_cache_hits_total or 0.0
            queries += m.prefix_cache_queries_total or 0.0
    return hits / queries if queries else 0.0


async def test_a_shared_prefix_sticks_and_the_hit_rates_are_shown() -> None:
    async with (
        running_sims(2, step_ms=2.0) as sims,
        running_router([s.url for s in sims]) as router,
        aiohttp.ClientSession() as session,
    ):
        await scraped(router)
        places = [await post(session, router, chat(0, f"Question {i}?")) for i in range(8)]
        assert len(set(places[1:])) == 1, places  # after the first, all where it is cached
        holder = places[1]
        prefixes = router.fleet.replicas[holder].prefixes
        assert prefixes.match(request_prefix(SIM_MODEL, chat(0, "x"))) > 0
        # the replica's own counters reach the router at the next scrapes
        await eventually(lambda: prefixes.measured_hit_rate is not None, what="a measured rate")
        async with session.get(f"{router.url}/fleet/replicas") as resp:
            rows = {row["url"]: row for row in await resp.json()}
        view = rows[holder]["prefix_cache"]
        assert view["predicted_hit_rate"] > 0.5
        assert view["entries"] == len(prefixes) > 0
        assert view["trust"] > 0.9  # the replica found about what the router predicted
        async with session.get(f"{router.url}/metrics") as resp:
            text = await resp.text()
        assert f'vllm_fleet_prefix_predicted_hit_rate{{replica="{holder}"}}' in text
        assert f'vllm_fleet_prefix_measured_hit_rate{{replica="{holder}"}}' in text
        assert "vllm_fleet_prefix_index_bytes " in text
        assert await hit_rate(sims) > 0.5


async def _round(
    policy: str, routers: int, *, peered: bool = False
) -> tuple[float, dict[int, set[str]]]:
    """8 prefix groups x 6 questions in a seeded random order over 4 simulators, sent in
    waves of 4, alternating between ``routers`` routers (``peered``: each names the others
    with --peer, vllm_fleet.router.peers). Returns the simulators' hit rate and, per group,
    the replicas it was sent to."""
    async with AsyncExitStack() as stack:
        sims = await stack.enter_async_context(running_sims(4, step_ms=2.0))
        urls = [s.url for s in sims]
        ports = [free_port() for _ in range(routers)]
        fronts = [
            await stack.enter_async_context(
                running_router(
                    urls,
                    policy=policy,
                    port=port,
                    peers=tuple(f"http://127.0.0.1:{p}" for p in ports if p != port)
                    if peered
                    else (),
                )
            )
            for port in ports
        ]
        session = await stack.enter_async_context(aiohttp.ClientSession())
        for router in fronts:
            await scraped(router)
        places: dict[int, set[str]] = {g: set() for g in range(8)}
        jobs = [(g, q) for q in range(6) for g in range(8)]
        random.Random(7).shuffle(jobs)
        for start in range(0, len(jobs), 4):
            wave = jobs[start : start + 4]
            sent = await asyncio.gather(
                *(
                    post(session, fronts[(start // 4 + i) % routers], chat(g, f"q{q} of {g}"))
                    for i, (g, q) in enumerate(wave)
                )
            )
            for (g, _), url in zip(wave, sent, strict=True):
                places[g].add(url)
        return await hit_rate(sims), places


async def test_two_routers_each_keep_their_own_record() -> None:
    """What happens with two routers: each records only what it sends, so each router pays
    the first miss of every group (and may place it elsewhere than the other router did):
    a group is cached on up to two replicas, plus any spread under load. The best possible
    hit rate here is ~0.83 for one router (one miss per group) and ~0.67 for two (one per
    group and router); load-only routing finds prefixes only by chance.
    Measured (this test, 5 runs on the loaded 2-core box): one router 0.72-0.76 (waves of 4
    concurrent requests spread a little), two routers 0.64-0.74, least-busy with two routers
    0.39-0.45."""
    one, _ = await _round("cost", routers=1)
    two, places = await _round("cost", routers=2)
    busy, _ = await _round("least-busy", routers=2)
    print(
        f"hit rate: cost 1 router {one:.2f}, 2 routers {two:.2f}; least-busy 2 routers {busy:.2f}"
    )
    assert one > 0.6
    assert two > busy + 0.15
    assert one >= two - 0.05
    assert sum(len(urls) for urls in places.values()) <= 8 * 3, places
